//! The behavioural suite of the metadata store. Every behaviour is one function over the
//! trait, run on a fresh SQLite database and on a fresh Postgres database.

#[path = "common/database.rs"]
mod database;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitram::blob::BlobKey;
use chitram::metadata::{
    self, BlobCopies, CopyRef, DeletedImage, ImageRecord, ListPosition, MetadataStore, NewImage, QueueStats, Replica,
    ReplicaCounts, ReplicaState, ReplicationTask, ShardFailures, ShardUsage, TaskKind, Visibility,
};
use chrono::{DateTime, Utc};
use sqlx::Connection;
use uuid::Uuid;

use database::{DbKind, TestDatabase};

/// How long a concurrency test gives a second task to (wrongly) get past a lock. The tests
/// pass or fail on the order of events, not on this delay; it only gives a bug its chance.
const OVERTAKING_CHANCE: Duration = Duration::from_millis(300);

/// A lease no test outlives.
const LEASE: Duration = Duration::from_secs(3600);

/// Long enough for a zero lease to have run out on either database's clock.
const EXPIRY: Duration = Duration::from_millis(10);

/// Declares, for each behaviour, a module with one test per database kind: `NAME::sqlite`
/// and `NAME::postgres`.
macro_rules! on_both_databases {
    ($runner:ident: $($behaviour:ident),+ $(,)?) => {$(
        mod $behaviour {
            #[tokio::test]
            async fn sqlite() {
                super::$runner(super::DbKind::Sqlite, super::$behaviour).await;
            }

            #[tokio::test]
            async fn postgres() {
                super::$runner(super::DbKind::Postgres, super::$behaviour).await;
            }
        }
    )+};
}

on_both_databases!(with_store:
    variants_are_queued_recorded_shared_and_released,
    a_failed_variant_keeps_its_reason_and_a_deleted_image_records_nothing,
    ping_answers,
    an_upload_round_trips,
    an_unknown_image_is_not_found,
    dedup_ignores_an_absent_blob,
    a_dedup_miss_does_not_wait_for_another_uploads_commit,
    dedup_ignores_an_unreferenced_blob,
    dedup_ignores_a_blob_without_a_stored_copy,
    dedup_adds_a_reference_to_a_live_blob,
    the_list_is_newest_first_and_pages_neither_repeat_nor_skip,
    deleting_the_last_reference_marks_every_copy_deleting,
    deleting_another_reference_leaves_the_copies_alone,
    deleting_an_unknown_image_is_none,
    an_upload_resurrects_a_blob_and_forgets_unlisted_deleting_copies,
    an_upload_never_downgrades_a_stored_copy,
    copies_are_counted_by_state,
    copies_below_target_are_found_without_counting,
    a_copy_is_restored_from_missing_only_while_it_is_still_missing,
    a_dropped_guard_changes_nothing,
    a_copy_deletion_lock_holds_back_an_upload_of_its_blob,
    an_upload_lock_holds_back_the_deletion_of_a_copy,
    an_upload_queues_a_copy_task_for_each_pending_copy,
    a_claim_takes_the_oldest_due_task_and_skips_claimed_ones,
    an_expired_claim_passes_to_another_worker,
    the_copy_task_of_one_copy_is_claimed_by_one_worker,
    due_tasks_are_counted_up_to_a_cap,
    a_failed_task_waits_before_its_next_attempt,
    completing_a_copy_task_records_the_copy_stored,
    a_copy_task_made_moot_by_a_deletion_cannot_complete,
    deleting_the_last_reference_queues_delete_tasks_and_drops_copy_tasks,
    a_resurrected_blob_keeps_its_new_copies,
    released_claims_go_to_other_workers,
    queue_stats_count_tasks_and_failures,
    record_stored_copy_records_the_copy_or_its_deletion,
    a_surplus_copy_is_removable_only_once_its_replacements_are_stored,
    shard_usage_sums_copies_and_bytes,
    stranded_blobs_are_referenced_blobs_stored_only_on_unknown_shards,
    job_cursors_round_trip,
    blob_copies_are_listed_in_key_order,
    a_deletion_in_doubt_fences_its_copy_until_it_expires,
    an_unrecorded_object_whose_deletion_is_in_doubt_is_fenced_then_deleted_again,
    a_fenced_copy_left_by_an_upload_keeps_its_task_and_is_forgotten_once_settled,
    a_copy_written_onto_a_fenced_shard_is_recorded_missing,
    a_suspect_copy_is_locked_only_while_it_is_stored,
    the_store_id_is_made_once_and_kept,
);

on_both_databases!(with_store_and_url:
    completing_a_copy_task_of_an_unreferenced_blob_queues_its_deletion,
    a_missing_copy_is_queued_for_repair_once,
    deleting_every_copy_forgets_the_blob,
    an_unreferenced_blob_without_copies_is_forgotten_at_once,
    a_copy_deletion_forgets_the_tasks_of_its_copy,
);

async fn with_store<F, Fut>(kind: DbKind, behaviour: F)
where
    F: FnOnce(Arc<dyn MetadataStore>) -> Fut,
    Fut: Future<Output = ()>,
{
    let db = TestDatabase::create(kind).await;
    behaviour(open_store(&db).await).await;
}

/// For behaviours that must look at a row the trait does not expose.
async fn with_store_and_url<F, Fut>(kind: DbKind, behaviour: F)
where
    F: FnOnce(Arc<dyn MetadataStore>, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let db = TestDatabase::create(kind).await;
    behaviour(open_store(&db).await, db.url.clone()).await;
}

/// `CHITRAM_TEST_METADATA_CACHE=redis://…` runs the suite through the Redis cache of image
/// records (`metadata/cache.rs`), which must behave exactly as the store it wraps.
async fn open_store(db: &TestDatabase) -> Arc<dyn MetadataStore> {
    let store = metadata::connect(&db.url).await.expect("opening the metadata store");
    store.migrate().await.expect("migrating the metadata store");
    let Ok(redis) = std::env::var("CHITRAM_TEST_METADATA_CACHE") else { return store };
    let store_id = store.store_id().await.expect("the store's id");
    let ttl = Duration::from_secs(30);
    Arc::new(metadata::cache::CachedMetadata::new(store, &redis, &store_id, ttl).expect("a Redis URL"))
}

// ---- behaviours ----

async fn a_deletion_in_doubt_fences_its_copy_until_it_expires(store: Arc<dyn MetadataStore>) {
    let first = new_image(&blob(1), now());
    upload(&*store, &first, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Stored)]).await;
    store.delete_image(first.id).await.unwrap();
    let guard = store.lock_copy_for_deletion(&copy_ref(&blob(1), "a")).await.unwrap().expect("a awaits deletion");
    guard.leave_in_doubt(LEASE).await.unwrap();
    assert!(store.deletion_in_doubt(&copy_ref(&blob(1), "a")).await.unwrap());
    assert!(!store.deletion_in_doubt(&copy_ref(&blob(1), "b")).await.unwrap());
    assert_eq!(awaiting_deletion(&*store).await, [copy_ref(&blob(1), "a"), copy_ref(&blob(1), "b")], "a stays");

    // An upload of the same bytes learns where not to count a copy, and the fence outlives it.
    let guard = store.lock_blob_for_upload(&blob(1), 1234).await.unwrap();
    assert_eq!(guard.shards_in_doubt(), ["a".to_owned()]);
    let second = new_image(&blob(1), now());
    guard.commit(&second, &[copy("b", ReplicaState::Stored), copy("a", ReplicaState::Pending)]).await.unwrap();
    assert!(store.deletion_in_doubt(&copy_ref(&blob(1), "a")).await.unwrap());

    // A fence that has run out fences nothing.
    let other = new_image(&blob(2), now());
    upload(&*store, &other, &[copy("a", ReplicaState::Stored)]).await;
    store.delete_image(other.id).await.unwrap();
    let guard = store.lock_copy_for_deletion(&copy_ref(&blob(2), "a")).await.unwrap().expect("awaits deletion");
    guard.leave_in_doubt(Duration::ZERO).await.unwrap();
    tokio::time::sleep(EXPIRY).await;
    assert!(!store.deletion_in_doubt(&copy_ref(&blob(2), "a")).await.unwrap());
    assert!(store.lock_blob_for_upload(&blob(2), 1234).await.unwrap().shards_in_doubt().is_empty());
}

async fn an_unrecorded_object_whose_deletion_is_in_doubt_is_fenced_then_deleted_again(store: Arc<dyn MetadataStore>) {
    // Bytes no row knew (a refused upload's copy): the blob's row is made, unreferenced.
    let guard = store.lock_blob_for_upload(&blob(3), 1234).await.unwrap();
    guard.fence_unrecorded_deletion("a", LEASE).await.unwrap();
    let fenced = copy_ref(&blob(3), "a");
    assert!(store.deletion_in_doubt(&fenced).await.unwrap());
    let copies = store.find_blob_copies(&blob(3)).await.unwrap().expect("recorded");
    assert_eq!((copies.ref_count, copies.replicas), (0, vec![copy("a", ReplicaState::Deleting)]));
    assert_eq!(store.lock_blob_for_upload(&blob(3), 1234).await.unwrap().shards_in_doubt(), ["a".to_owned()]);
    let tasks = claim_all(&*store, "w").await;
    assert_eq!(targets(&tasks), [delete_task(&blob(3), "a")], "deleted again once settled");

    // Settled: the task deletes the object like any copy's, and the blob goes with it.
    let settled = store.lock_blob_for_upload(&blob(4), 1234).await.unwrap();
    settled.fence_unrecorded_deletion("b", Duration::ZERO).await.unwrap();
    tokio::time::sleep(EXPIRY).await;
    let guard = store.lock_copy_for_deletion(&copy_ref(&blob(4), "b")).await.unwrap().expect("awaits deletion");
    guard.commit().await.unwrap();
    assert!(store.find_blob_copies(&blob(4)).await.unwrap().is_none());
}

