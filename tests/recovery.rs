//! Missing is never a dead end: a disk that goes away and comes back loses nothing, a copy
//! marked missing whose bytes are good is stored again, and a LOST blob comes back from a
//! backup the way docs/operations.md tells an operator to restore it.

mod common;

use std::path::Path;
use std::time::Duration;

use chitram::app::open_storage;
use chitram::blob::BlobKey;
use chitram::maintenance::suspicion::{Finding, Verdict, recheck_copy};
use chitram::metadata::{CopyRef, ReplicaCounts, ReplicaState};
use chitram::storage::LABEL_NAME;
use common::database::DbKind;
use common::images::{large_png, png};
use common::{Backends, StorageKind, TestApp, TestOptions, assert_error, replica_states, spawn_app_with};
use reqwest::StatusCode;

macro_rules! on_fs_shards {
    ($($scenario:ident),+ $(,)?) => {$(
        mod $scenario {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$scenario(Backends { db: DbKind::Sqlite, storage: StorageKind::Fs }).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$scenario(Backends { db: DbKind::Postgres, storage: StorageKind::Fs }).await;
            }
        }
    )+};
}

on_fs_shards!(
    disks_unmounted_and_mounted_again_lose_nothing,
    a_disk_not_mounted_at_start_is_fenced_until_it_is_back,
    a_lost_blob_restored_from_a_backup_onto_a_holder_is_repaired,
    a_lost_blob_restored_from_a_backup_onto_another_shard_is_adopted,
    a_backup_that_cannot_be_checked_is_kept_not_deleted,
    copies_marked_missing_whose_bytes_are_good_are_stored_again,
    a_suspect_copy_is_marked_only_if_it_is_still_bad_under_the_lock,
    a_late_delete_cannot_remove_a_copy_uploaded_after_it,
);

async fn upload_replicated(app: &TestApp, count: u64, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut uploaded = Vec::new();
    for i in 0..count {
        let bytes = png(8, 8, seed + i);
        uploaded.push((app.upload_ok("r.png", bytes.clone()).await["id"].as_str().unwrap().to_owned(), bytes));
    }
    app.replicate_until_idle().await;
    uploaded
}

/// Swaps a shard's root for an empty directory, the way an unmounted disk leaves its mount point.
fn unmount(root: &Path) {
    std::fs::rename(root, root.with_extension("unmounted")).unwrap();
    std::fs::create_dir(root).unwrap();
}

fn mount_again(root: &Path) {
    std::fs::remove_dir_all(root).unwrap();
    std::fs::rename(root.with_extension("unmounted"), root).unwrap();
}

fn root_of(app: &TestApp, shard: &str) -> std::path::PathBuf {
    app.dir.path().join("shards").join(shard)
}

async fn assert_readable(app: &TestApp, uploaded: &[(String, Vec<u8>)]) {
    for (id, bytes) in uploaded {
        let response = app.download(id).await;
        assert_eq!(response.status(), StatusCode::OK, "image {id}");
        assert_eq!(response.bytes().await.unwrap().to_vec(), *bytes, "image {id}");
    }
}

async fn counts(app: &TestApp) -> ReplicaCounts {
    app.metadata.count_replicas_by_state().await.unwrap()
}

async fn disks_unmounted_and_mounted_again_lose_nothing(b: Backends) {
    let app = spawn_app_with(b, TestOptions::default()).await;
    let before = upload_replicated(&app, 12, 100).await;

    for shard in ["s0", "s1"] {
        unmount(&root_of(&app, shard));
    }
    // Reads of images with a copy on s2 are served; the others are 503, never 404, and nothing
    // is recorded missing: the empty directories are down, not empty.
    for (id, bytes) in &before {
        let image = app.image(id).await;
        let response = app.download(id).await;
        if replica_states(&image).iter().any(|(shard, _)| shard == "s2") {
            assert_eq!(response.bytes().await.unwrap().to_vec(), *bytes);
        } else {
            assert_error(response, StatusCode::SERVICE_UNAVAILABLE, "STORAGE_UNAVAILABLE").await;
        }
    }
    // Uploads go on, onto the shard that is there; nothing lands on the empty directories.
    let during = upload_replicated(&app, 4, 200).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // Room for a (wrong) background mark.
    assert_eq!(counts(&app).await.missing, 0, "an unmounted disk marks nothing missing");
    for shard in ["s0", "s1"] {
        let entries: Vec<_> = std::fs::read_dir(root_of(&app, shard)).unwrap().collect();
        assert!(entries.is_empty(), "nothing was written onto the empty mount point of {shard}");
    }

    for shard in ["s0", "s1"] {
        mount_again(&root_of(&app, shard));
    }
    app.replicate_until_idle().await;
    assert_readable(&app, &before).await;
    assert_readable(&app, &during).await;
    let report = chitram::commands::scrub(&app.settings, true, true).await.unwrap();
    assert!(report.ok, "{}", report.report);
    // Two copies of each of the 16 blobs, and a surplus copy on s2 for those uploaded while
    // their write set was away (rebalance removes those).
    let after = counts(&app).await;
    assert_eq!((after.missing, after.pending), (0, 0), "{after:?}");
    assert!(after.stored >= 32, "{after:?}");
}

