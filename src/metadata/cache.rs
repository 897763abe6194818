//! An optional cache of image records in Redis (`[redis] metadata_cache`), in front of the
//! metadata store: [`CachedMetadata`] wraps any [`MetadataStore`], answers
//! [`ImageStore::find_image`] (what every metadata GET and file GET reads) from Redis when it
//! can, and invalidates after every change that alters a cached record, whoever makes it
//! (uploads, deletes, visibility, the replication workers, read repair, scrub, rebalance,
//! drain, variants), because all of them go through this store.
//!
//! **What is cached, under which keys.** `chitram:meta:v1:<store id>:img:<id>` holds an
//! image's row and its recorded variants; `chitram:meta:v1:<store id>:blob:<key>` holds the
//! copies of a blob (shard and state), which deduplicated images share, so a copy that changes
//! state invalidates one key. The `v1` changes with the encoding, so instances of two versions
//! never read each other's entries; the store id keeps two stores sharing one Redis apart
//! (blob keys are content hashes, the same in both). Entries live `metadata_cache_ttl_secs`. Nothing else is cached: lists, blobs'
//! reference counts (workers decide on them), accounts (the credential cache of `accounts/`
//! already spares the database).
//!
//! **Invalidation** happens after the database has committed and before the method returns,
//! so before the HTTP answer: an instance that saw a delete acknowledged finds no entry
//! anywhere. The guards that commit later ([`UploadGuard`], [`CopyDeletionGuard`],
//! [`MissingCopyGuard`]) are wrapped so that their commits invalidate too.
//!
//! **The stale-set race** of cache-aside (a reader reads the old row, a writer commits and
//! invalidates, then the reader writes the old row back) is closed by tombstones: an
//! invalidation does not delete the key but sets it to a tombstone for [`TOMBSTONE_TTL`], and
//! readers fill only absent keys (`SET NX`). A reader whose database read began before the
//! commit fills either before the tombstone (which then overwrites it) or while it lives (and
//! `NX` refuses it), provided the fill comes less than `TOMBSTONE_TTL` after its read began;
//! a fill is skipped when the read began more than [`MAX_FILL_AGE`] (1 s of the 3) ago.
//! Chosen over a version check because it needs no counter per record and no extra round trip
//! on a hit; the price is that a record just changed (or just uploaded: its blob's copies were
//! invalidated) is read from the database for the tombstone's 3 s.
//!
//! **When Redis does not answer** (250 ms, as the shared rate limiter), lookups go to the
//! database (counted in `chitram_metadata_cache_fallbacks_total`) and Redis is left alone for
//! 5 s. An invalidation that cannot be delivered is remembered and retried first thing when
//! Redis answers again; until it is delivered this instance reads only from the database, so
//! it never serves what it changed itself. Another instance that still reaches Redis may serve
//! the old entry until the retry lands or the entry's TTL ends: the TTL bounds that staleness.
//! Too many undelivered keys (a long outage) turn into one sweep of every key under the prefix.
//!
//! Every trait is implemented here by delegation, in this one file: a method added to a
//! metadata trait must be added here too (the compiler says so), with the keys it invalidates.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    AccountStore, ApiKey, BlobCopies, CopyDeletionGuard, CopyRef, CopyStore, DeletedImage, ImageRecord, ImageStore,
    JobCursors, ListPosition, MetaResult, MetadataStore, MissingCopyGuard, NewApiKey, NewImage, NewUser, NewVariant,
    QueueStats, QuotaOverride, Replica, ReplicaCounts, ReplicaState, ReplicationTask, ShardUsage, SingletonLock,
    SingletonLocks, TaskQueue, UploadGuard, User, UserCredentials, VariantRecord, VariantRecorded, VariantState,
    VariantStore, VariantTask, Visibility,
};
use crate::blob::BlobKey;
use crate::observability::names;
use crate::redact::redact_url;
use crate::redis_link::{RedisCallError, RedisLink};

/// Every key starts with this: namespaced (a Redis shared with other programs is safe to use)
/// and versioned (bump it when the encoding below changes).
pub const KEY_PREFIX: &str = "chitram:meta:v1:";
/// How long an invalidated key refuses fills. Also how long a record just changed (or a blob
/// just written) is read from the database before it is cached again.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(3);
/// A fill is skipped when its database read began longer ago than this (see the module doc):
/// the margin up to [`TOMBSTONE_TTL`] covers the fill's own way to Redis (at most 250 ms, and
/// Redis applies commands in order).
pub const MAX_FILL_AGE: Duration = Duration::from_secs(1);
/// The value of an invalidated key (no encoded record is this short).
const TOMBSTONE: &str = "~";
/// Undelivered invalidations kept one by one; beyond this, every key is swept instead.
const MAX_PENDING: usize = 10_000;
/// How long an exiting process tries to deliver the invalidations it still holds.
const EXIT_DELIVERY_LIMIT: Duration = Duration::from_secs(2);
/// Keys asked for per `SCAN` step of a sweep.
const SCAN_COUNT: usize = 1_000;
/// The length of a blob key, which starts every image entry.
const BLOB_KEY_LEN: usize = 64;