async fn a_fenced_copy_left_by_an_upload_keeps_its_task_and_is_forgotten_once_settled(store: Arc<dyn MetadataStore>) {
    let first = new_image(&blob(1), now());
    upload(&*store, &first, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Stored)]).await;
    store.delete_image(first.id).await.unwrap();
    let guard = store.lock_copy_for_deletion(&copy_ref(&blob(1), "a")).await.unwrap().expect("a awaits deletion");
    let fence = Duration::from_secs(2);
    guard.leave_in_doubt(fence).await.unwrap();
    // Uploaded again onto c alone: b's settled deletion is forgotten with its task; a is
    // fenced at that moment, so its row and its task stay.
    let guard = store.lock_blob_for_upload(&blob(1), 1234).await.unwrap();
    assert_eq!(guard.shards_in_doubt(), ["a".to_owned()]);
    let second = new_image(&blob(1), now());
    guard.commit(&second, &[copy("c", ReplicaState::Stored)]).await.unwrap();
    assert_eq!(awaiting_deletion(&*store).await, [copy_ref(&blob(1), "a")]);
    let tasks = claim_all(&*store, "w").await;
    assert_eq!(targets(&tasks), [delete_task(&blob(1), "a")], "a's task is kept, b's is gone");
    assert!(store.lock_copy_for_deletion(&copy_ref(&blob(1), "a")).await.unwrap().is_none(), "fenced");
    assert_eq!(awaiting_deletion(&*store).await, [copy_ref(&blob(1), "a")], "and kept while fenced");
    tokio::time::sleep(fence + EXPIRY).await;
    // Settled, on a referenced blob: forgotten (its object, if any, is scrub's), not deleted.
    assert!(store.lock_copy_for_deletion(&copy_ref(&blob(1), "a")).await.unwrap().is_none());
    assert!(awaiting_deletion(&*store).await.is_empty());
    assert_eq!(replicas_of(&*store, second.id).await, [copy("c", ReplicaState::Stored)]);
    assert_eq!(stats(&*store).await, QueueStats::default(), "no task is left behind");
}

async fn a_copy_written_onto_a_fenced_shard_is_recorded_missing(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    let copies = [copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending), copy("c", ReplicaState::Stored)];
    upload(&*store, &image, &copies).await;
    let task = claim(&*store, "w").await.expect("the task for b");
    // While b was being written, a rebalance's DELETE of b as a surplus copy timed out.
    let guard = store.lock_surplus_copy(&copy_ref(&blob(1), "b"), &shards(&["a", "c"])).await.unwrap();
    guard.expect("b is surplus").leave_in_doubt(LEASE).await.unwrap();

    assert!(store.complete_copy_task(&task, "w").await.unwrap());
    let recorded = replicas_of(&*store, image.id).await;
    assert_eq!(recorded[1], copy("b", ReplicaState::Missing), "the late DELETE may yet remove it: {recorded:?}");
    let tasks = claim_all(&*store, "w").await;
    assert_eq!(targets(&tasks), [copy_task(&blob(1), "b")], "its repair is queued");
    assert!(!store.restore_missing_copy(&copy_ref(&blob(1), "b")).await.unwrap(), "not while fenced");
}

async fn a_suspect_copy_is_locked_only_while_it_is_stored(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]).await;
    assert!(store.lock_stored_copy(&copy_ref(&blob(1), "b")).await.unwrap().is_none(), "pending");
    assert!(store.lock_stored_copy(&copy_ref(&blob(1), "z")).await.unwrap().is_none(), "not recorded");
    assert!(store.lock_stored_copy(&copy_ref(&blob(9), "a")).await.unwrap().is_none(), "no such blob");

    // Dropped: nothing changes.
    drop(store.lock_stored_copy(&copy_ref(&blob(1), "a")).await.unwrap().expect("stored"));
    assert_eq!(replicas_of(&*store, image.id).await[0], copy("a", ReplicaState::Stored));

    let guard = store.lock_stored_copy(&copy_ref(&blob(1), "a")).await.unwrap().expect("stored");
    guard.confirm_missing().await.unwrap();
    assert_eq!(replicas_of(&*store, image.id).await[0], copy("a", ReplicaState::Missing));
    let tasks = claim_all(&*store, "w").await;
    assert_eq!(targets(&tasks), [copy_task(&blob(1), "a"), copy_task(&blob(1), "b")], "its repair is queued");
}

async fn the_store_id_is_made_once_and_kept(store: Arc<dyn MetadataStore>) {
    let id = store.store_id().await.unwrap();
    assert!(Uuid::parse_str(&id).is_ok(), "{id}");
    assert_eq!(store.store_id().await.unwrap(), id);
}

async fn ping_answers(store: Arc<dyn MetadataStore>) {
    store.ping().await.expect("ping");
    assert!(["sqlite", "postgres"].contains(&store.backend_name()));
}

async fn an_upload_round_trips(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    let record = upload(&*store, &image, &[copy("b", ReplicaState::Pending), copy("a", ReplicaState::Stored)]).await;

    let expected = record_of(&image, vec![copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]);
    assert_eq!(record, expected);
    assert_eq!(store.find_image(image.id).await.unwrap(), Some(expected));

    // Values past 32 bits and text past ASCII survive too.
    let large = NewImage {
        filename: "chat noir 猫.png".into(),
        file_size: 5_000_000_000,
        width: 70_000,
        height: 1,
        ..new_image(&blob(2), now())
    };
    let record = upload(&*store, &large, &[copy("a", ReplicaState::Stored)]).await;
    assert_eq!(store.find_image(large.id).await.unwrap(), Some(record));
}

async fn an_unknown_image_is_not_found(store: Arc<dyn MetadataStore>) {
    assert_eq!(store.find_image(Uuid::new_v4()).await.unwrap(), None);
}

async fn dedup_ignores_an_absent_blob(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    assert_eq!(store.insert_image_for_live_blob(&image).await.unwrap(), None);
    assert_eq!(store.find_image(image.id).await.unwrap(), None);
}

/// Most uploads are new bytes: learning that must not queue behind another upload's commit
/// (on SQLite, a dedup check that opened a write transaction waited for the write lock).
async fn a_dedup_miss_does_not_wait_for_another_uploads_commit(store: Arc<dyn MetadataStore>) {
    let other_upload = store.lock_blob_for_upload(&blob(9), 10).await.unwrap();
    let image = new_image(&blob(1), now());
    let answer = tokio::time::timeout(Duration::from_secs(2), store.insert_image_for_live_blob(&image)).await;
    assert_eq!(answer.expect("answered while another upload holds its lock").unwrap(), None);
    drop(other_upload);
    assert_eq!(store.find_image(image.id).await.unwrap(), None);
}

async fn dedup_ignores_an_unreferenced_blob(store: Arc<dyn MetadataStore>) {
    let first = new_image(&blob(1), now());
    upload(&*store, &first, &[copy("a", ReplicaState::Stored)]).await;
    store.delete_image(first.id).await.unwrap();

    let second = new_image(&blob(1), now());
    assert_eq!(store.insert_image_for_live_blob(&second).await.unwrap(), None);
    assert_eq!(store.find_image(second.id).await.unwrap(), None);
    assert_eq!(awaiting_deletion(&*store).await, vec![copy_ref(&blob(1), "a")]);
}

async fn dedup_ignores_a_blob_without_a_stored_copy(store: Arc<dyn MetadataStore>) {
    upload(&*store, &new_image(&blob(1), now()), &[copy("a", ReplicaState::Pending)]).await;
    let second = new_image(&blob(1), now());
    assert_eq!(store.insert_image_for_live_blob(&second).await.unwrap(), None);
}

async fn dedup_adds_a_reference_to_a_live_blob(store: Arc<dyn MetadataStore>) {
    let first = new_image(&blob(1), now());
    upload(&*store, &first, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]).await;

    let second = new_image(&blob(1), now());
    let record = store.insert_image_for_live_blob(&second).await.unwrap();
    let expected = record_of(&second, vec![copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]);
    assert_eq!(record, Some(expected.clone()));
    assert_eq!(store.find_image(second.id).await.unwrap(), Some(expected));

    // Two references now: only the second deletion is the last.
    assert_eq!(store.delete_image(first.id).await.unwrap(), Some(deleted(&blob(1), false)));
    assert_eq!(store.delete_image(second.id).await.unwrap(), Some(deleted(&blob(1), true)));
}