async fn a_disk_not_mounted_at_start_is_fenced_until_it_is_back(b: Backends) {
    let app = spawn_app_with(b, TestOptions::default()).await;
    let uploaded = upload_replicated(&app, 6, 300).await;
    let on_s0 = app.metadata.list_blob_copies(None, 100).await.unwrap();
    let key =
        on_s0.iter().find(|blob| blob.replicas.iter().any(|r| r.shard == "s0")).expect("a copy on s0").blob.clone();

    // A restart finds s0's mount point empty.
    let root = root_of(&app, "s0");
    unmount(&root);
    let router = open_storage(&app.settings, app.metadata.as_ref()).await.unwrap();
    let health = router.check_health(Duration::from_secs(5)).await;
    let s0 = health.iter().find(|shard| shard.name == "s0").unwrap();
    let reason = s0.result.as_ref().expect_err("s0 is down").to_string();
    assert!(reason.contains("is its disk mounted"), "{reason}");
    let read = router.open_on("s0", &key).await.expect_err("a fenced shard serves nothing");
    assert!(!read.is_not_found(), "down, not empty: {read}");
    assert!(!root.join(LABEL_NAME).exists(), "the empty mount point is not labelled as s0");

    mount_again(&root);
    let health = router.check_health(Duration::from_secs(5)).await;
    assert!(health.iter().all(|shard| shard.result.is_ok()), "s0 is back once its disk is");
    assert!(router.open_on("s0", &key).await.is_ok());
    assert_readable(&app, &uploaded).await;
}

/// Both copies of one blob are gone; scrub marks them missing and reports the blob LOST.
async fn lose_a_blob(app: &TestApp) -> (String, String, Vec<u8>, Vec<String>) {
    let uploaded = upload_replicated(app, 3, 400).await;
    let (id, bytes) = uploaded[1].clone();
    lose_the_blob_of(app, id, bytes).await
}

async fn lose_the_blob_of(app: &TestApp, id: String, bytes: Vec<u8>) -> (String, String, Vec<u8>, Vec<String>) {
    let image = app.image(&id).await;
    let key = image["checksum"].as_str().unwrap().to_owned();
    let holders: Vec<String> = replica_states(&image).into_iter().map(|(shard, _)| shard).collect();
    for shard in &holders {
        std::fs::remove_file(app.object_path(shard, &key)).unwrap();
    }
    let report = chitram::commands::scrub(&app.settings, true, false).await.unwrap();
    assert!(!report.ok && report.report.contains("LOST"), "{}", report.report);
    assert_error(app.download(&id).await, StatusCode::SERVICE_UNAVAILABLE, "STORAGE_UNAVAILABLE").await;
    (id, key, bytes, holders)
}