/// Reads an image entry and, in the same round trip, the copies of the blob its first 64
/// characters name. Returns `{}` (absent), `{image}` (the copies are absent, or the image
/// entry is a tombstone) or `{image, copies}`.
const LOOKUP: &str = r"
local image = redis.call('GET', KEYS[1])
if not image then return {} end
if string.len(image) < 64 then return {image} end
local copies = redis.call('GET', ARGV[1] .. string.sub(image, 1, 64))
if not copies then return {image} end
return {image, copies}
";

#[derive(Debug, thiserror::Error)]
#[error("redis.url {url} is not a Redis URL: {reason}")]
pub struct CacheConfigError {
    url: String,
    reason: String,
}

/// Why a call to Redis failed: it never reaches a client (the database answers instead).
type CacheError = RedisCallError;

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Hit(ImageRecord),
    /// Absent, a tombstone, or an entry this version cannot read: ask the database.
    Miss,
    /// Redis did not answer (or this instance has invalidations to deliver first).
    Unavailable,
}

/// The Redis side of the cache: lookups, fills and invalidations, each bounded by
/// the link's [`CALL_TIMEOUT`](crate::redis_link::CALL_TIMEOUT). Public so that tests can drive
/// the race of the module doc step by step.
pub struct RedisCache {
    /// [`KEY_PREFIX`] and the store's id: stores sharing one Redis never share entries (blob
    /// keys are content hashes, the same in every store).
    prefix: String,
    link: RedisLink,
    lookup: redis::Script,
    ttl: Duration,
    pending: Mutex<Pending>,
}

/// Invalidations that could not be delivered.
#[derive(Default)]
struct Pending {
    /// Each key with the number of its latest invalidation: a key invalidated again while a
    /// delivery of it is under way stays pending after that delivery.
    keys: BTreeMap<String, u64>,
    /// The number the next invalidation of a key takes.
    next: u64,
    /// Sweeps of the whole prefix asked for (too many keys, or a change to every image, such as
    /// adoption) and not delivered yet; a count, so that one asked for during a sweep is not
    /// taken as delivered by it.
    everything: u64,
    /// A caller is delivering these now. They stay pending until it has: meanwhile this
    /// instance reads from the database, as while Redis is down.
    delivering: bool,
}

impl Pending {
    fn add(&mut self, keys: Vec<String>) {
        for key in keys {
            self.next += 1;
            self.keys.insert(key, self.next);
        }
        self.bound();
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.everything == 0
    }

    /// Too many keys to deliver one by one: one sweep covers them.
    fn bound(&mut self) {
        if self.keys.len() > MAX_PENDING {
            self.keys.clear();
            self.everything += 1;
        }
    }
}

/// Marks a delivery in progress, and ends it however the delivering call ends (its caller may
/// be cancelled mid-delivery: a request whose client left).
struct Delivering<'a>(&'a Mutex<Pending>);

impl Drop for Delivering<'_> {
    fn drop(&mut self) {
        self.0.lock().expect("never poisoned").delivering = false;
    }
}

impl RedisCache {
    /// A cache of the store whose id is `store_id` (`MetadataStore::store_id`).
    pub fn new(url: &str, store_id: &str, ttl: Duration) -> Result<Self, CacheConfigError> {
        let client =
            redis::Client::open(url).map_err(|e| CacheConfigError { url: redact_url(url), reason: e.to_string() })?;
        Ok(Self {
            prefix: format!("{KEY_PREFIX}{store_id}:"),
            link: RedisLink::new(
                client,
                "image records are cached in Redis",
                "Redis is unavailable: image records are read from the database until it answers",
            ),
            lookup: redis::Script::new(LOOKUP),
            ttl,
            pending: Mutex::default(),
        })
    }

    /// The key of an image's entry.
    pub fn image_key(&self, id: Uuid) -> String {
        format!("{}img:{id}", self.prefix)
    }

    /// The key of a blob's copies.
    pub fn blob_key(&self, blob: &BlobKey) -> String {
        format!("{}blob:{blob}", self.prefix)
    }

    /// The image's cached record, if Redis holds a live entry for it and for its blob's copies.
    pub async fn lookup_image(&self, id: Uuid) -> Lookup {
        let Some(mut connection) = self.usable().await else { return Lookup::Unavailable };
        let mut invocation = self.lookup.prepare_invoke();
        invocation.key(self.image_key(id)).arg(format!("{}blob:", self.prefix));
        let call = invocation.invoke_async::<Vec<String>>(&mut connection);
        let found = match self.bounded(call).await {
            Ok(found) => found,
            Err(_) => return Lookup::Unavailable,
        };
        match found.as_slice() {
            [image, copies] => match decode(id, image, copies) {
                Some(record) => Lookup::Hit(record),
                None => {
                    tracing::debug!(%id, "a cached image record could not be read; asking the database");
                    Lookup::Miss
                }
            },
            _ => Lookup::Miss,
        }
    }

