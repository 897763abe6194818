//! A shard that is a directory on a local filesystem.
//!
//! Layout: `ROOT/ab/cd/abcd…` (the key's first two byte pairs fan the objects out so no
//! directory grows huge), and `ROOT/.tmp/` for writes in progress. A write goes to a temporary
//! file in the same filesystem, is fsynced, renamed into place and the directory fsynced, so a
//! crash leaves the old object, the new one, or a stray temporary file, never a torn object.
//!
//! The root is created when the shard is opened and never again: if it disappears (an
//! unmounted disk, a removed volume) the shard reports itself unavailable instead of silently
//! writing into an empty directory on the wrong disk. Once the shard's label
//! (`ROOT/.chitram-shard`, see `storage/identity.rs`) has been seen or written, every operation
//! also checks that it is still there: an empty directory left where the disk was mounted is
//! caught the same way.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio_util::io::ReaderStream;

use super::{
    BlobBody, BlobReader, BlobStore, BodyFeed, LABEL_NAME, ShardLabel, StorageError, StorageResult, StoredObject,
};
use crate::blob::BlobKey;

const TEMP_DIR: &str = ".tmp";
/// Read buffer for streaming an object out; large enough to keep syscalls rare.
const READ_CHUNK: usize = 64 * 1024;

/// How often a health check may write its probe file; checks in between only look.
const PROBE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
    /// Set once the label has been read or written: from then on it must stay there.
    labelled: Arc<AtomicBool>,
    /// When the last probe write succeeded: `/health` may be called often, by anyone, and must
    /// not write to disk each time.
    last_probe: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl FsStore {
    /// Opens (creating if needed) the shard rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root: PathBuf = root.into();
        fs::create_dir_all(root.join(TEMP_DIR))?;
        Ok(Self::open_existing(root))
    }

    /// Opens the shard rooted at `root` without creating anything: a root that does not exist
    /// is a shard that is down (the operator commands must not create directories).
    pub fn open_existing(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), labelled: Arc::new(AtomicBool::new(false)), last_probe: Arc::default() }
    }

    /// Where a key lives. Keys are 64 hex digits (see [`BlobKey`]), so the path never leaves
    /// the root.
    fn object_path(&self, key: &BlobKey) -> PathBuf {
        let key = key.as_str();
        self.root.join(&key[0..2]).join(&key[2..4]).join(key)
    }

    /// Fails with `Unavailable` unless the root is an existing directory that still carries
    /// the label this store has seen.
    fn check_root(&self) -> StorageResult<()> {
        self.check_root_directory()?;
        if self.labelled.load(Ordering::Acquire) && !self.root.join(LABEL_NAME).is_file() {
            return Err(StorageError::Unavailable {
                reason: format!(
                    "shard root {} has lost its label {LABEL_NAME} (is its disk still mounted?)",
                    self.root.display()
                ),
                source: None,
            });
        }
        Ok(())
    }

    fn check_root_directory(&self) -> StorageResult<()> {
        match fs::metadata(&self.root) {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(StorageError::Unavailable {
                reason: format!("shard root {} is not a directory", self.root.display()),
                source: None,
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Err(StorageError::unavailable(
                format!(
                    "shard directory {} does not exist (an unmounted disk, a wrong path, or a new shard that \
                     `chitram serve` has not created yet)",
                    self.root.display()
                ),
                err,
            )),
            Err(err) => Err(StorageError::unavailable(
                format!("shard root {} is not accessible (unmounted or removed?)", self.root.display()),
                err,
            )),
        }
    }

    /// Sorts an I/O error on `key`, checking the root so a vanished shard is not mistaken for
    /// a missing object.
    fn classify(&self, key: &BlobKey, doing: &str, err: io::Error) -> StorageError {
        if let Err(root_error) = self.check_root() {
            return root_error;
        }
        match err.kind() {
            io::ErrorKind::NotFound => StorageError::NotFound(key.clone()),
            io::ErrorKind::PermissionDenied => {
                StorageError::AccessDenied(format!("{doing} {key} under {}: {err}", self.root.display()))
            }
            io::ErrorKind::StorageFull | io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::QuotaExceeded => {
                StorageError::unavailable(format!("{doing} {key} under {}", self.root.display()), err)
            }
            _ => StorageError::other(format!("{doing} {key} under {}", self.root.display()), err),
        }
    }

    fn write_blocking(&self, key: &BlobKey, body: &BlobBody) -> StorageResult<()> {
        self.write_through_temporary(key, |temp| temp.fill(body))
    }

    /// As [`Self::write_blocking`], the bytes taken from the feed as they arrive: the
    /// temporary file is renamed into place only when exactly the feed's length arrived and
    /// its sender sealed it.
    fn write_feed_blocking(&self, key: &BlobKey, mut feed: BodyFeed) -> StorageResult<()> {
        self.write_through_temporary(key, |temp| temp.fill_from(&mut feed))
    }

    /// Writes an object by `fill`ing a temporary file, then renaming it into place (see the
    /// module doc); a failed fill leaves nothing.
    fn write_through_temporary(
        &self,
        key: &BlobKey,
        fill: impl FnOnce(&TempFile) -> io::Result<()>,
    ) -> StorageResult<()> {
        self.check_root()?;
        let target = self.object_path(key);
        let directory = target.parent().expect("object paths have a parent");
        create_fanout_dirs(&self.root, directory).map_err(|e| self.classify(key, "creating the directory of", e))?;
        let temp_dir = self.temp_dir().map_err(|e| self.classify(key, "writing", e))?;
        let temp = TempFile::create(&temp_dir, key).map_err(|e| self.classify(key, "writing", e))?;
        fill(&temp).map_err(|e| self.classify(key, "writing", e))?;
        temp.persist(&target).map_err(|e| self.classify(key, "renaming into place", e))?;
        sync_directory(directory).map_err(|e| self.classify(key, "syncing the directory of", e))
    }

    /// The directory of writes in progress, created inside the (existing) root if needed: a
    /// shard directory an operator made by hand has none yet.
    fn temp_dir(&self) -> io::Result<PathBuf> {
        let temp_dir = self.root.join(TEMP_DIR);
        match fs::create_dir(&temp_dir) {
            Ok(()) => sync_directory(&self.root)?,
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
        Ok(temp_dir)
    }

    fn read_label_blocking(&self) -> StorageResult<Option<ShardLabel>> {
        self.check_root_directory()?;
        let io_error =
            |err: io::Error| StorageError::other(format!("reading the label of {}", self.root.display()), err);
        let text = match fs::read(self.root.join(LABEL_NAME)) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io_error(err)),
        };
        let label = serde_json::from_slice(&text).map_err(|err| io_error(io::Error::other(err)))?;
        self.labelled.store(true, Ordering::Release);
        Ok(Some(label))
    }

    fn write_label_blocking(&self, label: &ShardLabel) -> StorageResult<()> {
        self.check_root_directory()?;
        let io_error = |err: io::Error| StorageError::other(format!("labelling {}", self.root.display()), err);
        let text = serde_json::to_vec_pretty(label).map_err(|err| io_error(io::Error::other(err)))?;
        let temp =
            self.temp_dir().map_err(io_error)?.join(format!("{LABEL_NAME}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let write = || -> io::Result<()> {
            let mut file = File::create_new(&temp)?;
            file.write_all(&text)?;
            file.sync_all()?;
            fs::rename(&temp, self.root.join(LABEL_NAME))?;
            sync_directory(&self.root)
        };
        write().map_err(|err| {
            let _ = fs::remove_file(&temp);
            io_error(err)
        })?;
        self.labelled.store(true, Ordering::Release);
        Ok(())
    }

    fn list_blocking(&self, after: Option<&BlobKey>, limit: usize) -> StorageResult<Vec<StoredObject>> {
        self.check_root()?;
        let mut found = Vec::new();
        let io_error = |err: io::Error| StorageError::other(format!("listing {}", self.root.display()), err);
        // Fan-out directories are key prefixes, so walking them in sorted order yields keys in
        // order. Prefixes entirely below `after` are skipped without being read.
        let after_str = after.map(BlobKey::as_str).unwrap_or("");
        for first in sorted_entries(&self.root).map_err(io_error)? {
            if first.len() != 2 || first.as_str() < after_str.get(0..2).unwrap_or("") {
                continue;
            }
            for second in sorted_entries(&self.root.join(&first)).map_err(io_error)? {
                let prefix = format!("{first}{second}");
                if second.len() != 2 || prefix.as_str() < after_str.get(0..4).unwrap_or("") {
                    continue;
                }
                let directory = self.root.join(&first).join(&second);
                for name in sorted_entries(&directory).map_err(io_error)? {
                    let Ok(key) = BlobKey::parse(&name) else { continue };
                    if after.is_some_and(|after| &key <= after) {
                        continue;
                    }
                    let meta = fs::metadata(directory.join(&name)).map_err(io_error)?;
                    found.push(StoredObject { key, len: meta.len(), modified: meta.modified().map_err(io_error)? });
                    if found.len() == limit {
                        return Ok(found);
                    }
                }
            }
        }
        Ok(found)
    }
}

#[async_trait]
impl BlobStore for FsStore {
    fn describe(&self) -> String {
        format!("fs:{}", self.root.display())
    }

    async fn write_blob(&self, key: &BlobKey, body: &BlobBody) -> StorageResult<()> {
        let (store, key, body) = (self.clone(), key.clone(), body.clone());
        run_blocking(move || store.write_blocking(&key, &body)).await
    }

    async fn write_blob_feed(&self, key: &BlobKey, feed: BodyFeed) -> StorageResult<()> {
        let (store, key) = (self.clone(), key.clone());
        run_blocking(move || store.write_feed_blocking(&key, feed)).await
    }

    async fn read_blob(&self, key: &BlobKey) -> StorageResult<BlobReader> {
        let path = self.object_path(key);
        let opened = async {
            let file = tokio::fs::File::open(&path).await?;
            let len = file.metadata().await?.len();
            Ok::<_, io::Error>((file, len))
        };
        let (file, len) = opened.await.map_err(|e| self.classify(key, "opening", e))?;
        Ok(BlobReader { len, stream: Box::pin(ReaderStream::with_capacity(file, READ_CHUNK)) })
    }

    async fn fetch_blob_len(&self, key: &BlobKey) -> StorageResult<u64> {
        let meta = tokio::fs::metadata(self.object_path(key)).await.map_err(|e| self.classify(key, "inspecting", e))?;
        Ok(meta.len())
    }

    async fn delete_blob(&self, key: &BlobKey) -> StorageResult<()> {
        match tokio::fs::remove_file(self.object_path(key)).await {
            Ok(()) => Ok(()),
            Err(err) => match self.classify(key, "deleting", err) {
                StorageError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn list_blobs(&self, after: Option<&BlobKey>, limit: usize) -> StorageResult<Vec<StoredObject>> {
        let (store, after) = (self.clone(), after.cloned());
        run_blocking(move || store.list_blocking(after.as_ref(), limit)).await
    }

    async fn check_health(&self) -> StorageResult<()> {
        let store = self.clone();
        run_blocking(move || {
            store.check_root()?;
            let mut last_probe = store.last_probe.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last_probe.is_some_and(|at| at.elapsed() < PROBE_INTERVAL) {
                return Ok(());
            }
            // A probe write catches a read-only or full filesystem, which a stat does not.
            let probe = store.root.join(TEMP_DIR).join(format!("health-{}", uuid::Uuid::new_v4().simple()));
            fs::write(&probe, b"ok").and_then(|()| fs::remove_file(&probe)).map_err(|err| {
                StorageError::unavailable(format!("shard root {} does not accept writes", store.root.display()), err)
            })?;
            *last_probe = Some(std::time::Instant::now());
            Ok(())
        })
        .await
    }

    async fn read_label(&self) -> StorageResult<Option<ShardLabel>> {
        let store = self.clone();
        run_blocking(move || store.read_label_blocking()).await
    }

    async fn write_label(&self, label: &ShardLabel) -> StorageResult<()> {
        let (store, label) = (self.clone(), label.clone());
        run_blocking(move || store.write_label_blocking(&label)).await
    }

    async fn remove_stale_temporaries(&self, grace: Duration) -> StorageResult<u64> {
        let store = self.clone();
        run_blocking(move || {
            store.check_root()?;
            remove_files_older_than(&store.root.join(TEMP_DIR), grace, |_| true).map_err(|err| {
                StorageError::other(format!("removing stale temporary files under {}", store.root.display()), err)
            })
        })
        .await
    }
}

async fn run_blocking<T: Send + 'static>(work: impl FnOnce() -> StorageResult<T> + Send + 'static) -> StorageResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|join_error| StorageError::other("a filesystem task panicked", join_error))?
}

/// Creates `directory` and its parents below `root`, but never `root` itself (see module doc).
/// Each directory it creates is fsynced into its parent, so that after a crash the object
/// renamed into it later cannot vanish with a directory entry that never reached the disk.
fn create_fanout_dirs(root: &Path, directory: &Path) -> io::Result<()> {
    let relative = directory.strip_prefix(root).expect("fan-out directories live under the root");
    let mut current = root.to_path_buf();
    for part in relative.components() {
        let parent = current.clone();
        current.push(part);
        match fs::create_dir(&current) {
            Ok(()) => sync_directory(&parent)?,
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn sync_directory(directory: &Path) -> io::Result<()> {
    File::open(directory)?.sync_all()
}

/// Removes the files in `dir` whose name is `ours` and that were last modified more than
/// `grace` ago: writes a crash cut short (a shard's temporary files, the upload spool's).
pub(crate) fn remove_files_older_than(dir: &Path, grace: Duration, ours: impl Fn(&str) -> bool) -> io::Result<u64> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !ours(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let modified = entry.metadata()?.modified()?;
        let age = SystemTime::now().duration_since(modified).unwrap_or_default();
        if age > grace && entry.file_type()?.is_file() {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok(removed)
}

fn sorted_entries(directory: &Path) -> io::Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(directory)?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort_unstable();
    Ok(names)
}

/// A temporary file that removes itself unless persisted.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    fn create(temp_dir: &Path, key: &BlobKey) -> io::Result<Self> {
        let path = temp_dir.join(format!("{key}.{}.tmp", uuid::Uuid::new_v4().simple()));
        File::create_new(&path)?;
        Ok(Self { path, persisted: false })
    }

    /// Writes the whole body and fsyncs it.
    fn fill(&self, body: &BlobBody) -> io::Result<()> {
        match body {
            BlobBody::Bytes(bytes) => {
                let mut file = File::create(&self.path)?;
                file.write_all(bytes)?;
                file.sync_all()
            }
            BlobBody::File { path, len } => {
                let copied = fs::copy(path, &self.path)?;
                if copied != *len {
                    return Err(io::Error::other(format!("spooled body is {copied} bytes, expected {len}")));
                }
                File::open(&self.path)?.sync_all()
            }
        }
    }

    /// Writes the feed's chunks as they come, and fsyncs once it has ended with exactly its
    /// length and its sender's seal; a failed, short or unsealed feed is an error (and the
    /// file is removed on drop).
    fn fill_from(&self, feed: &mut BodyFeed) -> io::Result<()> {
        let mut file = File::create(&self.path)?;
        let mut written: u64 = 0;
        while let Some(chunk) = feed.blocking_next_chunk() {
            let chunk = chunk?;
            written += chunk.len() as u64;
            if written > feed.len {
                break;
            }
            file.write_all(&chunk)?;
        }
        if written != feed.len {
            return Err(io::Error::other(format!("the body ended after {written} of {} bytes", feed.len)));
        }
        if !feed.is_sealed() {
            return Err(io::Error::other("the body ended without its sender's seal (the write was given up)"));
        }
        file.sync_all()
    }

    fn persist(mut self, target: &Path) -> io::Result<()> {
        fs::rename(&self.path, target)?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::TryStreamExt;

    fn key(byte: u8) -> BlobKey {
        BlobKey::from_digest(&[byte; 32])
    }

    async fn read_all(store: &FsStore, key: &BlobKey) -> StorageResult<Vec<u8>> {
        let reader = store.read_blob(key).await?;
        let chunks: Vec<Bytes> = reader.stream.try_collect().await.expect("stream");
        Ok(chunks.concat())
    }

    /// Feeds `pieces` (an `Err` for `None`) to a fed write of `len` bytes under `key`, sealing
    /// it before the last piece when `sealed`.
    async fn feed(
        store: &FsStore,
        key: &BlobKey,
        len: u64,
        pieces: &[Option<&'static [u8]>],
        sealed: bool,
    ) -> StorageResult<()> {
        let (sender, seal, feed) = BodyFeed::channel(len, 1);
        let write = tokio::spawn({
            let (store, key) = (store.clone(), key.clone());
            async move { store.write_blob_feed(&key, feed).await }
        });
        for (at, piece) in pieces.iter().enumerate() {
            if sealed && at + 1 == pieces.len() {
                seal.seal();
            }
            let chunk = piece.map(Bytes::from_static).ok_or_else(|| io::Error::other("the client went away"));
            if sender.send(chunk).await.is_err() {
                break;
            }
        }
        drop(sender);
        write.await.expect("the write task")
    }

    #[tokio::test]
    async fn a_fed_write_is_stored_only_when_its_whole_length_arrives_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let temporaries = || fs::read_dir(dir.path().join(TEMP_DIR)).unwrap().count();
        let whole = &[Some(&b"01234"[..]), Some(b"56789")][..];
        for (pieces, sealed, why) in [
            (&[Some(&b"01234"[..])][..], true, "short"),
            (&[Some(&b"01234"[..]), Some(b"56789"), Some(b"!")][..], true, "long"),
            (&[Some(&b"01234"[..]), None][..], true, "failed"),
            // Every byte, but the sender went away without vouching for them (given up).
            (whole, false, "unsealed"),
        ] {
            assert!(feed(&store, &key(7), 10, pieces, sealed).await.is_err(), "a {why} feed is an error");
            assert!(store.fetch_blob_len(&key(7)).await.unwrap_err().is_not_found(), "a {why} feed stores nothing");
            assert_eq!(temporaries(), 0, "a {why} feed leaves no temporary file");
        }
        feed(&store, &key(7), 10, whole, true).await.unwrap();
        assert_eq!(read_all(&store, &key(7)).await.unwrap(), b"0123456789");
        assert_eq!(temporaries(), 0);
    }

    #[tokio::test]
    async fn writes_read_back_and_fan_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path().join("a")).unwrap();
        let k = key(0xab);
        store.write_blob(&k, &BlobBody::Bytes(Bytes::from_static(b"hello"))).await.unwrap();
        assert_eq!(read_all(&store, &k).await.unwrap(), b"hello");
        assert_eq!(store.fetch_blob_len(&k).await.unwrap(), 5);
        assert!(dir.path().join("a/ab/ab").join(k.as_str()).is_file());
        assert_eq!(fs::read_dir(dir.path().join("a/.tmp")).unwrap().count(), 0, "no temporary file left");
    }

    #[tokio::test]
    async fn a_missing_object_is_not_found_and_deleting_it_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        assert!(store.read_blob(&key(1)).await.unwrap_err().is_not_found());
        store.delete_blob(&key(1)).await.unwrap();
    }

    #[tokio::test]
    async fn a_vanished_root_is_unavailable_and_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("shard");
        let store = FsStore::open(&root).unwrap();
        fs::rename(&root, dir.path().join("unmounted")).unwrap();
        let error = store.write_blob(&key(2), &BlobBody::Bytes(Bytes::from_static(b"x"))).await.unwrap_err();
        assert!(error.is_unavailable(), "{error}");
        assert!(store.read_blob(&key(2)).await.unwrap_err().is_unavailable());
        assert!(store.check_health().await.is_err());
        assert!(!root.exists(), "the write must not recreate the root");
    }

    #[tokio::test]
    async fn lists_in_key_order_after_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        for byte in [9u8, 3, 7, 1] {
            store.write_blob(&key(byte), &BlobBody::Bytes(Bytes::from_static(b"x"))).await.unwrap();
        }
        let all: Vec<BlobKey> = store.list_blobs(None, 10).await.unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(all, vec![key(1), key(3), key(7), key(9)]);
        let page: Vec<BlobKey> = store.list_blobs(Some(&key(3)), 1).await.unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(page, vec![key(7)]);
    }

    #[tokio::test]
    async fn a_labelled_root_swapped_for_an_empty_directory_is_unavailable_until_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("shard");
        let store = FsStore::open(&root).unwrap();
        let label = ShardLabel { store_id: "s".into(), shard: "a".into() };
        assert_eq!(store.read_label().await.unwrap(), None);
        store.write_label(&label).await.unwrap();
        store.write_blob(&key(4), &BlobBody::Bytes(Bytes::from_static(b"x"))).await.unwrap();

        // The disk is unmounted: an empty directory takes the root's place.
        fs::rename(&root, dir.path().join("unmounted")).unwrap();
        fs::create_dir(&root).unwrap();
        let error = store.read_blob(&key(4)).await.unwrap_err();
        assert!(error.is_unavailable(), "not NotFound: {error}");
        let error = store.write_blob(&key(5), &BlobBody::Bytes(Bytes::from_static(b"y"))).await.unwrap_err();
        assert!(error.is_unavailable(), "{error}");
        assert!(!root.join("ab").exists() && fs::read_dir(&root).unwrap().count() == 0, "nothing written");

        // Mounted again.
        fs::remove_dir(&root).unwrap();
        fs::rename(dir.path().join("unmounted"), &root).unwrap();
        assert_eq!(read_all(&store, &key(4)).await.unwrap(), b"x");
        assert_eq!(store.read_label().await.unwrap(), Some(label));
    }

    #[tokio::test]
    async fn new_fan_out_directories_and_stale_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        store.write_blob(&key(6), &BlobBody::Bytes(Bytes::from_static(b"x"))).await.unwrap();
        let stale = dir.path().join(TEMP_DIR).join("left-by-a-crash.tmp");
        fs::write(&stale, b"partial").unwrap();
        assert_eq!(store.remove_stale_temporaries(Duration::from_secs(3600)).await.unwrap(), 0, "too young");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(store.remove_stale_temporaries(Duration::from_millis(10)).await.unwrap(), 1);
        assert!(!stale.exists());
        assert_eq!(read_all(&store, &key(6)).await.unwrap(), b"x", "objects are not temporaries");
    }

    #[tokio::test]
    async fn copies_a_spooled_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path().join("s")).unwrap();
        let spooled = dir.path().join("spool");
        fs::write(&spooled, vec![7u8; 100_000]).unwrap();
        store.write_blob(&key(5), &BlobBody::File { path: spooled, len: 100_000 }).await.unwrap();
        assert_eq!(read_all(&store, &key(5)).await.unwrap(), vec![7u8; 100_000]);
    }
}
