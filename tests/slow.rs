//! Slow is the new down: a shard that answers, but late (a MinIO under GC, a saturated disk), or
//! stops sending a body halfway. Writes go around it within their deadline, nothing holds a
//! database lock on it, reads hedge to another holder, and background copies give up on a
//! stalled body. Over in-process S3 servers that misbehave on purpose, on SQLite and Postgres.

mod common;

use std::time::{Duration, Instant};

use chitram::blob::BlobKey;
use chitram::placement::ring::{Ring, key_hash};
use chitram::replication::worker::StepOutcome;
use common::database::DbKind;
use common::images::{decodable_jpeg, large_png, png, sha256_hex};
use common::s3::Faults;
use common::{Backends, StorageKind, TestApp, TestOptions, eventually, replica_states, spawn_app_with};
use reqwest::StatusCode;
use serde_json::Value;

/// How late the slow shard answers: the figure from the issue.
const LATE: Duration = Duration::from_secs(20);

/// Runs each named test body (an `async fn(DbKind)`) over S3 shards on both databases.
macro_rules! on_both_databases {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                use super::DbKind;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite_s3() { super::$name(DbKind::Sqlite).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres_s3() { super::$name(DbKind::Postgres).await }
            }
        )+
    };
}

on_both_databases!(
    uploads_go_around_a_late_shard_without_slowing_others,
    a_late_confirmation_is_not_recorded_and_holds_no_lock,
    reads_hedge_around_a_late_holder,
    a_write_quorum_writes_its_copies_at_once,
    a_client_gone_mid_delete_leaves_the_late_copy_fenced,
    a_variant_whose_image_goes_while_it_is_written_leaves_no_object,
);

fn s3_on(db: DbKind) -> Backends {
    Backends { db, storage: StorageKind::S3 }
}

/// The first shard of a blob's preference list, computed as the router does.
fn primary(app: &TestApp, bytes: &[u8]) -> String {
    let ring = Ring::new(app.settings.ring_members(), app.settings.placement.vnodes_per_weight).unwrap();
    let checksum = sha256_hex(bytes);
    let first = ring.preference_list(key_hash(checksum.as_bytes())).next().unwrap();
    ring.members()[first].name.clone()
}

/// `count` distinct images from `seeds` whose primary is (or, with `wanted = false`, is not) `shard`.
fn images_with_primary(app: &TestApp, shard: &str, wanted: bool, seeds: u64, count: usize) -> Vec<Vec<u8>> {
    (seeds..seeds + 10_000)
        .map(|seed| png(8, 8, seed))
        .filter(|bytes| (primary(app, bytes) == shard) == wanted)
        .take(count)
        .collect()
}

fn stored_on(image: &Value) -> Vec<String> {
    replica_states(image).into_iter().filter(|(_, state)| state == "stored").map(|(shard, _)| shard).collect()
}

async fn timed_upload(app: &TestApp, bytes: Vec<u8>) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let response = app.upload("late.png", bytes).await;
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null), started.elapsed())
}