async fn the_list_is_newest_first_and_pages_neither_repeat_nor_skip(store: Arc<dyn MetadataStore>) {
    let base = now();
    let micro = chrono::TimeDelta::microseconds(1);
    // Several images share a timestamp, so only the id orders them.
    let times = [base, base - micro, base, base + micro, base - chrono::TimeDelta::seconds(1), base, base - micro];
    let mut images = Vec::new();
    for created_at in times {
        let image = new_image(&blob(1), created_at);
        upload(&*store, &image, &[copy("a", ReplicaState::Stored)]).await;
        images.push(image);
    }
    images.sort_by_key(|image| std::cmp::Reverse((image.created_at, image.id)));
    let newest_first: Vec<Uuid> = images.iter().map(|image| image.id).collect();

    let everything = store.list_images(100, None, None).await.unwrap();
    assert_eq!(ids(&everything), newest_first);
    assert!(everything.iter().all(|record| record.replicas == [copy("a", ReplicaState::Stored)]));

    for limit in 1..=4 {
        assert_eq!(page_through(&*store, limit).await, newest_first, "paging {limit} at a time");
    }
    assert!(store.list_images(0, None, None).await.unwrap().is_empty());
}

async fn deleting_the_last_reference_marks_every_copy_deleting(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    let copies = [copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending), copy("c", ReplicaState::Missing)];
    upload(&*store, &image, &copies).await;

    assert_eq!(store.delete_image(image.id).await.unwrap(), Some(deleted(&blob(1), true)));
    assert_eq!(store.find_image(image.id).await.unwrap(), None);
    let expected = ["a", "b", "c"].map(|shard| copy_ref(&blob(1), shard));
    assert_eq!(awaiting_deletion(&*store).await, expected);
    assert_eq!(store.count_replicas_by_state().await.unwrap(), ReplicaCounts { deleting: 3, ..Default::default() });
}

async fn deleting_another_reference_leaves_the_copies_alone(store: Arc<dyn MetadataStore>) {
    let first = new_image(&blob(1), now());
    let second = new_image(&blob(1), now());
    upload(&*store, &first, &[copy("a", ReplicaState::Stored)]).await;
    upload(&*store, &second, &[copy("a", ReplicaState::Stored)]).await;

    assert_eq!(store.delete_image(first.id).await.unwrap(), Some(deleted(&blob(1), false)));
    assert_eq!(replicas_of(&*store, second.id).await, [copy("a", ReplicaState::Stored)]);
    assert!(awaiting_deletion(&*store).await.is_empty());
}

async fn deleting_an_unknown_image_is_none(store: Arc<dyn MetadataStore>) {
    assert_eq!(store.delete_image(Uuid::new_v4()).await.unwrap(), None);
}

async fn an_upload_resurrects_a_blob_and_forgets_unlisted_deleting_copies(store: Arc<dyn MetadataStore>) {
    let first = new_image(&blob(1), now());
    upload(&*store, &first, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Stored)]).await;
    store.delete_image(first.id).await.unwrap();

    // The same bytes arrive again before any copy was deleted; the new upload wrote shard a.
    let second = new_image(&blob(1), now());
    let record = upload(&*store, &second, &[copy("a", ReplicaState::Stored)]).await;
    assert_eq!(record.replicas, [copy("a", ReplicaState::Stored)]);

    for shard in ["a", "b"] {
        let guard = store.lock_copy_for_deletion(&copy_ref(&blob(1), shard)).await.unwrap();
        assert!(guard.is_none(), "copy on {shard} of a referenced blob must not be deletable");
    }
    assert!(awaiting_deletion(&*store).await.is_empty());
    assert_eq!(store.count_replicas_by_state().await.unwrap(), ReplicaCounts { stored: 1, ..Default::default() });
}

async fn an_upload_never_downgrades_a_stored_copy(store: Arc<dyn MetadataStore>) {
    upload(&*store, &new_image(&blob(1), now()), &[copy("a", ReplicaState::Stored)]).await;
    let second = new_image(&blob(1), now());
    let record = upload(&*store, &second, &[copy("a", ReplicaState::Pending), copy("b", ReplicaState::Pending)]).await;
    assert_eq!(record.replicas, [copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]);
}

async fn deleting_every_copy_forgets_the_blob(store: Arc<dyn MetadataStore>, url: String) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Stored)]).await;
    store.delete_image(image.id).await.unwrap();

    delete_copy(&*store, &copy_ref(&blob(1), "a")).await;
    assert_eq!(awaiting_deletion(&*store).await, [copy_ref(&blob(1), "b")]);
    assert!(blob_row_exists(&url, &blob(1)).await, "the blob stays while a copy is recorded");
    assert!(store.lock_copy_for_deletion(&copy_ref(&blob(1), "a")).await.unwrap().is_none());

    delete_copy(&*store, &copy_ref(&blob(1), "b")).await;
    assert!(awaiting_deletion(&*store).await.is_empty());
    assert!(!blob_row_exists(&url, &blob(1)).await, "the blob goes with its last copy");
    assert_eq!(store.count_replicas_by_state().await.unwrap(), ReplicaCounts::default());
}

async fn an_unreferenced_blob_without_copies_is_forgotten_at_once(store: Arc<dyn MetadataStore>, url: String) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[]).await;
    assert!(blob_row_exists(&url, &blob(1)).await);

    assert_eq!(store.delete_image(image.id).await.unwrap(), Some(deleted(&blob(1), true)));
    assert!(!blob_row_exists(&url, &blob(1)).await, "no copy is left for a deletion worker to finish");
}

async fn copies_are_counted_by_state(store: Arc<dyn MetadataStore>) {
    assert_eq!(store.count_replicas_by_state().await.unwrap(), ReplicaCounts::default());
    upload(&*store, &new_image(&blob(1), now()), &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)])
        .await;
    upload(&*store, &new_image(&blob(2), now()), &[copy("a", ReplicaState::Stored), copy("c", ReplicaState::Missing)])
        .await;
    let doomed = new_image(&blob(3), now());
    upload(&*store, &doomed, &[copy("a", ReplicaState::Stored)]).await;
    store.delete_image(doomed.id).await.unwrap();

    let expected = ReplicaCounts { pending: 1, stored: 2, missing: 1, deleting: 1 };
    assert_eq!(store.count_replicas_by_state().await.unwrap(), expected);
}

async fn copies_below_target_are_found_without_counting(store: Arc<dyn MetadataStore>) {
    // A grace longer than the test: only missing copies are overdue; none: pending ones too.
    let (hour, none) = (Duration::from_secs(3600), Duration::ZERO);
    assert!(!store.any_copy_overdue(none).await.unwrap(), "an empty store");
    upload(&*store, &new_image(&blob(1), now()), &[copy("a", ReplicaState::Stored)]).await;
    let doomed = new_image(&blob(2), now());
    upload(&*store, &doomed, &[copy("a", ReplicaState::Stored)]).await;
    store.delete_image(doomed.id).await.unwrap();
    assert!(!store.any_copy_overdue(none).await.unwrap(), "stored and deleting copies are on target");

    store.record_missing_copy(&copy_ref(&blob(1), "a")).await.unwrap();
    assert!(store.any_copy_overdue(hour).await.unwrap(), "a missing copy, however recent");
    assert!(store.record_stored_copy(&copy_ref(&blob(1), "a")).await.unwrap());
    assert!(!store.any_copy_overdue(none).await.unwrap(), "repaired");

    upload(&*store, &new_image(&blob(3), now()), &[copy("b", ReplicaState::Stored), copy("c", ReplicaState::Pending)])
        .await;
    assert!(!store.any_copy_overdue(hour).await.unwrap(), "a copy pending for less than the grace");
    assert!(store.any_copy_overdue(none).await.unwrap(), "a pending copy, with no grace");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(store.any_copy_overdue(Duration::from_millis(10)).await.unwrap(), "pending for longer than the grace");
}

async fn a_dropped_guard_changes_nothing(store: Arc<dyn MetadataStore>) {
    // An upload abandoned before its commit leaves no blob behind.
    drop(store.lock_blob_for_upload(&blob(9), 10).await.unwrap());
    let image = new_image(&blob(9), now());
    assert_eq!(store.insert_image_for_live_blob(&image).await.unwrap(), None);
    assert_eq!(store.count_replicas_by_state().await.unwrap(), ReplicaCounts::default());

    // Nor does it disturb copies awaiting deletion.
    let doomed = new_image(&blob(1), now());
    upload(&*store, &doomed, &[copy("a", ReplicaState::Stored)]).await;
    store.delete_image(doomed.id).await.unwrap();
    drop(store.lock_blob_for_upload(&blob(1), 10).await.unwrap());
    assert_eq!(awaiting_deletion(&*store).await, [copy_ref(&blob(1), "a")]);

    // A deletion abandoned before its commit leaves the copy to a later attempt.
    let guard = store.lock_copy_for_deletion(&copy_ref(&blob(1), "a")).await.unwrap();
    drop(guard.expect("the copy awaits deletion"));
    assert_eq!(awaiting_deletion(&*store).await, [copy_ref(&blob(1), "a")]);
    delete_copy(&*store, &copy_ref(&blob(1), "a")).await;
}

async fn a_copy_deletion_lock_holds_back_an_upload_of_its_blob(store: Arc<dyn MetadataStore>) {
    let doomed = new_image(&blob(1), now());
    upload(&*store, &doomed, &[copy("a", ReplicaState::Stored)]).await;
    store.delete_image(doomed.id).await.unwrap();
    let deletion = store.lock_copy_for_deletion(&copy_ref(&blob(1), "a")).await.unwrap();
    let deletion = deletion.expect("the copy awaits deletion");

    let deletion_committing = Arc::new(AtomicBool::new(false));
    let uploader = tokio::spawn({
        let (store, deletion_committing) = (store.clone(), deletion_committing.clone());
        async move {
            let guard = store.lock_blob_for_upload(&blob(1), 1234).await.unwrap();
            let waited = deletion_committing.load(Ordering::SeqCst);
            let image = new_image(&blob(1), now());
            (waited, guard.commit(&image, &[copy("b", ReplicaState::Stored)]).await.unwrap())
        }
    });
    tokio::time::sleep(OVERTAKING_CHANCE).await;
    deletion_committing.store(true, Ordering::SeqCst);
    deletion.commit().await.unwrap();

    let (waited, record) = uploader.await.unwrap();
    assert!(waited, "the upload took the blob's lock while a copy deletion held it");
    assert_eq!(record.replicas, [copy("b", ReplicaState::Stored)]);
}