/// Puts a backup of the blob at `ab/cd/<sha256>` on a shard, as docs/operations.md says.
fn restore_backup(app: &TestApp, shard: &str, key: &str, bytes: &[u8]) {
    let path = app.object_path(shard, key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

async fn assert_repaired(app: &TestApp, id: &str, key: &str, bytes: &[u8]) {
    let report = chitram::commands::scrub(&app.settings, true, true).await.unwrap();
    assert!(!report.report.contains("orphan:"), "a restored backup is no orphan: {}", report.report);
    assert_eq!(app.download(id).await.bytes().await.unwrap().to_vec(), bytes);
    let blob = app.metadata.find_blob_copies(&BlobKey::parse(key).unwrap()).await.unwrap().unwrap();
    let mut stored: Vec<&str> =
        blob.replicas.iter().filter(|r| r.state == ReplicaState::Stored).map(|r| r.shard.as_str()).collect();
    let mut wanted = app.router.write_set(&blob.blob);
    stored.sort_unstable();
    wanted.sort_unstable();
    for shard in &wanted {
        assert!(stored.contains(&shard.as_str()), "re-replicated onto its write set: {stored:?} vs {wanted:?}");
    }
    app.replicate_until_idle().await;
    let clean = chitram::commands::scrub(&app.settings, false, true).await.unwrap();
    assert!(clean.ok, "all in order again: {}", clean.report);
}

async fn a_lost_blob_restored_from_a_backup_onto_a_holder_is_repaired(b: Backends) {
    let app = spawn_app_with(b, TestOptions::default()).await;
    let (id, key, bytes, holders) = lose_a_blob(&app).await;
    restore_backup(&app, &holders[0], &key, &bytes);
    assert_repaired(&app, &id, &key, &bytes).await;
}

async fn a_lost_blob_restored_from_a_backup_onto_another_shard_is_adopted(b: Backends) {
    let app = spawn_app_with(b, TestOptions::default()).await;
    let (id, key, bytes, holders) = lose_a_blob(&app).await;
    let other = ["s0", "s1", "s2"].into_iter().find(|shard| !holders.iter().any(|h| h == shard)).unwrap();
    restore_backup(&app, other, &key, &bytes);
    // An old backup: past the orphan grace period, where an unknown object would be deleted.
    let path = app.object_path(other, &key);
    let old = std::time::SystemTime::now() - Duration::from_secs(30 * 24 * 3600);
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
    assert_repaired(&app, &id, &key, &bytes).await;
    assert!(path.exists(), "the adopted backup is kept");
}

/// A backup whose bytes cannot be read when scrub finds it (here its spool directory is gone;
/// a shard that stalls does the same) may be the only good copy of a lost blob: it is kept and
/// reported, not deleted as an orphan, and adopted by the next scrub that can read it.
async fn a_backup_that_cannot_be_checked_is_kept_not_deleted(b: Backends) {
    let app = spawn_app_with(b, TestOptions::default()).await;
    // Above the size checked in memory: verifying it needs a spool file.
    let bytes = large_png(300 * 1024, 460);
    let id = app.upload_ok("big.png", bytes.clone()).await["id"].as_str().unwrap().to_owned();
    app.replicate_until_idle().await;
    let (id, key, bytes, holders) = lose_the_blob_of(&app, id, bytes).await;
    let other = ["s0", "s1", "s2"].into_iter().find(|shard| !holders.iter().any(|h| h == shard)).unwrap();
    restore_backup(&app, other, &key, &bytes);
    let path = app.object_path(other, &key);
    let old = std::time::SystemTime::now() - Duration::from_secs(30 * 24 * 3600);
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();

    let mut unreadable = app.settings.clone();
    unreadable.server.spool_dir = Some(app.dir.path().join("no-such-spool-dir"));
    let report = chitram::commands::scrub(&unreadable, true, true).await.unwrap();
    assert!(!report.ok, "{}", report.report);
    assert!(report.report.contains("kept unchecked"), "the backup is reported: {}", report.report);
    assert!(!report.report.contains("orphan:"), "and not taken for an orphan: {}", report.report);
    assert!(path.exists(), "a backup that could not be read is not deleted");

    assert_repaired(&app, &id, &key, &bytes).await;
    assert!(path.exists(), "the adopted backup is kept");
}

async fn copies_marked_missing_whose_bytes_are_good_are_stored_again(b: Backends) {
    let app = spawn_app_with(b, TestOptions::default()).await;
    let uploaded = upload_replicated(&app, 4, 500).await;
    // Every copy of two blobs is marked missing (a disk that was briefly away, say): repair
    // must not be a dead end for want of a stored source.
    for (id, _) in &uploaded[..2] {
        let image = app.image(id).await;
        let blob = BlobKey::parse(image["checksum"].as_str().unwrap()).unwrap();
        for (shard, _) in replica_states(&image) {
            app.metadata.record_missing_copy(&CopyRef { blob: blob.clone(), shard }).await.unwrap();
        }
    }
    assert_eq!(counts(&app).await.missing, 4);
    app.replicate_until_idle().await;
    assert_eq!(counts(&app).await.missing, 0, "the repair tasks verified the bytes in place");
    assert_readable(&app, &uploaded).await;

    // Scrub clears such a mark by itself too.
    let image = app.image(&uploaded[2].0).await;
    let copy = CopyRef {
        blob: BlobKey::parse(image["checksum"].as_str().unwrap()).unwrap(),
        shard: replica_states(&image)[0].0.clone(),
    };
    app.metadata.record_missing_copy(&copy).await.unwrap();
    let report = chitram::commands::scrub(&app.settings, true, false).await.unwrap();
    assert!(report.report.contains("copy marked missing verifies"), "{}", report.report);
    assert_eq!(counts(&app).await.missing, 0);
}

async fn a_suspect_copy_is_marked_only_if_it_is_still_bad_under_the_lock(b: Backends) {
    let app = spawn_app_with(b, TestOptions::default()).await;
    let uploaded = upload_replicated(&app, 1, 600).await;
    let image = app.image(&uploaded[0].0).await;
    let key = image["checksum"].as_str().unwrap().to_owned();
    let size = uploaded[0].1.len() as u64;
    let shard = replica_states(&image)[0].0.clone();
    let copy = CopyRef { blob: BlobKey::parse(&key).unwrap(), shard: shard.clone() };
    let (metadata, router) = (app.metadata.as_ref(), app.router.as_ref());

    // Seen absent through a stale look, but there now: a false alarm, nothing recorded.
    let verdict = recheck_copy(metadata, router, &copy, size, Finding::Absent, true).await.unwrap();
    assert_eq!(verdict, Verdict::FalseAlarm);
    assert_eq!(counts(&app).await.missing, 0);

    // Really gone: confirmed and recorded, once.
    std::fs::remove_file(app.object_path(&shard, &key)).unwrap();
    let verdict = recheck_copy(metadata, router, &copy, size, Finding::Absent, true).await.unwrap();
    assert_eq!(verdict, Verdict::Confirmed);
    assert_eq!(counts(&app).await.missing, 1);
    // No longer recorded stored: nothing more to decide.
    let verdict = recheck_copy(metadata, router, &copy, size, Finding::Absent, true).await.unwrap();
    assert_eq!(verdict, Verdict::FalseAlarm);
}

async fn a_late_delete_cannot_remove_a_copy_uploaded_after_it(b: Backends) {
    let app = spawn_app_with(b, TestOptions::default()).await;
    let uploaded = upload_replicated(&app, 1, 700).await;
    let (id, bytes) = &uploaded[0];
    let image = app.image(id).await;
    let blob = BlobKey::parse(image["checksum"].as_str().unwrap()).unwrap();
    let holders: Vec<String> = replica_states(&image).into_iter().map(|(shard, _)| shard).collect();

    // The last reference goes, and the DELETE of one copy does not answer in time: its outcome
    // is unknown, so the copy is fenced as the deletion worker would leave it.
    app.metadata.delete_image(id.parse().unwrap()).await.unwrap();
    let doubtful = CopyRef { blob: blob.clone(), shard: holders[0].clone() };
    let guard = app.metadata.lock_copy_for_deletion(&doubtful).await.unwrap().expect("awaits deletion");
    guard.leave_in_doubt(Duration::from_secs(3600)).await.unwrap();

    // The same bytes are uploaded again: no copy is counted on the fenced shard.
    let again = app.upload_ok("again.png", bytes.clone()).await;
    let states = replica_states(&again);
    assert!(!states.contains(&(holders[0].clone(), "stored".to_owned())), "{states:?}");
    assert!(states.iter().any(|(_, state)| state == "stored"), "{states:?}");

    // The late DELETE lands; nothing acknowledged is lost, and replication waits the fence out.
    let _ = std::fs::remove_file(app.object_path(&holders[0], blob.as_str()));
    let new_id = again["id"].as_str().unwrap();
    assert_eq!(app.download(new_id).await.bytes().await.unwrap().to_vec(), *bytes);
    app.replicate_until_idle().await;
    let fenced_copy = (holders[0].clone(), "stored".to_owned());
    assert!(
        !replica_states(&app.image(new_id).await).contains(&fenced_copy),
        "nothing is copied onto the fenced shard before the fence expires"
    );
    // Nor by the operator's commands: scrub's restores and rebalance's moves wait it out too.
    let scrubbed = chitram::commands::scrub(&app.settings, true, false).await.unwrap();
    assert!(scrubbed.report.contains("may still land"), "the restore waits, and says why: {}", scrubbed.report);
    let rebalanced = chitram::commands::rebalance(&app.settings, false, false).await.unwrap();
    assert!(!replica_states(&app.image(new_id).await).contains(&fenced_copy), "{}", rebalanced.report);
    assert_eq!(app.download(new_id).await.bytes().await.unwrap().to_vec(), *bytes);
}