/// The reproduction: one of three S3 shards answers 20 s late, and 30 uploads arrive at
/// once. Before deadlines, a third of them waited on the slow shard (some for good, holding
/// SQLite's write lock through their size check) and 11 of 30 failed.
async fn uploads_go_around_a_late_shard_without_slowing_others(db: DbKind) {
    let app = spawn_app_with(s3_on(db), TestOptions::default()).await;
    let before = app.upload_ok("before.png", png(4, 4, 1)).await;
    let elsewhere = images_with_primary(&app, "s0", false, 900_000, 5);
    app.shard_s3("s0").misbehave(Faults { late: Some(LATE), ..Faults::default() }).await;

    let uploads = futures::future::join_all((0..30).map(|seed| timed_upload(&app, png(8, 8, 100_000 + seed))));
    // Meanwhile, requests that never touch the slow shard.
    let bystanders = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut slowest = Duration::ZERO;
        for bytes in elsewhere {
            let started = Instant::now();
            let id = before["id"].as_str().unwrap();
            assert_eq!(app.get(&format!("/api/v1/images/{id}")).await.status(), StatusCode::OK);
            assert_eq!(app.get("/api/v1/images?limit=5").await.status(), StatusCode::OK);
            let (status, _, _) = timed_upload(&app, bytes).await;
            assert_eq!(status, StatusCode::CREATED);
            slowest = slowest.max(started.elapsed());
        }
        slowest
    };
    let (results, slowest_bystander) = futures::future::join(uploads, bystanders).await;

    for (status, image, took) in &results {
        assert_eq!(*status, StatusCode::CREATED, "{image}");
        assert!(*took < LATE / 2, "an upload took {took:?}: it waited on the late shard");
        assert!(!stored_on(image).contains(&"s0".to_owned()), "nothing is confirmed on the late shard: {image}");
    }
    let write_sets_with_s0 =
        results.iter().filter(|(_, image, _)| replica_states(image).contains(&("s0".to_owned(), "pending".to_owned())));
    assert!(write_sets_with_s0.count() > 0, "some uploads belonged on the late shard, and went elsewhere");
    println!("slowest request that never touched the late shard: {slowest_bystander:?}");
    assert!(slowest_bystander < LATE / 10, "requests that never touch the late shard took {slowest_bystander:?}");
}

/// With a write quorum of two, both copies are written at once (a quorum costs its slowest
/// write, not the sum of its writes): both shards of the write set answer PUTs late, and each
/// has its PUT before either has answered.
async fn a_write_quorum_writes_its_copies_at_once(db: DbKind) {
    // Long enough that a loaded machine still starts both PUTs within half of it; the write
    // deadline is raised above it so that the late PUTs still count.
    const PUT_LATE: Duration = Duration::from_secs(6);
    let adjust = |settings: &mut chitram::config::Settings| {
        settings.placement.write_quorum = 2;
        settings.latency.write_deadline_ms = 20_000;
    };
    let options = TestOptions { adjust: Some(adjust), ..TestOptions::default() };
    let app = spawn_app_with(s3_on(db), options).await;
    let image = png(8, 8, 400_000);
    let write_set = app.router.write_set(&BlobKey::parse(&sha256_hex(&image)).unwrap());
    let late_puts = Faults { late: Some(PUT_LATE), late_method: Some("PUT"), ..Faults::default() };
    for shard in &write_set {
        app.shard_s3(shard).misbehave(late_puts.clone()).await;
    }
    let both_in_flight = eventually(PUT_LATE / 2, "both PUTs of the quorum in flight", || async {
        write_set.iter().all(|shard| app.shard_s3(shard).faults.delayed() == 1)
    });
    let (response, ()) = tokio::join!(app.upload("quorum.png", image), both_in_flight);
    assert_eq!(response.status(), StatusCode::CREATED);
    let image: Value = response.json().await.unwrap();
    let mut stored = stored_on(&image);
    stored.sort();
    let mut expected = write_set.clone();
    expected.sort();
    assert_eq!(stored, expected, "both copies stored before the answer");
}

/// The write succeeds but the size check under the blob's lock (a HEAD) is late: the lock is
/// released at the control deadline, the copy is not recorded, and the write goes elsewhere.
async fn a_late_confirmation_is_not_recorded_and_holds_no_lock(db: DbKind) {
    let app = spawn_app_with(s3_on(db), TestOptions::default()).await;
    let on_s0 = images_with_primary(&app, "s0", true, 200_000, 1).remove(0);
    let elsewhere = images_with_primary(&app, "s0", false, 300_000, 1).remove(0);
    let faults = Faults { late: Some(LATE), late_method: Some("HEAD"), ..Faults::default() };
    app.shard_s3("s0").misbehave(faults).await;

    let blocked = timed_upload(&app, on_s0);
    let bystander = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        timed_upload(&app, elsewhere).await
    };
    let ((status, image, took), (other_status, other, other_took)) = futures::future::join(blocked, bystander).await;
    assert_eq!(status, StatusCode::CREATED, "{image}");
    assert!(took < LATE / 4, "the upload waited {took:?} on the late HEAD");
    let stored = stored_on(&image);
    assert!(!stored.contains(&"s0".to_owned()), "an unconfirmed copy was recorded: {image}");
    assert_eq!(stored.len(), 1, "{image}");
    assert!(replica_states(&image).contains(&("s0".to_owned(), "pending".to_owned())), "{image}");
    assert!(app.shard_s3("s0").faults.delayed() >= 1, "the HEAD was really late");

    assert_eq!(other_status, StatusCode::CREATED, "{other}");
    println!("upload whose HEAD was late: {took:?}; concurrent upload elsewhere: {other_took:?}");
    assert!(other_took < LATE / 10, "a concurrent upload waited {other_took:?} for the lock");
    // The image reads back from its confirmed copy.
    let download = app.download(image["id"].as_str().unwrap()).await;
    assert_eq!(download.status(), StatusCode::OK);
}

