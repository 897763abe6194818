//! The behavioural suite of the metadata store. Every behaviour is one function over the
//! trait, run on a fresh SQLite database and on a fresh Postgres database.

#[path = "common/database.rs"]
mod database;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chitram::blob::BlobKey;
use chitram::metadata::{
    self, CopyRef, DeletedImage, ImageRecord, ListPosition, MetadataStore, NewImage, Replica, ReplicaCounts,
    ReplicaState,
};
use chrono::{DateTime, Utc};
use sqlx::Connection;
use uuid::Uuid;

use database::{DbKind, TestDatabase};

/// How long a concurrency test gives a second task to (wrongly) get past a lock. The tests
/// pass or fail on the order of events, not on this delay; it only gives a bug its chance.
const OVERTAKING_CHANCE: Duration = Duration::from_millis(300);

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
    ping_answers,
    an_upload_round_trips,
    an_unknown_image_is_not_found,
    dedup_ignores_an_absent_blob,
    dedup_ignores_an_unreferenced_blob,
    dedup_ignores_a_blob_without_a_stored_copy,
    dedup_adds_a_reference_to_a_live_blob,
    the_list_is_newest_first_and_pages_neither_repeat_nor_skip,
    deleting_the_last_reference_marks_every_copy_deleting,
    deleting_another_reference_leaves_the_copies_alone,
    deleting_an_unknown_image_is_none,
    an_upload_resurrects_a_blob_and_forgets_unlisted_deleting_copies,
    an_upload_never_downgrades_a_stored_copy,
    set_replica_state_changes_only_recorded_copies,
    copies_are_counted_by_state,
    a_dropped_guard_changes_nothing,
    a_copy_deletion_lock_holds_back_an_upload_of_its_blob,
    an_upload_lock_holds_back_the_deletion_of_a_copy,
);

on_both_databases!(with_store_and_url:
    deleting_every_copy_forgets_the_blob,
    an_unreferenced_blob_without_copies_is_forgotten_at_once,
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

async fn open_store(db: &TestDatabase) -> Arc<dyn MetadataStore> {
    let store = metadata::connect(&db.url).await.expect("opening the metadata store");
    store.migrate().await.expect("migrating the metadata store");
    store
}

// ---- behaviours ----

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

    let everything = store.list_images(100, None).await.unwrap();
    assert_eq!(ids(&everything), newest_first);
    assert!(everything.iter().all(|record| record.replicas == [copy("a", ReplicaState::Stored)]));

    for limit in 1..=4 {
        assert_eq!(page_through(&*store, limit).await, newest_first, "paging {limit} at a time");
    }
    assert!(store.list_images(0, None).await.unwrap().is_empty());
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

async fn set_replica_state_changes_only_recorded_copies(store: Arc<dyn MetadataStore>) {
    let image = new_image(&blob(1), now());
    upload(&*store, &image, &[copy("a", ReplicaState::Stored), copy("b", ReplicaState::Pending)]).await;

    store.set_replica_state(&copy_ref(&blob(1), "a"), ReplicaState::Missing).await.unwrap();
    store.set_replica_state(&copy_ref(&blob(1), "b"), ReplicaState::Stored).await.unwrap();
    store.set_replica_state(&copy_ref(&blob(1), "z"), ReplicaState::Stored).await.unwrap();
    store.set_replica_state(&copy_ref(&blob(2), "a"), ReplicaState::Stored).await.unwrap();

    let expected = [copy("a", ReplicaState::Missing), copy("b", ReplicaState::Stored)];
    assert_eq!(replicas_of(&*store, image.id).await, expected);
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

// ---- tests outside the shared suite ----

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
    }
}

fn copy(shard: &str, state: ReplicaState) -> Replica {
    Replica { shard: shard.into(), state }
}

fn copy_ref(blob: &BlobKey, shard: &str) -> CopyRef {
    CopyRef { blob: blob.clone(), shard: shard.into() }
}

fn deleted(blob: &BlobKey, blob_unreferenced: bool) -> DeletedImage {
    DeletedImage { blob: blob.clone(), blob_unreferenced }
}

fn ids(records: &[ImageRecord]) -> Vec<Uuid> {
    records.iter().map(|record| record.id).collect()
}

/// Uploads as the upload path does: lock the blob, then record the copies and the image.
async fn upload(store: &dyn MetadataStore, image: &NewImage, copies: &[Replica]) -> ImageRecord {
    let guard = store.lock_blob_for_upload(&image.blob, image.file_size).await.expect("locking the blob");
    guard.commit(image, copies).await.expect("committing the upload")
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
    let mut copies = store.copies_awaiting_deletion(100).await.unwrap();
    copies.sort_by(|a, b| (&a.blob, &a.shard).cmp(&(&b.blob, &b.shard)));
    copies
}

/// Every image id, read `limit` at a time by following each page's last position.
async fn page_through(store: &dyn MetadataStore, limit: u32) -> Vec<Uuid> {
    let mut seen = Vec::new();
    let mut after: Option<ListPosition> = None;
    loop {
        let page = store.list_images(limit, after.as_ref()).await.unwrap();
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