    /// Caches a record read from the database at `read_started`, unless its keys are
    /// tombstones or hold entries already, or the read is too old to be trusted (see the
    /// module doc). Best effort: a failure only means the next read asks the database again.
    pub async fn fill_image(&self, record: &ImageRecord, read_started: Instant) {
        let Some(mut connection) = self.usable().await else { return };
        if read_started.elapsed() > MAX_FILL_AGE {
            return;
        }
        let (image, copies) = encode(record);
        let ttl = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(self.image_key(record.id)).arg(image).arg("NX").arg("PX").arg(ttl).ignore();
        pipe.cmd("SET").arg(self.blob_key(&record.blob)).arg(copies).arg("NX").arg("PX").arg(ttl).ignore();
        let _ = self.bounded(pipe.query_async::<()>(&mut connection)).await;
    }

    /// Replaces `keys` by tombstones. An invalidation that cannot be delivered is remembered,
    /// retried before this instance uses the cache again, and counted.
    pub async fn invalidate(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let count = keys.len() as u64;
        self.pending.lock().expect("never poisoned").add(keys);
        // Delivers these keys, and any left over from an outage.
        if self.usable().await.is_none() && self.undelivered() {
            metrics::counter!(names::METADATA_CACHE_INVALIDATION_FAILURES).increment(count);
        }
    }

    /// Invalidates every entry (a change to many images at once, such as adoption).
    pub async fn invalidate_everything(&self) {
        self.pending.lock().expect("never poisoned").everything += 1;
        if self.usable().await.is_none() && self.undelivered() {
            metrics::counter!(names::METADATA_CACHE_INVALIDATION_FAILURES).increment(1);
        }
    }

    /// Pending invalidations that no delivery is carrying now: what a failure counts.
    fn undelivered(&self) -> bool {
        let pending = self.pending.lock().expect("never poisoned");
        !pending.is_empty() && !pending.delivering
    }

    /// Whether this instance has invalidations it could not deliver yet.
    pub fn has_pending_invalidations(&self) -> bool {
        !self.pending.lock().expect("never poisoned").is_empty()
    }

    /// Delivers the pending invalidations before the process exits (a `serve` stopping, an
    /// operator command that changed copies): they exist only in this process. Tries even while
    /// Redis is being left alone after a failure, once, within `limit`; returns whether nothing
    /// is left undelivered (what is left can only expire with its entries' TTL).
    pub async fn deliver_before_exit(&self, limit: Duration) -> bool {
        if !self.has_pending_invalidations() {
            return true;
        }
        let delivered = tokio::time::timeout(limit, async {
            let connection = self.link.connection_now().await?;
            self.deliver_pending(connection).await
        })
        .await;
        let done = matches!(delivered, Ok(Some(_)));
        if !done {
            tracing::warn!(
                "cache invalidations could not be delivered before exit: other instances may serve those records until their TTL ends"
            );
        }
        done
    }

    /// A connection, once every pending invalidation is delivered; `None` while Redis does not
    /// answer or some invalidation is still undelivered.
    async fn usable(&self) -> Option<ConnectionManager> {
        let connection = self.link.connection().await?;
        self.deliver_pending(connection).await
    }

    /// Delivers what is pending over `connection` and hands it back once nothing is; `None`
    /// while anything is undelivered (or being delivered by another caller).
    async fn deliver_pending(&self, mut connection: ConnectionManager) -> Option<ConnectionManager> {
        let (keys, everything) = {
            let mut pending = self.pending.lock().expect("never poisoned");
            if pending.is_empty() {
                return Some(connection);
            }
            if pending.delivering {
                return None;
            }
            pending.delivering = true;
            (pending.keys.clone(), pending.everything)
        };
        let delivering = Delivering(&self.pending);
        let delivered = self.deliver(&mut connection, keys.keys(), everything > 0).await;
        let mut pending = self.pending.lock().expect("never poisoned");
        match delivered {
            Ok(()) => {
                // Invalidated again meanwhile: that invalidation is still to deliver.
                pending.keys.retain(|key, number| keys.get(key) != Some(number));
                // A sweep asked for while this one ran still needs its own.
                pending.everything -= everything.min(pending.everything);
            }
            Err(error) => {
                pending.bound();
                tracing::debug!(%error, "a cache invalidation is waiting for Redis");
            }
        }
        let ready = pending.is_empty();
        drop(pending);
        drop(delivering);
        ready.then_some(connection)
    }