async fn an_upload_lock_holds_back_the_deletion_of_a_copy(store: Arc<dyn MetadataStore>) {
    let doomed = new_image(&blob(1), now());
    upload(&*store, &doomed, &[copy("a", ReplicaState::Stored)]).await;
    store.delete_image(doomed.id).await.unwrap();
    let upload_guard = store.lock_blob_for_upload(&blob(1), 1234).await.unwrap();

    let upload_committing = Arc::new(AtomicBool::new(false));
    let deleter = tokio::spawn({
        let (store, upload_committing) = (store.clone(), upload_committing.clone());
        async move {
            let guard = store.lock_copy_for_deletion(&copy_ref(&blob(1), "a")).await.unwrap();
            (upload_committing.load(Ordering::SeqCst), guard.is_some())
        }
    });
    tokio::time::sleep(OVERTAKING_CHANCE).await;
    upload_committing.store(true, Ordering::SeqCst);
    // The upload found its copy on shard a still there, and references the blob again.
    let image = new_image(&blob(1), now());
    upload_guard.commit(&image, &[copy("a", ReplicaState::Stored)]).await.unwrap();

    let (waited, deletable) = deleter.await.unwrap();
    assert!(waited, "the deleter took the blob's lock while an upload held it");
    assert!(!deletable, "a copy of a blob referenced again must not be deleted");
}

// ---- the replication queue ----

async fn an_upload_queues_a_copy_task_for_each_pending_copy(store: Arc<dyn MetadataStore>) {
    let copies = [copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending), copy("c", ReplicaState::Pending)];
    upload(&*store, &new_image(&blob(1), now()), &copies).await;

    let tasks = claim_all(&*store, "w").await;
    assert_eq!(targets(&tasks), [copy_task(&blob(1), "b"), copy_task(&blob(1), "c")]);
    assert!(tasks.iter().all(|task| task.attempts == 0 && task.last_error.is_none()), "{tasks:?}");

    // Another upload of the same bytes: a stored copy listed as pending needs no task, and a
    // copy with a task already keeps that one task.
    upload(&*store, &new_image(&blob(1), now()), &[copy("a", ReplicaState::Pending), copy("b", ReplicaState::Pending)])
        .await;
    assert_eq!(stats(&*store).await.copy_tasks, 2);
}

async fn a_claim_takes_the_oldest_due_task_and_skips_claimed_ones(store: Arc<dyn MetadataStore>) {
    assert_eq!(claim(&*store, "w1").await, None);
    for n in [1, 2] {
        upload(
            &*store,
            &new_image(&blob(n), now()),
            &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)],
        )
        .await;
    }

    let first = claim(&*store, "w1").await.expect("a task is due");
    assert_eq!((first.kind, first.copy), copy_task(&blob(1), "b"));
    let second = claim(&*store, "w2").await.expect("another task is due");
    assert_eq!((second.kind, second.copy), copy_task(&blob(2), "b"));
    assert_eq!(claim(&*store, "w3").await, None, "both tasks are claimed");
}

async fn the_copy_task_of_one_copy_is_claimed_by_one_worker(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    let pending = CopyRef { blob: blob(1), shard: "b".into() };
    assert_eq!(store.claim_copy_task(&pending, "eager", LEASE).await.unwrap(), None, "nothing is queued yet");
    upload(&*store, &image, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]).await;

    // The stored copy has no task; the pending one has, and only one claimer gets it.
    let stored = CopyRef { blob: blob(1), shard: "a".into() };
    assert_eq!(store.claim_copy_task(&stored, "eager", LEASE).await.unwrap(), None);
    let task = store.claim_copy_task(&pending, "eager", LEASE).await.unwrap().expect("the pending copy's task");
    assert_eq!((task.kind, task.copy.clone()), copy_task(&blob(1), "b"));
    assert_eq!(store.claim_copy_task(&pending, "eager-2", LEASE).await.unwrap(), None, "held by the first");
    assert_eq!(claim(&*store, "w1").await, None, "a worker passes it over too");

    // A claimer that gives it up leaves it to the workers; one that completes it records it.
    assert_eq!(store.release_claims("eager").await.unwrap(), 1);
    let taken = claim(&*store, "w1").await.expect("released for a worker");
    assert_eq!(taken.id, task.id);
    assert_eq!(store.claim_copy_task(&pending, "eager", LEASE).await.unwrap(), None, "the worker holds it");
    assert!(store.complete_copy_task(&taken, "w1").await.unwrap());
    assert_eq!(replicas_of(&*store, image.id).await[1], copy("b", ReplicaState::Stored));
    assert_eq!(store.claim_copy_task(&pending, "eager", LEASE).await.unwrap(), None, "done: no task left");
}

async fn due_tasks_are_counted_up_to_a_cap(store: Arc<dyn MetadataStore>) {
    assert_eq!(store.count_due_tasks(10).await.unwrap(), 0);
    for n in 1..=4 {
        upload(
            &*store,
            &new_image(&blob(n), now()),
            &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending), copy("c", ReplicaState::Pending)],
        )
        .await;
    }
    assert_eq!(store.count_due_tasks(100).await.unwrap(), 8);
    assert_eq!(store.count_due_tasks(5).await.unwrap(), 5, "counting stops at the cap");
    // A claimed task still counts (it keeps a worker busy); one waiting for a retry does not.
    let claimed = claim(&*store, "w1").await.unwrap();
    assert_eq!(store.count_due_tasks(100).await.unwrap(), 8);
    let failed = claim(&*store, "w1").await.unwrap();
    assert!(store.fail_task(failed.id, "w1", "down", LEASE).await.unwrap());
    assert_eq!(store.count_due_tasks(100).await.unwrap(), 7);
    assert!(store.complete_copy_task(&claimed, "w1").await.unwrap());
    assert_eq!(store.count_due_tasks(100).await.unwrap(), 6);
}

async fn an_expired_claim_passes_to_another_worker(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]).await;

    // A heartbeat keeps a claim alive...
    let task = store.claim_task("w1", Duration::ZERO).await.unwrap().expect("a task is due");
    assert!(store.extend_claim(task.id, "w1", LEASE).await.unwrap());
    tokio::time::sleep(EXPIRY).await;
    assert_eq!(claim(&*store, "w2").await, None, "an extended claim holds");

    // ...and once it runs out, another worker takes the task over.
    assert!(store.extend_claim(task.id, "w1", Duration::ZERO).await.unwrap());
    tokio::time::sleep(EXPIRY).await;
    let taken = claim(&*store, "w2").await.expect("the expired claim is free");
    assert_eq!(taken, task);

    // The first worker lost the task: nothing it does to it counts.
    assert!(!store.extend_claim(task.id, "w1", LEASE).await.unwrap());
    assert!(!store.fail_task(task.id, "w1", "too late", Duration::ZERO).await.unwrap());
    assert!(!store.complete_copy_task(&task, "w1").await.unwrap());
    assert!(!store.finish_task(task.id, "w1").await.unwrap());
    assert_eq!(replicas_of(&*store, image.id).await[1], copy("b", ReplicaState::Pending));
    assert_eq!(claim(&*store, "w3").await, None, "the second worker still holds it");

    assert!(store.complete_copy_task(&taken, "w2").await.unwrap());
    assert_eq!(replicas_of(&*store, image.id).await[1], copy("b", ReplicaState::Stored));
}

async fn a_failed_task_waits_before_its_next_attempt(store: Arc<dyn MetadataStore>) {
    upload(&*store, &new_image(&blob(1), now()), &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)])
        .await;
    upload(&*store, &new_image(&blob(2), now()), &[copy("a", ReplicaState::Stored), copy("c", ReplicaState::Pending)])
        .await;
    let later = claim(&*store, "w").await.expect("the task for b");
    let soon = claim(&*store, "w").await.expect("the task for c");

    assert!(store.fail_task(later.id, "w", "shard b is down", Duration::from_secs(3600)).await.unwrap());
    assert!(store.fail_task(soon.id, "w", "shard c is down", Duration::ZERO).await.unwrap());
    // The claim went with the failure.
    assert!(!store.fail_task(later.id, "w", "again", Duration::ZERO).await.unwrap());

    let again = claim(&*store, "w").await.expect("a task failed with no delay is due again");
    let expected = ReplicationTask { attempts: 1, last_error: Some("shard c is down".into()), ..soon };
    assert_eq!(again, expected);
    assert_eq!(claim(&*store, "w").await, None, "the task for b waits an hour");
    assert_eq!(stats(&*store).await.copy_tasks, 2, "a failing task is kept");
}

async fn completing_a_copy_task_records_the_copy_stored(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]).await;
    let task = claim(&*store, "w").await.expect("the task for b");

    assert!(store.complete_copy_task(&task, "w").await.unwrap());
    assert_eq!(
        replicas_of(&*store, image.id).await,
        [copy("a", ReplicaState::Stored), copy("b", ReplicaState::Stored)]
    );
    assert_eq!(stats(&*store).await, QueueStats::default());
    assert!(!store.complete_copy_task(&task, "w").await.unwrap(), "the task is gone");
}