/// An image with a copy on a late shard and one on a healthy shard is served at normal latency,
/// and the late shard's read is cancelled. Small blobs (checked whole) and large ones (checked
/// as they stream) alike; the bytes served are checked as before.
async fn reads_hedge_around_a_late_holder(db: DbKind) {
    let app = spawn_app_with(s3_on(db), TestOptions::default()).await;
    let small = images_with_primary(&app, "s0", true, 400_000, 1).remove(0);
    let large =
        (500_000..).map(|seed| large_png(2 * 1024 * 1024, seed)).find(|bytes| primary(&app, bytes) == "s0").unwrap();
    let mut images = Vec::new();
    for bytes in [small, large] {
        let image = app.upload_ok("hedge.png", bytes.clone()).await;
        images.push((image["id"].as_str().unwrap().to_owned(), bytes));
    }
    app.replicate_until_idle().await;
    for (id, bytes) in &images {
        let image = app.image(id).await;
        assert_eq!(stored_on(&image).len(), 2, "{image}");
        assert_eq!(app.read_order(&image)[0], "s0", "the late shard is the first holder");
        assert_eq!(app.download(id).await.bytes().await.unwrap().to_vec(), *bytes); // warm up
    }

    app.shard_s3("s0").misbehave(Faults { late: Some(LATE), ..Faults::default() }).await;
    for (id, bytes) in &images {
        let started = Instant::now();
        let download = app.download(id).await;
        assert_eq!(download.status(), StatusCode::OK);
        assert_eq!(download.bytes().await.unwrap().to_vec(), *bytes, "the checked bytes");
        let took = started.elapsed();
        println!("read of a {} byte image with its first holder 20 s late: {took:?}", bytes.len());
        assert!(took < LATE / 4, "the read waited {took:?} on the late holder");
    }
    // Every read that reached the late shard is cancelled, not left to wait out its 20 s. (On a
    // loaded machine a hedge can fire before a read's request is even sent to the late shard:
    // then there is nothing there to cancel, so the count is of those that reached it.)
    let late = app.shard_s3("s0").faults.clone();
    eventually(Duration::from_secs(5), "the late shard's reads are cancelled", || {
        let late = late.clone();
        async move { late.delayed() >= 1 && late.abandoned() == late.delayed() }
    })
    .await;
}

/// A body that stops moving fails the copy at the idle timeout; the task is retried with
/// backoff and succeeds once the shard streams again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_fails_the_copy_and_the_task_retries() {
    let options =
        TestOptions { adjust: Some(|settings| settings.latency.body_idle_ms = 300), ..TestOptions::default() };
    let app = spawn_app_with(Backends::POSTGRES_S3, options).await;
    let bytes = large_png(600 * 1024, 77);
    let image = app.upload_ok("stall.png", bytes.clone()).await;
    let holder = stored_on(&image).remove(0);
    app.shard_s3(&holder).misbehave(Faults { stall_after: Some(32 * 1024), ..Faults::default() }).await;

    let worker = app.replicator("stall-test");
    let started = Instant::now();
    let step = tokio::time::timeout(Duration::from_secs(15), worker.try_run_next())
        .await
        .expect("the step ends instead of waiting on the stalled body")
        .unwrap();
    let StepOutcome::Failed { error, .. } = step else { panic!("the copy should fail: {step:?}") };
    assert!(error.contains("sent no byte"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    let server = app.shard_s3(&holder);
    server.stop().await;
    server.restart().await;
    let id = image["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(20), "the retried copy succeeds", || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        app.replicate_until_idle().await;
        stored_on(&app.image(&id).await).len() == 2
    })
    .await;
}