    async fn deliver(
        &self,
        connection: &mut ConnectionManager,
        keys: impl ExactSizeIterator<Item = &String>,
        everything: bool,
    ) -> Result<(), CacheError> {
        let tombstone_ms = u64::try_from(TOMBSTONE_TTL.as_millis()).unwrap_or(u64::MAX);
        if keys.len() > 0 {
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.cmd("SET").arg(key).arg(TOMBSTONE).arg("PX").arg(tombstone_ms).ignore();
            }
            self.bounded(pipe.query_async::<()>(connection)).await?;
        }
        if everything {
            self.sweep(connection, tombstone_ms).await?;
        }
        Ok(())
    }

    /// Tombstones every key under the prefix, a `SCAN` step at a time.
    async fn sweep(&self, connection: &mut ConnectionManager, tombstone_ms: u64) -> Result<(), CacheError> {
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor).arg("MATCH").arg(format!("{}*", self.prefix)).arg("COUNT").arg(SCAN_COUNT);
            let (next, found) = self.bounded(scan.query_async::<(u64, Vec<String>)>(connection)).await?;
            if !found.is_empty() {
                let mut pipe = redis::pipe();
                for key in &found {
                    pipe.cmd("SET").arg(key).arg(TOMBSTONE).arg("PX").arg(tombstone_ms).ignore();
                }
                self.bounded(pipe.query_async::<()>(connection)).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Runs one call to Redis within the link's timeout; a failure marks Redis down.
    async fn bounded<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, CacheError> {
        self.link.call(call).await
    }
}

/// An image entry: its row and variants, as `find_image` returned them.
#[derive(Serialize, Deserialize)]
struct CachedImage {
    id: Uuid,
    filename: String,
    content_type: String,
    file_size: u64,
    width: u32,
    height: u32,
    created_at: DateTime<Utc>,
    owner: Option<Uuid>,
    visibility: Visibility,
    variants: Vec<CachedVariant>,
}

#[derive(Serialize, Deserialize)]
struct CachedVariant {
    name: String,
    fingerprint: String,
    state: VariantState,
    blob: Option<String>,
    content_type: String,
    width: u32,
    height: u32,
    file_size: u64,
    reason: Option<String>,
}

/// A blob entry: its copies, in shard-name order.
#[derive(Serialize, Deserialize)]
struct CachedCopies(Vec<(String, ReplicaState)>);

/// The image entry (`<blob key><json>`, so the lookup script finds the blob's key) and the
/// blob entry of a record.
fn encode(record: &ImageRecord) -> (String, String) {
    let image = CachedImage {
        id: record.id,
        filename: record.filename.clone(),
        content_type: record.content_type.clone(),
        file_size: record.file_size,
        width: record.width,
        height: record.height,
        created_at: record.created_at,
        owner: record.owner,
        visibility: record.visibility,
        variants: record
            .variants
            .iter()
            .map(|v| CachedVariant {
                name: v.name.clone(),
                fingerprint: v.fingerprint.clone(),
                state: v.state,
                blob: v.blob.as_ref().map(|blob| blob.as_str().to_owned()),
                content_type: v.content_type.clone(),
                width: v.width,
                height: v.height,
                file_size: v.file_size,
                reason: v.reason.clone(),
            })
            .collect(),
    };
    let copies = CachedCopies(record.replicas.iter().map(|r| (r.shard.clone(), r.state)).collect());
    // Serialising these plain structs cannot fail.
    let image = format!("{}{}", record.blob, serde_json::to_string(&image).unwrap_or_default());
    (image, serde_json::to_string(&copies).unwrap_or_default())
}

/// The record two entries hold; `None` for a tombstone or anything this version cannot read.
fn decode(id: Uuid, image: &str, copies: &str) -> Option<ImageRecord> {
    if image.len() <= BLOB_KEY_LEN || copies == TOMBSTONE {
        return None;
    }
    let (blob, json) = image.split_at_checked(BLOB_KEY_LEN)?;
    let blob = BlobKey::parse(blob).ok()?;
    let cached: CachedImage = serde_json::from_str(json).ok()?;
    let CachedCopies(copies) = serde_json::from_str(copies).ok()?;
    if cached.id != id {
        return None;
    }
    let mut variants = Vec::with_capacity(cached.variants.len());
    for v in cached.variants {
        let blob = match v.blob {
            Some(blob) => Some(BlobKey::parse(&blob).ok()?),
            None => None,
        };
        variants.push(VariantRecord {
            image: id,
            name: v.name,
            fingerprint: v.fingerprint,
            state: v.state,
            blob,
            content_type: v.content_type,
            width: v.width,
            height: v.height,
            file_size: v.file_size,
            reason: v.reason,
        });
    }
    Some(ImageRecord {
        id,
        filename: cached.filename,
        content_type: cached.content_type,
        file_size: cached.file_size,
        width: cached.width,
        height: cached.height,
        blob,
        created_at: cached.created_at,
        replicas: copies.into_iter().map(|(shard, state)| Replica { shard, state }).collect(),
        owner: cached.owner,
        visibility: cached.visibility,
        variants,
    })
}

/// A metadata store whose image records are cached in Redis; see the module doc.
pub struct CachedMetadata {
    inner: Arc<dyn MetadataStore>,
    cache: Arc<RedisCache>,
}

impl CachedMetadata {
    /// Wraps `inner`; `store_id` is its [`MetadataStore::store_id`].
    pub fn new(
        inner: Arc<dyn MetadataStore>,
        url: &str,
        store_id: &str,
        ttl: Duration,
    ) -> Result<Self, CacheConfigError> {
        Ok(Self { inner, cache: Arc::new(RedisCache::new(url, store_id, ttl)?) })
    }