async fn a_copy_task_made_moot_by_a_deletion_cannot_complete(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]).await;
    let task = claim(&*store, "w").await.expect("the task for b");
    store.delete_image(image.id).await.unwrap();

    assert!(!store.complete_copy_task(&task, "w").await.unwrap());
    assert_eq!(awaiting_deletion(&*store).await, [copy_ref(&blob(1), "a"), copy_ref(&blob(1), "b")]);
    assert_eq!(stats(&*store).await.copy_tasks, 0);
}

async fn completing_a_copy_task_of_an_unreferenced_blob_queues_its_deletion(
    store: Arc<dyn MetadataStore>,
    url: String,
) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored)]).await;
    store.delete_image(image.id).await.unwrap();
    // A copy task on a blob without references takes an odd history: here, its copy was
    // marked stored again by hand and then found missing.
    database::set_replica_state(&url, blob(1).as_str(), "a", "stored").await;
    store.record_missing_copy(&copy_ref(&blob(1), "a")).await.unwrap();
    let tasks = claim_all(&*store, "w").await;
    assert_eq!(targets(&tasks), [copy_task(&blob(1), "a"), delete_task(&blob(1), "a")]);
    let repair = tasks.iter().find(|task| task.kind == TaskKind::Copy).expect("the copy task");

    assert!(store.complete_copy_task(repair, "w").await.unwrap());
    assert_eq!(awaiting_deletion(&*store).await, [copy_ref(&blob(1), "a")]);
    let stats = stats(&*store).await;
    assert_eq!((stats.copy_tasks, stats.delete_tasks), (0, 1));
}

async fn deleting_the_last_reference_queues_delete_tasks_and_drops_copy_tasks(store: Arc<dyn MetadataStore>) {
    let first = new_image(&blob(1), now());
    upload(&*store, &first, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]).await;
    let second = new_image(&blob(1), now());
    store.insert_image_for_live_blob(&second).await.unwrap().expect("the blob is live");

    store.delete_image(first.id).await.unwrap();
    let stats_after_first = stats(&*store).await;
    assert_eq!((stats_after_first.copy_tasks, stats_after_first.delete_tasks), (1, 0));

    store.delete_image(second.id).await.unwrap();
    let stats_after_last = stats(&*store).await;
    assert_eq!((stats_after_last.copy_tasks, stats_after_last.delete_tasks), (0, 2));
    let tasks = claim_all(&*store, "w").await;
    assert_eq!(targets(&tasks), [delete_task(&blob(1), "a"), delete_task(&blob(1), "b")]);
}

async fn a_resurrected_blob_keeps_its_new_copies(store: Arc<dyn MetadataStore>) {
    let first = new_image(&blob(1), now());
    upload(&*store, &first, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Stored)]).await;
    store.delete_image(first.id).await.unwrap();
    assert_eq!(stats(&*store).await.delete_tasks, 2);

    // Copy a is revived, b forgotten, c new: no delete task may remain for any of them.
    let second = new_image(&blob(1), now());
    upload(&*store, &second, &[copy("a", ReplicaState::Stored), copy("c", ReplicaState::Pending)]).await;
    let tasks = claim_all(&*store, "w").await;
    assert_eq!(targets(&tasks), [copy_task(&blob(1), "c")]);
}

async fn a_copy_deletion_forgets_the_tasks_of_its_copy(store: Arc<dyn MetadataStore>, url: String) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Stored)]).await;
    store.delete_image(image.id).await.unwrap();

    for remaining in [1, 0] {
        let task = claim(&*store, "w").await.expect("a delete task");
        delete_copy(&*store, &task.copy).await;
        assert!(!store.finish_task(task.id, "w").await.unwrap(), "the deletion took its task along");
        assert_eq!(stats(&*store).await.delete_tasks, remaining);
    }
    assert_eq!(stats(&*store).await, QueueStats::default());
    assert!(!blob_row_exists(&url, &blob(1)).await, "the blob goes with its last copy and task");
}

async fn a_copy_is_restored_from_missing_only_while_it_is_still_missing(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Stored)]).await;
    let (a, gone) = (copy_ref(&blob(1), "a"), copy_ref(&blob(1), "c"));
    assert!(!store.restore_missing_copy(&a).await.unwrap(), "a stored copy is left alone");

    store.record_missing_copy(&a).await.unwrap();
    assert_eq!(stats(&*store).await.copy_tasks, 1, "its repair is queued");
    assert!(store.restore_missing_copy(&a).await.unwrap(), "its bytes verified");
    assert_eq!(
        replicas_of(&*store, image.id).await,
        [copy("a", ReplicaState::Stored), copy("b", ReplicaState::Stored)]
    );
    assert_eq!(stats(&*store).await.copy_tasks, 0, "and its repair is no longer needed");

    // A copy removed since it was read (a rebalance's surplus) gets no row back.
    assert!(!store.restore_missing_copy(&gone).await.unwrap());
    assert!(!store.restore_missing_copy(&copy_ref(&blob(9), "a")).await.unwrap(), "nor does an unknown blob");
    assert_eq!(replicas_of(&*store, image.id).await.len(), 2);
}

async fn a_missing_copy_is_queued_for_repair_once(store: Arc<dyn MetadataStore>, url: String) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]).await;

    store.record_missing_copy(&copy_ref(&blob(1), "a")).await.unwrap();
    store.record_missing_copy(&copy_ref(&blob(1), "a")).await.unwrap();
    // Copies in another state, or not recorded, are left alone.
    store.record_missing_copy(&copy_ref(&blob(1), "b")).await.unwrap();
    store.record_missing_copy(&copy_ref(&blob(1), "z")).await.unwrap();
    store.record_missing_copy(&copy_ref(&blob(9), "a")).await.unwrap();
    assert_eq!(
        replicas_of(&*store, image.id).await,
        [copy("a", ReplicaState::Missing), copy("b", ReplicaState::Pending)]
    );
    let tasks = claim_all(&*store, "w").await;
    assert_eq!(targets(&tasks), [copy_task(&blob(1), "a"), copy_task(&blob(1), "b")]);

    // A repair that failed and waits is made due now when the copy is found missing again;
    // it stays one task and keeps its attempts.
    let repair = tasks.iter().find(|task| task.copy.shard == "a").expect("the repair of a").clone();
    assert!(store.fail_task(repair.id, "w", "no source answers", Duration::from_secs(3600)).await.unwrap());
    database::set_replica_state(&url, blob(1).as_str(), "a", "stored").await;
    store.record_missing_copy(&copy_ref(&blob(1), "a")).await.unwrap();
    let again = claim(&*store, "w2").await.expect("the repair is due now");
    assert_eq!((again.id, again.attempts), (repair.id, 1));
    assert_eq!(stats(&*store).await.copy_tasks, 2);
}

async fn released_claims_go_to_other_workers(store: Arc<dyn MetadataStore>) {
    let copies = [copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending), copy("c", ReplicaState::Pending)];
    upload(&*store, &new_image(&blob(1), now()), &copies).await;
    let tasks = claim_all(&*store, "w1").await;
    assert_eq!(tasks.len(), 2);

    assert_eq!(store.release_claims("w2").await.unwrap(), 0);
    assert_eq!(store.release_claims("w1").await.unwrap(), 2);
    assert_eq!(store.release_claims("w1").await.unwrap(), 0);
    assert!(!store.finish_task(tasks[0].id, "w1").await.unwrap());
    assert_eq!(claim_all(&*store, "w2").await, tasks, "released tasks are due at once, in the same order");
}

async fn queue_stats_count_tasks_and_failures(store: Arc<dyn MetadataStore>) {
    assert_eq!(stats(&*store).await, QueueStats::default());
    let started = Instant::now();
    let copies = [copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending), copy("c", ReplicaState::Pending)];
    upload(&*store, &new_image(&blob(1), now()), &copies).await;
    upload(&*store, &new_image(&blob(2), now()), &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)])
        .await;
    let doomed = new_image(&blob(3), now());
    upload(&*store, &doomed, &[copy("a", ReplicaState::Stored)]).await;
    store.delete_image(doomed.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let queued = stats(&*store).await;
    assert_eq!((queued.copy_tasks, queued.delete_tasks), (3, 1));
    assert!(queued.failing.is_empty());
    let age = queued.oldest_task_age.expect("tasks are queued");
    assert!(age >= Duration::from_millis(40), "oldest task age {age:?}");
    assert!(age <= started.elapsed() + Duration::from_millis(100), "oldest task age {age:?}");

    let tasks = claim_all(&*store, "w").await;
    let task_for = |blob: &BlobKey, shard: &str| -> i64 {
        tasks.iter().find(|task| task.copy == copy_ref(blob, shard)).expect("the task is claimed").id
    };
    let fail = |id: i64, error: &'static str, retry_after: Duration| {
        let store = store.clone();
        async move { assert!(store.fail_task(id, "w", error, retry_after).await.unwrap()) }
    };
    fail(task_for(&blob(1), "b"), "b: timed out", Duration::ZERO).await;
    fail(task_for(&blob(2), "b"), "b: refused", Duration::from_secs(3600)).await;
    fail(task_for(&blob(1), "c"), "c: refused", Duration::from_secs(3600)).await;
    let retry = claim(&*store, "w").await.expect("the first failure is due again");
    assert_eq!(retry.copy, copy_ref(&blob(1), "b"));
    // SQLite's clock counts milliseconds: failures within one are ordered by task id, which
    // here would put "b: refused" last. Let the clock move so the latest failure is the last.
    tokio::time::sleep(Duration::from_millis(3)).await;
    fail(retry.id, "b: timed out again", Duration::from_secs(3600)).await;

    let failing = stats(&*store).await.failing;
    let expected = [
        ShardFailures {
            shard: "b".into(),
            failing_tasks: 2,
            failed_attempts: 3,
            last_error: Some("b: timed out again".into()),
        },
        ShardFailures {
            shard: "c".into(),
            failing_tasks: 1,
            failed_attempts: 1,
            last_error: Some("c: refused".into()),
        },
    ];
    assert_eq!(failing, expected);
}