/// A worker's copy onto a shard that takes a write and never answers fails at the write deadline
/// (here 1 s) instead of holding its task, claim renewed, for as long as the shard hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_onto_a_shard_that_never_answers_fails_at_the_write_deadline() {
    let options =
        TestOptions { adjust: Some(|settings| settings.latency.write_deadline_ms = 1_000), ..TestOptions::default() };
    let app = spawn_app_with(Backends::POSTGRES_S3, options).await;
    let image = app.upload_ok("target.png", png(64, 64, 800_000)).await;
    let pending = replica_states(&image).into_iter().find(|(_, state)| state == "pending").expect("a pending copy").0;
    let late_puts = Faults { late: Some(LATE), late_method: Some("PUT"), ..Faults::default() };
    app.shard_s3(&pending).misbehave(late_puts).await;

    let worker = app.replicator("hung-target");
    let step = tokio::time::timeout(LATE / 2, worker.try_run_next())
        .await
        .expect("the step ends at the write deadline, not when the shard answers")
        .unwrap();
    let StepOutcome::Failed { error, .. } = step else { panic!("the copy should fail: {step:?}") };
    assert!(error.contains("no answer from the shard within 1000 ms (write)"), "{error}");
    assert_eq!(app.shard_s3(&pending).faults.delayed(), 1, "the PUT really was held");
}

/// A worker's copy whose image is deleted while the copy's PUT is late leaves no object behind:
/// the copy's task is gone when it is to be recorded, the blob has no reference left, and the
/// worker removes what it wrote (before, an orphan until scrub's grace and next run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_copy_of_an_image_deleted_meanwhile_leaves_no_object() {
    let app = spawn_app_with(Backends::POSTGRES_S3, TestOptions::default()).await;
    let image = app.upload_ok("gone.png", png(64, 64, 900_000)).await;
    let id = image["id"].as_str().unwrap().to_owned();
    let pending = replica_states(&image).into_iter().find(|(_, state)| state == "pending").expect("a pending copy").0;
    let late_puts = Faults { late: Some(Duration::from_millis(1500)), late_method: Some("PUT"), ..Faults::default() };
    app.shard_s3(&pending).misbehave(late_puts).await;

    let worker = app.replicator("copying-a-deleted-image");
    let step = tokio::spawn(async move { worker.try_run_next().await.unwrap() });
    eventually(Duration::from_secs(10), "the worker's PUT is on its way", || async {
        app.shard_s3(&pending).faults.delayed() >= 1
    })
    .await;
    assert_eq!(app.delete(&id).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(step.await.unwrap(), StepOutcome::LostClaim, "the copy's task went with the image");
    assert!(app.all_objects().is_empty(), "left behind: {:?}", app.all_objects());
}