    /// The Redis side, for tests.
    pub fn cache(&self) -> &Arc<RedisCache> {
        &self.cache
    }

    async fn invalidate(&self, keys: Vec<String>) {
        self.cache.invalidate(keys).await;
    }
}

#[async_trait]
impl ImageStore for CachedMetadata {
    async fn insert_image_for_live_blob(&self, image: &NewImage) -> MetaResult<Option<ImageRecord>> {
        // A new image: nothing cached names it, and its blob's copies do not change.
        self.inner.insert_image_for_live_blob(image).await
    }

    async fn blob_is_live(&self, blob: &BlobKey) -> MetaResult<bool> {
        self.inner.blob_is_live(blob).await
    }

    async fn find_image(&self, id: Uuid) -> MetaResult<Option<ImageRecord>> {
        let cacheable = match self.cache.lookup_image(id).await {
            Lookup::Hit(record) => {
                metrics::counter!(names::METADATA_CACHE_HITS).increment(1);
                return Ok(Some(record));
            }
            Lookup::Miss => {
                metrics::counter!(names::METADATA_CACHE_MISSES).increment(1);
                true
            }
            Lookup::Unavailable => {
                metrics::counter!(names::METADATA_CACHE_FALLBACKS).increment(1);
                false
            }
        };
        let read_started = Instant::now();
        let found = self.inner.find_image(id).await?;
        // An absent image is not cached: ids are random, and an upload must be seen at once.
        if cacheable && let Some(record) = &found {
            self.cache.fill_image(record, read_started).await;
        }
        Ok(found)
    }

    async fn list_images(
        &self,
        limit: u32,
        after: Option<&ListPosition>,
        owner: Option<Uuid>,
    ) -> MetaResult<Vec<ImageRecord>> {
        self.inner.list_images(limit, after, owner).await
    }

    async fn set_visibility(&self, id: Uuid, visibility: Visibility) -> MetaResult<Option<ImageRecord>> {
        let changed = self.inner.set_visibility(id, visibility).await;
        self.invalidate(vec![self.cache.image_key(id)]).await;
        changed
    }

    async fn delete_image(&self, id: Uuid) -> MetaResult<Option<DeletedImage>> {
        let deleted = self.inner.delete_image(id).await;
        let mut keys = vec![self.cache.image_key(id)];
        if let Ok(Some(deleted)) = &deleted {
            // The copies of blobs that lost their last reference are now `Deleting`.
            if deleted.blob_unreferenced {
                keys.push(self.cache.blob_key(&deleted.blob));
            }
            keys.extend(deleted.unreferenced_variant_blobs.iter().map(|blob| self.cache.blob_key(blob)));
        }
        self.invalidate(keys).await;
        deleted
    }
}

#[async_trait]
impl CopyStore for CachedMetadata {
    async fn lock_blob_for_upload(&self, blob: &BlobKey, size: u64) -> MetaResult<Box<dyn UploadGuard>> {
        let inner = self.inner.lock_blob_for_upload(blob, size).await?;
        Ok(Box::new(CachedUploadGuard { inner, cache: self.cache.clone(), blob: blob.clone() }))
    }

    async fn lock_copy_for_deletion(&self, copy: &CopyRef) -> MetaResult<Option<Box<dyn CopyDeletionGuard>>> {
        match self.inner.lock_copy_for_deletion(copy).await? {
            Some(inner) => Ok(Some(self.deletion_guard(inner, &copy.blob))),
            None => {
                // It may have forgotten a settled `deleting` copy of a referenced blob.
                self.invalidate(vec![self.cache.blob_key(&copy.blob)]).await;
                Ok(None)
            }
        }
    }

    async fn record_missing_copy(&self, copy: &CopyRef) -> MetaResult<()> {
        let recorded = self.inner.record_missing_copy(copy).await;
        self.invalidate(vec![self.cache.blob_key(&copy.blob)]).await;
        recorded
    }

    async fn lock_stored_copy(&self, copy: &CopyRef) -> MetaResult<Option<Box<dyn MissingCopyGuard>>> {
        let guard = self.inner.lock_stored_copy(copy).await?;
        Ok(guard.map(|inner| {
            Box::new(CachedMissingCopyGuard { inner, cache: self.cache.clone(), blob: copy.blob.clone() })
                as Box<dyn MissingCopyGuard>
        }))
    }

    async fn record_stored_copy(&self, copy: &CopyRef) -> MetaResult<bool> {
        let recorded = self.inner.record_stored_copy(copy).await;
        self.invalidate(vec![self.cache.blob_key(&copy.blob)]).await;
        recorded
    }

    async fn restore_missing_copy(&self, copy: &CopyRef) -> MetaResult<bool> {
        let restored = self.inner.restore_missing_copy(copy).await;
        self.invalidate(vec![self.cache.blob_key(&copy.blob)]).await;
        restored
    }