// ---- operator tools ----

async fn record_stored_copy_records_the_copy_or_its_deletion(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]).await;

    assert!(store.record_stored_copy(&copy_ref(&blob(1), "b")).await.unwrap(), "an update");
    assert!(store.record_stored_copy(&copy_ref(&blob(1), "c")).await.unwrap(), "an insert");
    let stored = ["a", "b", "c"].map(|shard| copy(shard, ReplicaState::Stored));
    assert_eq!(replicas_of(&*store, image.id).await, stored);
    assert_eq!(stats(&*store).await.copy_tasks, 0, "the copy task of b is moot");

    // A copy written for a blob that lost its references is deleted like the others.
    store.delete_image(image.id).await.unwrap();
    assert!(!store.record_stored_copy(&copy_ref(&blob(1), "d")).await.unwrap());
    let copies = store.find_blob_copies(&blob(1)).await.unwrap().expect("the blob awaits deletion");
    assert_eq!(copies.replicas, ["a", "b", "c", "d"].map(|shard| copy(shard, ReplicaState::Deleting)));
    assert_eq!(stats(&*store).await.delete_tasks, 4);

    // A blob without a row records nothing.
    assert!(!store.record_stored_copy(&copy_ref(&blob(9), "a")).await.unwrap());
    assert_eq!(store.find_blob_copies(&blob(9)).await.unwrap(), None);
}

async fn a_surplus_copy_is_removable_only_once_its_replacements_are_stored(store: Arc<dyn MetadataStore>) {
    let copies = [copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending), copy("c", ReplicaState::Stored)];
    upload(&*store, &new_image(&blob(1), now()), &copies).await;
    let keep = shards(&["a", "b"]);
    let surplus = copy_ref(&blob(1), "c");

    assert!(store.lock_surplus_copy(&surplus, &keep).await.unwrap().is_none(), "b is not stored yet");
    store.record_stored_copy(&copy_ref(&blob(1), "b")).await.unwrap();
    assert!(store.lock_surplus_copy(&copy_ref(&blob(1), "a"), &keep).await.unwrap().is_none(), "a is kept");
    assert!(store.lock_surplus_copy(&copy_ref(&blob(1), "z"), &keep).await.unwrap().is_none(), "z is not recorded");
    assert!(store.lock_surplus_copy(&copy_ref(&blob(9), "c"), &keep).await.unwrap().is_none(), "no such blob");
    assert!(store.lock_surplus_copy(&surplus, &[]).await.unwrap().is_none(), "nothing would be kept");

    // The surplus copy has a task of its own, which goes with it.
    store.record_missing_copy(&surplus).await.unwrap();
    drop(store.lock_surplus_copy(&surplus, &keep).await.unwrap().expect("c is surplus"));
    assert_eq!(store.find_blob_copies(&blob(1)).await.unwrap().unwrap().replicas.len(), 3, "a dropped guard");
    let guard = store.lock_surplus_copy(&surplus, &shards(&["b", "a", "a"])).await.unwrap();
    guard.expect("c is surplus").commit().await.unwrap();

    let remaining = store.find_blob_copies(&blob(1)).await.unwrap().expect("the blob is referenced");
    assert_eq!(remaining.replicas, [copy("a", ReplicaState::Stored), copy("b", ReplicaState::Stored)]);
    assert_eq!(stats(&*store).await, QueueStats::default());
}

async fn shard_usage_sums_copies_and_bytes(store: Arc<dyn MetadataStore>) {
    assert!(store.shard_usage().await.unwrap().is_empty());
    let small = NewImage { file_size: 100, ..new_image(&blob(1), now()) };
    upload(&*store, &small, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]).await;
    let large = NewImage { file_size: 5_000_000_000, ..new_image(&blob(2), now()) };
    upload(&*store, &large, &[copy("b", ReplicaState::Stored), copy("a", ReplicaState::Stored)]).await;

    let expected = [
        usage("a", ReplicaState::Stored, 2, 5_000_000_100),
        usage("b", ReplicaState::Pending, 1, 100),
        usage("b", ReplicaState::Stored, 1, 5_000_000_000),
    ];
    assert_eq!(store.shard_usage().await.unwrap(), expected);
}

async fn stranded_blobs_are_referenced_blobs_stored_only_on_unknown_shards(store: Arc<dyn MetadataStore>) {
    let uploads: [&[Replica]; 4] = [
        &[copy("a", ReplicaState::Stored), copy("x", ReplicaState::Stored)], // safe on a
        &[copy("x", ReplicaState::Stored)],                                  // stranded
        &[copy("x", ReplicaState::Stored), copy("a", ReplicaState::Pending)], // stranded
        &[copy("a", ReplicaState::Pending)],                                 // lost, not stranded
    ];
    for (n, copies) in (1..).zip(uploads) {
        upload(&*store, &new_image(&blob(n), now()), copies).await;
    }
    let doomed = new_image(&blob(5), now());
    upload(&*store, &doomed, &[copy("x", ReplicaState::Stored)]).await;
    store.delete_image(doomed.id).await.unwrap();

    assert_eq!(store.count_stranded_blobs(&shards(&["a", "b"])).await.unwrap(), 2);
    assert_eq!(store.count_stranded_blobs(&shards(&["a", "b", "x"])).await.unwrap(), 0);
    assert_eq!(store.count_stranded_blobs(&[]).await.unwrap(), 3);
}

async fn job_cursors_round_trip(store: Arc<dyn MetadataStore>) {
    assert_eq!(store.load_job_cursor("rebalance").await.unwrap(), None);
    store.save_job_cursor("rebalance", Some(&blob(1))).await.unwrap();
    store.save_job_cursor("rebalance", Some(&blob(2))).await.unwrap();
    assert_eq!(store.load_job_cursor("rebalance").await.unwrap(), Some(blob(2)));
    assert_eq!(store.load_job_cursor("scrub").await.unwrap(), None);

    store.save_job_cursor("rebalance", None).await.unwrap();
    assert_eq!(store.load_job_cursor("rebalance").await.unwrap(), None);
}

async fn blob_copies_are_listed_in_key_order(store: Arc<dyn MetadataStore>) {
    upload(&*store, &new_image(&blob(3), now()), &[copy("b", ReplicaState::Stored), copy("a", ReplicaState::Pending)])
        .await;
    upload(&*store, &new_image(&blob(1), now()), &[copy("a", ReplicaState::Stored)]).await;
    upload(&*store, &new_image(&blob(4), now()), &[]).await;
    let doomed = new_image(&blob(2), now());
    upload(&*store, &doomed, &[copy("c", ReplicaState::Stored)]).await;
    store.delete_image(doomed.id).await.unwrap();

    let expected = [
        blob_copies(&blob(1), 1, vec![copy("a", ReplicaState::Stored)]),
        blob_copies(&blob(2), 0, vec![copy("c", ReplicaState::Deleting)]),
        blob_copies(&blob(3), 1, vec![copy("a", ReplicaState::Pending), copy("b", ReplicaState::Stored)]),
        blob_copies(&blob(4), 1, vec![]),
    ];
    assert_eq!(store.list_blob_copies(None, 100).await.unwrap(), expected);
    assert_eq!(store.list_blob_copies(None, 2).await.unwrap(), expected[..2]);
    assert_eq!(store.list_blob_copies(Some(&blob(2)), 2).await.unwrap(), expected[2..]);
    assert!(store.list_blob_copies(Some(&blob(4)), 2).await.unwrap().is_empty());
    assert!(store.list_blob_copies(None, 0).await.unwrap().is_empty());

    assert_eq!(store.find_blob_copies(&blob(3)).await.unwrap(), Some(expected[2].clone()));
    assert_eq!(store.find_blob_copies(&blob(9)).await.unwrap(), None);
}

// ---- tests outside the shared suite ----