/// A client that hangs up during its DELETE does not cut the deletion of the copies short: a
/// DELETE the shard has not answered is bounded by its deadline and its copy fenced, as if the
/// client had waited. (Unfenced, the late DELETE could remove the copy of an upload of the same
/// bytes recorded after it.)
async fn a_client_gone_mid_delete_leaves_the_late_copy_fenced(db: DbKind) {
    let app = spawn_app_with(s3_on(db), TestOptions::default()).await;
    let bytes = images_with_primary(&app, "s0", true, 400_000, 1).remove(0);
    let image = app.upload_ok("doomed.png", bytes).await;
    assert!(stored_on(&image).contains(&"s0".to_owned()), "{image}");
    let id = image["id"].as_str().unwrap();
    let blob = BlobKey::parse(image["checksum"].as_str().unwrap()).unwrap();
    let faults = Faults { late: Some(LATE), late_method: Some("DELETE"), ..Faults::default() };
    app.shard_s3("s0").misbehave(faults).await;

    // The client leaves long before the shard answers, and before the DELETE's deadline (1 s).
    let request = app.client.delete(app.url(&format!("/api/v1/images/{id}"))).timeout(Duration::from_millis(200));
    assert!(request.send().await.is_err(), "the client gave up");
    let copy = chitram::metadata::CopyRef { blob, shard: "s0".to_owned() };
    eventually(Duration::from_secs(5), "the copy whose DELETE is late is fenced", || async {
        app.metadata.deletion_in_doubt(&copy).await.unwrap()
    })
    .await;
    assert_eq!(app.get(&format!("/api/v1/images/{id}")).await.status(), StatusCode::NOT_FOUND);
}

/// The same for a replication worker that stops while its delete task waits on a late DELETE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_delete_leaves_the_late_copy_fenced() {
    let app = spawn_app_with(Backends::POSTGRES_S3, TestOptions::default()).await;
    let bytes = images_with_primary(&app, "s0", true, 500_000, 1).remove(0);
    let image = app.upload_ok("doomed.png", bytes).await;
    let blob = BlobKey::parse(image["checksum"].as_str().unwrap()).unwrap();
    app.shard_s3("s0").misbehave(Faults { late: Some(LATE), late_method: Some("DELETE"), ..Faults::default() }).await;
    // The last reference goes; its copies' deletions are left to the queue.
    app.metadata.delete_image(image["id"].as_str().unwrap().parse().unwrap()).await.unwrap();

    let worker = app.replicator("stopping");
    let stop = tokio_util::sync::CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stopper.cancel();
    });
    // Steps until the stop: the delete task of s0 is cut short by it, the DELETE still in flight.
    while !matches!(worker.run_next_until(&stop).await.unwrap(), StepOutcome::Stopped) {}
    let copy = chitram::metadata::CopyRef { blob, shard: "s0".to_owned() };
    eventually(Duration::from_secs(5), "the copy whose DELETE is late is fenced", || async {
        app.metadata.deletion_in_doubt(&copy).await.unwrap()
    })
    .await;
}

/// A variant whose image is deleted while the variant's bytes are on their way to a late shard
/// is not recorded, and the copy it wrote is removed at once: before, it stayed an orphan until
/// scrub's grace and next run.
async fn a_variant_whose_image_goes_while_it_is_written_leaves_no_object(db: DbKind) {
    let app = spawn_app_with(s3_on(db), TestOptions::default()).await;
    let image = app.upload_ok("doomed.jpg", decodable_jpeg(640, 480, 600_000)).await;
    let id = image["id"].as_str().unwrap().to_owned();
    app.replicate_until_idle().await; // No PUT of the original's is left to be late.
    let late_puts = Faults { late: Some(Duration::from_millis(1500)), late_method: Some("PUT"), ..Faults::default() };
    for shard in 0..app.shards.len() {
        app.shard_s3(&common::shard_name(shard)).misbehave(late_puts.clone()).await;
    }
    let delayed =
        || (0..app.shards.len()).map(|i| app.shard_s3(&common::shard_name(i)).faults.delayed()).sum::<usize>();

    let thumb_path = format!("/api/v1/images/{id}/variants/thumb");
    let thumb = app.get(&thumb_path);
    let delete = async {
        eventually(Duration::from_secs(10), "the variant's PUT is on its way", || async { delayed() >= 1 }).await;
        app.delete(&id).await.status()
    };
    let (thumb, deleted) = futures::future::join(thumb, delete).await;
    assert_eq!(deleted, StatusCode::NO_CONTENT);
    assert_eq!(thumb.status(), StatusCode::NOT_FOUND, "the image went before its variant was recorded");
    assert!(app.all_objects().is_empty(), "left behind: {:?}", app.all_objects());
}