    async fn lock_surplus_copy(
        &self,
        copy: &CopyRef,
        keep: &[String],
    ) -> MetaResult<Option<Box<dyn CopyDeletionGuard>>> {
        let guard = self.inner.lock_surplus_copy(copy, keep).await?;
        Ok(guard.map(|inner| self.deletion_guard(inner, &copy.blob)))
    }

    async fn find_blob_copies(&self, blob: &BlobKey) -> MetaResult<Option<BlobCopies>> {
        // Not cached: workers and operator tools decide on its reference count.
        self.inner.find_blob_copies(blob).await
    }

    async fn list_blob_copies(&self, after: Option<&BlobKey>, limit: u32) -> MetaResult<Vec<BlobCopies>> {
        self.inner.list_blob_copies(after, limit).await
    }

    async fn count_replicas_by_state(&self) -> MetaResult<ReplicaCounts> {
        self.inner.count_replicas_by_state().await
    }

    async fn any_copy_overdue(&self, pending_grace: Duration) -> MetaResult<bool> {
        self.inner.any_copy_overdue(pending_grace).await
    }

    async fn shard_usage(&self) -> MetaResult<Vec<ShardUsage>> {
        self.inner.shard_usage().await
    }

    async fn deletion_in_doubt(&self, copy: &CopyRef) -> MetaResult<bool> {
        self.inner.deletion_in_doubt(copy).await
    }

    async fn count_stranded_blobs(&self, known_shards: &[String]) -> MetaResult<u64> {
        self.inner.count_stranded_blobs(known_shards).await
    }
}

impl CachedMetadata {
    fn deletion_guard(&self, inner: Box<dyn CopyDeletionGuard>, blob: &BlobKey) -> Box<dyn CopyDeletionGuard> {
        Box::new(CachedDeletionGuard { inner, cache: self.cache.clone(), blob: blob.clone() })
    }
}

/// Invalidates the blob's copies (and, for a variant, its image) once the upload commits.
struct CachedUploadGuard {
    inner: Box<dyn UploadGuard>,
    cache: Arc<RedisCache>,
    blob: BlobKey,
}

#[async_trait]
impl UploadGuard for CachedUploadGuard {
    fn shards_in_doubt(&self) -> &[String] {
        self.inner.shards_in_doubt()
    }

    async fn commit(self: Box<Self>, image: &NewImage, copies: &[Replica]) -> MetaResult<ImageRecord> {
        let Self { inner, cache, blob } = *self;
        let committed = inner.commit(image, copies).await;
        let key = cache.blob_key(&blob);
        cache.invalidate(vec![key]).await;
        committed
    }

    async fn commit_variant(self: Box<Self>, variant: &NewVariant, copies: &[Replica]) -> MetaResult<VariantRecorded> {
        let Self { inner, cache, blob } = *self;
        let committed = inner.commit_variant(variant, copies).await;
        let keys = vec![cache.blob_key(&blob), cache.image_key(variant.image)];
        cache.invalidate(keys).await;
        committed
    }

    async fn fence_unrecorded_deletion(self: Box<Self>, shard: &str, doubt: Duration) -> MetaResult<()> {
        let Self { inner, cache, blob } = *self;
        let fenced = inner.fence_unrecorded_deletion(shard, doubt).await;
        cache.invalidate(vec![cache.blob_key(&blob)]).await;
        fenced
    }
}

/// Invalidates the blob's copies once a copy is confirmed missing.
struct CachedMissingCopyGuard {
    inner: Box<dyn MissingCopyGuard>,
    cache: Arc<RedisCache>,
    blob: BlobKey,
}

#[async_trait]
impl MissingCopyGuard for CachedMissingCopyGuard {
    async fn confirm_missing(self: Box<Self>) -> MetaResult<()> {
        let Self { inner, cache, blob } = *self;
        let confirmed = inner.confirm_missing().await;
        let key = cache.blob_key(&blob);
        cache.invalidate(vec![key]).await;
        confirmed
    }
}

/// Invalidates the blob's copies once a copy's deletion is recorded.
struct CachedDeletionGuard {
    inner: Box<dyn CopyDeletionGuard>,
    cache: Arc<RedisCache>,
    blob: BlobKey,
}

#[async_trait]
impl CopyDeletionGuard for CachedDeletionGuard {
    async fn commit(self: Box<Self>) -> MetaResult<()> {
        let Self { inner, cache, blob } = *self;
        let committed = inner.commit().await;
        let key = cache.blob_key(&blob);
        cache.invalidate(vec![key]).await;
        committed
    }

    async fn leave_in_doubt(self: Box<Self>, doubt: Duration) -> MetaResult<()> {
        let Self { inner, cache, blob } = *self;
        let left = inner.leave_in_doubt(doubt).await;
        let key = cache.blob_key(&blob);
        cache.invalidate(vec![key]).await;
        left
    }
}

#[async_trait]
impl TaskQueue for CachedMetadata {
    async fn claim_task(&self, worker: &str, lease: Duration) -> MetaResult<Option<ReplicationTask>> {
        self.inner.claim_task(worker, lease).await
    }