/// Two instances (two pools) on one Postgres database, four workers each, drain one queue.
/// A claim that let two workers take the same task (say, without `FOR UPDATE` in the claim's
/// subquery, both would pick the same row from their snapshots and the second update would
/// overwrite the first claim) shows up as a task running twice at once, or twice in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_instances_never_run_a_task_twice() {
    const TASKS: u8 = 60;
    const WORKERS_PER_INSTANCE: usize = 4;
    let db = TestDatabase::create(DbKind::Postgres).await;
    let first = open_store(&db).await;
    let second = metadata::connect(&db.url).await.expect("opening a second instance");
    for n in 0..TASKS {
        let copies = [copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)];
        upload(&*first, &new_image(&blob(n), now()), &copies).await;
    }

    let running = Arc::new(Mutex::new(HashSet::new()));
    let ran = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for (instance, store) in [first.clone(), second].into_iter().enumerate() {
        for n in 0..WORKERS_PER_INSTANCE {
            let worker = format!("instance-{instance}-worker-{n}");
            let (store, running, ran) = (store.clone(), running.clone(), ran.clone());
            workers.push(tokio::spawn(async move {
                while let Some(task) = store.claim_task(&worker, Duration::from_secs(30)).await.unwrap() {
                    assert!(running.lock().unwrap().insert(task.id), "task {} is running twice at once", task.id);
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    running.lock().unwrap().remove(&task.id);
                    ran.lock().unwrap().push(task.id);
                    assert!(store.complete_copy_task(&task, &worker).await.unwrap(), "{worker} lost task {}", task.id);
                }
            }));
        }
    }
    let all_done = async {
        for worker in workers {
            worker.await.expect("a worker failed");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all_done).await.expect("the workers drain the queue within a minute");

    let mut ran = ran.lock().unwrap().clone();
    ran.sort_unstable();
    let distinct: HashSet<i64> = ran.iter().copied().collect();
    assert_eq!((ran.len(), distinct.len()), (usize::from(TASKS), usize::from(TASKS)), "every task ran exactly once");
    assert_eq!(stats(&*first).await, QueueStats::default());
    let counts = first.count_replicas_by_state().await.unwrap();
    assert_eq!(counts, ReplicaCounts { stored: 2 * u64::from(TASKS), ..Default::default() });
}

#[tokio::test]
async fn an_unreachable_postgres_is_unavailable_within_seconds() {
    let started = Instant::now();
    let Err(error) = metadata::connect("postgres://postgres@127.0.0.1:1/postgres").await else {
        panic!("nothing listens on port 1, yet connecting succeeded");
    };
    assert!(error.is_unavailable(), "expected an unavailable error, got {error:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn sqlite_creates_the_database_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nested/deeper/chitram.db");
    let store = metadata::connect(&format!("sqlite://{}", file.display())).await.unwrap();
    store.migrate().await.unwrap();
    assert!(file.exists());
}

// ---- helpers ----

fn blob(n: u8) -> BlobKey {
    BlobKey::from_digest(&[n; 32])
}

/// Now, truncated to the microseconds both databases keep.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).expect("now is in range")
}

fn new_image(blob: &BlobKey, created_at: DateTime<Utc>) -> NewImage {
    NewImage {
        id: Uuid::new_v4(),
        filename: "cat.png".into(),
        content_type: "image/png".into(),
        file_size: 1234,
        width: 640,
        height: 480,
        blob: blob.clone(),
        created_at,
        owner: None,
        visibility: Visibility::Public,
        variants: Vec::new(),
    }
}

fn record_of(image: &NewImage, replicas: Vec<Replica>) -> ImageRecord {
    ImageRecord {
        id: image.id,
        filename: image.filename.clone(),
        content_type: image.content_type.clone(),
        file_size: image.file_size,
        width: image.width,
        height: image.height,
        blob: image.blob.clone(),
        created_at: image.created_at,
        replicas,
        owner: image.owner.map(|owner| owner.user),
        visibility: image.visibility,
        variants: Vec::new(),
    }
}

fn copy(shard: &str, state: ReplicaState) -> Replica {
    Replica { shard: shard.into(), state }
}

fn copy_ref(blob: &BlobKey, shard: &str) -> CopyRef {
    CopyRef { blob: blob.clone(), shard: shard.into() }
}

fn deleted(blob: &BlobKey, blob_unreferenced: bool) -> DeletedImage {
    DeletedImage { blob: blob.clone(), blob_unreferenced, unreferenced_variant_blobs: Vec::new() }
}

fn ids(records: &[ImageRecord]) -> Vec<Uuid> {
    records.iter().map(|record| record.id).collect()
}

/// Uploads as the upload path does: lock the blob, then record the copies and the image.
async fn upload(store: &dyn MetadataStore, image: &NewImage, copies: &[Replica]) -> ImageRecord {
    let guard = store.lock_blob_for_upload(&image.blob, image.file_size).await.expect("locking the blob");
    guard.commit(image, copies).await.expect("committing the upload")
}

fn copy_task(blob: &BlobKey, shard: &str) -> (TaskKind, CopyRef) {
    (TaskKind::Copy, copy_ref(blob, shard))
}

fn delete_task(blob: &BlobKey, shard: &str) -> (TaskKind, CopyRef) {
    (TaskKind::Delete, copy_ref(blob, shard))
}

/// What the tasks are about, sorted by kind, blob and shard.
fn targets(tasks: &[ReplicationTask]) -> Vec<(TaskKind, CopyRef)> {
    let mut targets: Vec<_> = tasks.iter().map(|task| (task.kind, task.copy.clone())).collect();
    targets.sort_by(|a, b| (a.0.as_str(), &a.1.blob, &a.1.shard).cmp(&(b.0.as_str(), &b.1.blob, &b.1.shard)));
    targets
}

fn shards(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

fn usage(shard: &str, state: ReplicaState, copies: u64, bytes: u64) -> ShardUsage {
    ShardUsage { shard: shard.into(), state, copies, bytes }
}

/// A blob of the size `new_image` gives its images.
fn blob_copies(blob: &BlobKey, ref_count: u64, replicas: Vec<Replica>) -> BlobCopies {
    BlobCopies { blob: blob.clone(), size: 1234, ref_count, replicas }
}

async fn claim(store: &dyn MetadataStore, worker: &str) -> Option<ReplicationTask> {
    store.claim_task(worker, LEASE).await.expect("claiming a task")
}

/// Claims every due task, oldest first.
async fn claim_all(store: &dyn MetadataStore, worker: &str) -> Vec<ReplicationTask> {
    let mut tasks = Vec::new();
    while let Some(task) = claim(store, worker).await {
        assert!(tasks.len() < 100, "claims never run dry: claimed tasks are claimed again");
        tasks.push(task);
    }
    tasks
}

async fn stats(store: &dyn MetadataStore) -> QueueStats {
    store.queue_stats().await.expect("reading the queue statistics")
}

/// Deletes one copy as the deletion worker does.
async fn delete_copy(store: &dyn MetadataStore, copy: &CopyRef) {
    let guard = store.lock_copy_for_deletion(copy).await.expect("locking the copy");
    guard.expect("the copy awaits deletion").commit().await.expect("committing the deletion");
}

async fn replicas_of(store: &dyn MetadataStore, id: Uuid) -> Vec<Replica> {
    store.find_image(id).await.unwrap().expect("the image exists").replicas
}

/// Every copy awaiting deletion, in shard order (copies marked at once have no other order).
async fn awaiting_deletion(store: &dyn MetadataStore) -> Vec<CopyRef> {
    let blobs = store.list_blob_copies(None, 1000).await.unwrap();
    let mut copies: Vec<CopyRef> = blobs
        .into_iter()
        .flat_map(|blob| {
            let key = blob.blob;
            blob.replicas
                .into_iter()
                .filter(|replica| replica.state == ReplicaState::Deleting)
                .map(move |replica| CopyRef { blob: key.clone(), shard: replica.shard })
        })
        .collect();
    copies.sort_by(|a, b| (&a.blob, &a.shard).cmp(&(&b.blob, &b.shard)));
    copies
}

/// Every image id, read `limit` at a time by following each page's last position.
async fn page_through(store: &dyn MetadataStore, limit: u32) -> Vec<Uuid> {
    let mut seen = Vec::new();
    let mut after: Option<ListPosition> = None;
    loop {
        let page = store.list_images(limit, after.as_ref(), None).await.unwrap();
        assert!(page.len() <= limit as usize);
        let Some(last) = page.last() else {
            return seen;
        };
        after = Some(ListPosition { created_at: last.created_at, id: last.id });
        seen.extend(ids(&page));
    }
}

async fn blob_row_exists(url: &str, blob: &BlobKey) -> bool {
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM blobs WHERE checksum = ?1)")
            .bind(blob.as_str())
            .fetch_one(&mut conn)
            .await
            .unwrap()
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM blobs WHERE checksum = $1)")
            .bind(blob.as_str())
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }
}

fn new_variant(image: Uuid, name: &str, blob: &BlobKey) -> metadata::NewVariant {
    metadata::NewVariant {
        image,
        name: name.into(),
        fingerprint: "v1:256x256:cover:q82:png".into(),
        blob: blob.clone(),
        content_type: "image/jpeg".into(),
        width: 256,
        height: 192,
        file_size: 1234,
    }
}