    async fn claim_copy_task(
        &self,
        copy: &CopyRef,
        worker: &str,
        lease: Duration,
    ) -> MetaResult<Option<ReplicationTask>> {
        // A claim changes no record a reader sees.
        self.inner.claim_copy_task(copy, worker, lease).await
    }

    async fn count_due_tasks(&self, cap: u64) -> MetaResult<u64> {
        self.inner.count_due_tasks(cap).await
    }

    async fn extend_claim(&self, task: i64, worker: &str, lease: Duration) -> MetaResult<bool> {
        self.inner.extend_claim(task, worker, lease).await
    }

    async fn complete_copy_task(&self, task: &ReplicationTask, worker: &str) -> MetaResult<bool> {
        let completed = self.inner.complete_copy_task(task, worker).await;
        self.invalidate(vec![self.cache.blob_key(&task.copy.blob)]).await;
        completed
    }

    async fn finish_task(&self, task: i64, worker: &str) -> MetaResult<bool> {
        // Removes the task row only; the copy's record changed under its guard.
        self.inner.finish_task(task, worker).await
    }

    async fn fail_task(&self, task: i64, worker: &str, error: &str, retry_after: Duration) -> MetaResult<bool> {
        self.inner.fail_task(task, worker, error, retry_after).await
    }

    async fn release_claims(&self, worker: &str) -> MetaResult<u64> {
        self.inner.release_claims(worker).await
    }

    async fn queue_stats(&self) -> MetaResult<QueueStats> {
        self.inner.queue_stats().await
    }
}

#[async_trait]
impl JobCursors for CachedMetadata {
    async fn load_job_cursor(&self, job: &str) -> MetaResult<Option<BlobKey>> {
        self.inner.load_job_cursor(job).await
    }

    async fn save_job_cursor(&self, job: &str, cursor: Option<&BlobKey>) -> MetaResult<()> {
        self.inner.save_job_cursor(job, cursor).await
    }
}

#[async_trait]
impl AccountStore for CachedMetadata {
    async fn create_user(&self, user: &NewUser) -> MetaResult<Option<User>> {
        self.inner.create_user(user).await
    }

    async fn find_user(&self, id: Uuid) -> MetaResult<Option<User>> {
        self.inner.find_user(id).await
    }

    async fn find_user_by_name(&self, username: &str) -> MetaResult<Option<UserCredentials>> {
        self.inner.find_user_by_name(username).await
    }

    async fn find_user_by_external_subject(&self, subject: &str) -> MetaResult<Option<User>> {
        self.inner.find_user_by_external_subject(subject).await
    }

    async fn list_users(&self) -> MetaResult<Vec<User>> {
        self.inner.list_users().await
    }

    async fn first_admin(&self) -> MetaResult<Option<User>> {
        self.inner.first_admin().await
    }

    async fn set_quota(&self, username: &str, quota: QuotaOverride) -> MetaResult<bool> {
        self.inner.set_quota(username, quota).await
    }

    async fn set_disabled(&self, username: &str, disabled: bool) -> MetaResult<bool> {
        self.inner.set_disabled(username, disabled).await
    }

    async fn create_api_key(&self, key: &NewApiKey) -> MetaResult<ApiKey> {
        self.inner.create_api_key(key).await
    }

    async fn find_api_key(&self, key_hash: &str) -> MetaResult<Option<(ApiKey, User)>> {
        self.inner.find_api_key(key_hash).await
    }

    async fn touch_api_key(&self, id: Uuid) -> MetaResult<()> {
        self.inner.touch_api_key(id).await
    }

    async fn list_api_keys(&self, user_id: Uuid) -> MetaResult<Vec<ApiKey>> {
        self.inner.list_api_keys(user_id).await
    }

    async fn revoke_api_key(&self, user_id: Option<Uuid>, key_id: Uuid) -> MetaResult<bool> {
        self.inner.revoke_api_key(user_id, key_id).await
    }

    async fn auth_secret(&self, candidate: &str) -> MetaResult<String> {
        self.inner.auth_secret(candidate).await
    }

    async fn adopt_unowned_images(&self, owner: Uuid) -> MetaResult<u64> {
        let adopted = self.inner.adopt_unowned_images(owner).await;
        // Owners of images no key lists: every entry goes (this runs once, at the first start).
        if !matches!(adopted, Ok(0)) {
            self.cache.invalidate_everything().await;
        }
        adopted
    }
}

#[async_trait]
impl SingletonLocks for CachedMetadata {
    async fn try_lock_singleton(&self, job: &str) -> MetaResult<Option<Box<dyn SingletonLock>>> {
        self.inner.try_lock_singleton(job).await
    }
}

#[async_trait]
impl VariantStore for CachedMetadata {
    async fn find_variant(&self, image: Uuid, name: &str) -> MetaResult<Option<VariantRecord>> {
        self.inner.find_variant(image, name).await
    }

    async fn record_variant_for_live_blob(&self, variant: &NewVariant) -> MetaResult<VariantRecorded> {
        let recorded = self.inner.record_variant_for_live_blob(variant).await;
        self.invalidate(vec![self.cache.image_key(variant.image)]).await;
        recorded
    }

    async fn record_variant_failure(
        &self,
        image: Uuid,
        name: &str,
        fingerprint: &str,
        reason: &str,
    ) -> MetaResult<VariantRecorded> {
        let recorded = self.inner.record_variant_failure(image, name, fingerprint, reason).await;
        self.invalidate(vec![self.cache.image_key(image)]).await;
        recorded
    }

    async fn claim_variant_task(&self, worker: &str, lease: Duration) -> MetaResult<Option<VariantTask>> {
        self.inner.claim_variant_task(worker, lease).await
    }

    async fn extend_variant_claim(&self, task: i64, worker: &str, lease: Duration) -> MetaResult<bool> {
        self.inner.extend_variant_claim(task, worker, lease).await
    }

    async fn finish_variant_task(&self, task: i64, worker: &str) -> MetaResult<bool> {
        self.inner.finish_variant_task(task, worker).await
    }

    async fn fail_variant_task(&self, task: i64, worker: &str, error: &str, retry_after: Duration) -> MetaResult<bool> {
        self.inner.fail_variant_task(task, worker, error, retry_after).await
    }

    async fn release_variant_claims(&self, worker: &str) -> MetaResult<u64> {
        self.inner.release_variant_claims(worker).await
    }

    async fn variant_queue_depth(&self) -> MetaResult<u64> {
        self.inner.variant_queue_depth().await
    }

    async fn image_ids_after(&self, after: Option<Uuid>, limit: u32) -> MetaResult<Vec<Uuid>> {
        self.inner.image_ids_after(after, limit).await
    }

    async fn count_images(&self) -> MetaResult<u64> {
        self.inner.count_images().await
    }

    async fn load_backfill_cursor(&self) -> MetaResult<Option<Uuid>> {
        self.inner.load_backfill_cursor().await
    }

    async fn save_backfill_cursor(&self, cursor: Option<Uuid>) -> MetaResult<()> {
        self.inner.save_backfill_cursor(cursor).await
    }
}

#[async_trait]
impl MetadataStore for CachedMetadata {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    async fn migrate(&self) -> MetaResult<()> {
        self.inner.migrate().await
    }

    async fn is_initialised(&self) -> MetaResult<bool> {
        self.inner.is_initialised().await
    }

    async fn ping(&self) -> MetaResult<()> {
        self.inner.ping().await
    }

    async fn store_id(&self) -> MetaResult<String> {
        self.inner.store_id().await
    }

    async fn before_exit(&self) {
        self.cache.deliver_before_exit(EXIT_DELIVERY_LIMIT).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ImageRecord {
        let blob = BlobKey::from_digest(&[7; 32]);
        ImageRecord {
            id: Uuid::now_v7(),
            filename: "cat.png".into(),
            content_type: "image/png".into(),
            file_size: 42,
            width: 3,
            height: 4,
            blob: blob.clone(),
            created_at: Utc::now(),
            replicas: vec![
                Replica { shard: "a".into(), state: ReplicaState::Stored },
                Replica { shard: "b".into(), state: ReplicaState::Pending },
            ],
            owner: Some(Uuid::new_v4()),
            visibility: Visibility::Private,
            variants: vec![VariantRecord {
                image: Uuid::nil(),
                name: "thumb".into(),
                fingerprint: "f".into(),
                state: VariantState::Ready,
                blob: Some(blob),
                content_type: "image/jpeg".into(),
                width: 1,
                height: 1,
                file_size: 9,
                reason: None,
            }],
        }
    }

    #[test]
    fn entries_decode_to_the_record_they_encode() {
        let mut record = record();
        record.variants[0].image = record.id;
        let (image, copies) = encode(&record);
        assert!(image.starts_with(record.blob.as_str()), "the lookup script finds the blob key first");
        assert_eq!(decode(record.id, &image, &copies), Some(record.clone()));
        assert_eq!(decode(Uuid::new_v4(), &image, &copies), None, "another id's entry is not this image's");
        assert_eq!(decode(record.id, TOMBSTONE, &copies), None);
        assert_eq!(decode(record.id, &image, TOMBSTONE), None);
        assert_eq!(decode(record.id, &image[..70], &copies), None, "a truncated entry is a miss");
    }

    #[test]
    fn keys_are_namespaced_versioned_and_per_store() {
        let cache = RedisCache::new("redis://127.0.0.1:1", "store-1", Duration::from_secs(1)).unwrap();
        let id = Uuid::nil();
        assert_eq!(cache.image_key(id), "chitram:meta:v1:store-1:img:00000000-0000-0000-0000-000000000000");
        assert!(cache.blob_key(&BlobKey::from_digest(&[0; 32])).starts_with("chitram:meta:v1:store-1:blob:0000"));
    }

    #[test]
    fn a_url_with_a_password_is_masked_in_errors() {
        let Err(error) = RedisCache::new("rediss//:hunter2@r:6379", "s", Duration::from_secs(1)) else {
            panic!("a malformed URL was accepted")
        };
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }
}