async fn variants_are_queued_recorded_shared_and_released(store: Arc<dyn MetadataStore>) {
    use metadata::{VariantRecorded, VariantState};
    let names = vec!["thumb".to_owned(), "preview".to_owned()];
    let first = NewImage { variants: names.clone(), ..new_image(&blob(1), now()) };
    upload(&*store, &first, &[copy("a", ReplicaState::Stored)]).await;
    let second = NewImage { variants: names, ..new_image(&blob(1), now()) };
    assert!(store.insert_image_for_live_blob(&second).await.unwrap().is_some());
    assert_eq!(store.variant_queue_depth().await.unwrap(), 4, "one task per variant, on both paths");

    // Claimed one at a time, each once.
    let task = store.claim_variant_task("w1", LEASE).await.unwrap().expect("a due task");
    let other = store.claim_variant_task("w2", LEASE).await.unwrap().expect("another");
    assert_ne!(task.id, other.id);
    assert!(store.fail_variant_task(task.id, "w1", "a shard is down", Duration::ZERO).await.unwrap());
    assert!(!store.finish_variant_task(task.id, "w1").await.unwrap(), "a failed attempt releases the claim");
    assert!(store.finish_variant_task(other.id, "w2").await.unwrap());
    assert_eq!(store.release_variant_claims("w1").await.unwrap(), 0);

    // The first image's thumb: new bytes, through the upload guard.
    let thumb = blob(9);
    let guard = store.lock_blob_for_upload(&thumb, 1234).await.unwrap();
    let recorded = guard
        .commit_variant(
            &new_variant(first.id, "thumb", &thumb),
            &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)],
        )
        .await
        .unwrap();
    assert_eq!(recorded, VariantRecorded::Recorded);
    let found = store.find_variant(first.id, "thumb").await.unwrap().unwrap();
    assert_eq!((found.state, found.blob.as_ref(), found.width), (VariantState::Ready, Some(&thumb), 256));
    assert_eq!(store.find_image(first.id).await.unwrap().unwrap().variants, vec![found]);
    let queue = store.queue_stats().await.unwrap();
    assert_eq!(queue.copy_tasks, 1, "the variant's pending copy gets a replication task");

    // The second image's identical thumb references the same blob.
    let shared = store.record_variant_for_live_blob(&new_variant(second.id, "thumb", &thumb)).await.unwrap();
    assert_eq!(shared, VariantRecorded::Recorded);
    assert_eq!(store.find_blob_copies(&thumb).await.unwrap().unwrap().ref_count, 2);
    let absent = store.record_variant_for_live_blob(&new_variant(second.id, "preview", &blob(10))).await.unwrap();
    assert_eq!(absent, VariantRecorded::BlobNotLive);

    // Deleting releases the variants' references; the last one marks the copies for deletion.
    let deleted = store.delete_image(first.id).await.unwrap().unwrap();
    assert!(deleted.unreferenced_variant_blobs.is_empty());
    assert_eq!(store.find_blob_copies(&thumb).await.unwrap().unwrap().ref_count, 1);
    let deleted = store.delete_image(second.id).await.unwrap().unwrap();
    assert_eq!(deleted.unreferenced_variant_blobs, vec![thumb.clone()]);
    let copies = store.find_blob_copies(&thumb).await.unwrap().unwrap();
    assert!(copies.replicas.iter().all(|r| r.state == ReplicaState::Deleting), "{copies:?}");
    assert_eq!(store.variant_queue_depth().await.unwrap(), 0, "the tasks went with their images");
}

async fn a_failed_variant_keeps_its_reason_and_a_deleted_image_records_nothing(store: Arc<dyn MetadataStore>) {
    use metadata::{VariantRecorded, VariantState};
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored)]).await;
    let recorded = store.record_variant_failure(image.id, "thumb", "v1", "cannot be decoded").await.unwrap();
    assert_eq!(recorded, VariantRecorded::Recorded);
    let failed = store.find_variant(image.id, "thumb").await.unwrap().unwrap();
    assert_eq!(
        (failed.state, failed.blob, failed.reason.as_deref()),
        (VariantState::Failed, None, Some("cannot be decoded"))
    );

    store.delete_image(image.id).await.unwrap().unwrap();
    let gone = store.record_variant_failure(image.id, "thumb", "v1", "x").await.unwrap();
    assert_eq!(gone, VariantRecorded::ImageGone);
    let thumb = blob(9);
    let guard = store.lock_blob_for_upload(&thumb, 1234).await.unwrap();
    let recorded =
        guard.commit_variant(&new_variant(image.id, "thumb", &thumb), &[copy("a", ReplicaState::Stored)]).await;
    assert_eq!(recorded.unwrap(), VariantRecorded::ImageGone);
    assert!(store.find_blob_copies(&thumb).await.unwrap().is_none(), "rolled back: no blob row, no copy");
}

/// Deadlocks Postgres would break by failing one side. Each test holds a row lock from a
/// connection of its own so that two operations meet where the old lock orders crossed,
/// and then expects both to finish. (SQLite serializes writers: nothing to cross.)
mod lock_order {
    use super::*;
    use chitram::metadata::{ImageOwner, NewUser, Quota, Role, VariantRecorded};
    use sqlx::PgConnection;

    /// A deletion waits on the variant row `lock` holds while it holds the image; a variant
    /// of the same image, over the blob the image's thumb already uses, is then recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deletion_and_a_variant_over_a_shared_blob_both_finish() {
        let db = TestDatabase::create(DbKind::Postgres).await;
        let store = open_store(&db).await;
        let names = vec!["thumb".to_owned(), "preview".to_owned()];
        let image = NewImage { variants: names, ..new_image(&blob(1), now()) };
        upload(&*store, &image, &[copy("a", ReplicaState::Stored)]).await;
        let thumb = blob(9);
        let guard = store.lock_blob_for_upload(&thumb, 1234).await.unwrap();
        let stored = [copy("a", ReplicaState::Stored)];
        guard.commit_variant(&new_variant(image.id, "thumb", &thumb), &stored).await.unwrap();

        let mut lock = PgConnection::connect(&db.url).await.unwrap();
        // Watched from a connection of its own: inside a transaction, `pg_stat_activity` is a
        // snapshot taken at its first read.
        let mut observer = PgConnection::connect(&db.url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut lock).await.unwrap();
        sqlx::query("SELECT 1 FROM image_variants WHERE image_id = $1 AND name = 'thumb' FOR UPDATE")
            .bind(image.id)
            .execute(&mut lock)
            .await
            .unwrap();
        let deleting = tokio::spawn({
            let store = store.clone();
            async move { store.delete_image(image.id).await }
        });
        assert!(wait_for_lock_waiters(&mut observer, 1).await, "the deletion waits");
        let recording = tokio::spawn({
            let (store, preview) = (store.clone(), new_variant(image.id, "preview", &thumb));
            async move { store.record_variant_for_live_blob(&preview).await }
        });
        assert!(wait_for_lock_waiters(&mut observer, 2).await, "the recording waits");
        sqlx::query("COMMIT").execute(&mut lock).await.unwrap();

        let deleted = deleting.await.unwrap().expect("the deletion finishes").expect("the image existed");
        assert_eq!(deleted.unreferenced_variant_blobs, vec![thumb.clone()]);
        let recorded = recording.await.unwrap().expect("the variant's recording finishes");
        assert_eq!(recorded, VariantRecorded::ImageGone);
        let copies = store.find_blob_copies(&thumb).await.unwrap().unwrap();
        assert_eq!(copies.ref_count, 0, "{copies:?}");
        assert!(copies.replicas.iter().all(|r| r.state == ReplicaState::Deleting), "{copies:?}");
    }

    /// An owner deletes an image while uploading the same bytes again: the deletion waits for
    /// the owner's row `lock` holds (its refund), then the upload takes the blob and waits for
    /// the owner's row too (its charge).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deletion_and_an_upload_of_the_same_bytes_by_the_same_owner_both_finish() {
        let db = TestDatabase::create(DbKind::Postgres).await;
        let store = open_store(&db).await;
        let user = NewUser {
            id: Uuid::new_v4(),
            username: "ada".into(),
            password_hash: None,
            role: Role::User,
            external_subject: None,
            created_at: now(),
        };
        store.create_user(&user).await.unwrap().expect("a new user");
        let owner = ImageOwner { user: user.id, default_quota: Quota { bytes: None, images: None }, unlimited: false };
        let first = NewImage { owner: Some(owner), ..new_image(&blob(1), now()) };
        upload(&*store, &first, &[copy("a", ReplicaState::Stored)]).await;

        let mut lock = PgConnection::connect(&db.url).await.unwrap();
        // Watched from a connection of its own: inside a transaction, `pg_stat_activity` is a
        // snapshot taken at its first read.
        let mut observer = PgConnection::connect(&db.url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut lock).await.unwrap();
        sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR UPDATE").bind(user.id).execute(&mut lock).await.unwrap();
        let deleting = tokio::spawn({
            let store = store.clone();
            async move { store.delete_image(first.id).await }
        });
        assert!(wait_for_lock_waiters(&mut observer, 1).await, "the deletion waits");
        let second = NewImage { owner: Some(owner), ..new_image(&blob(1), now()) };
        let uploading = tokio::spawn({
            let (store, second) = (store.clone(), second.clone());
            async move { store.insert_image_for_live_blob(&second).await }
        });
        assert!(wait_for_lock_waiters(&mut observer, 2).await, "the upload waits");
        sqlx::query("COMMIT").execute(&mut lock).await.unwrap();

        let deleted = deleting.await.unwrap().expect("the deletion finishes").expect("the image existed");
        assert!(deleted.blob_unreferenced, "its last reference");
        let uploaded = uploading.await.unwrap().expect("the upload finishes");
        assert_eq!(uploaded, None, "the blob went first: the upload stores its bytes anew");
        let usage = store.find_user(user.id).await.unwrap().expect("the user").usage;
        assert_eq!((usage.bytes, usage.images), (0, 0), "refunded, and not charged for an image not made");
    }

    /// Waits until `count` sessions of this database wait for a lock; false after 10 s.
    async fn wait_for_lock_waiters(conn: &mut PgConnection, count: i64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut *conn)
            .await
            .unwrap();
            if waiting >= count {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}
