//! Durable asynchronous replication, read repair and circuit breakers, over in-process S3
//! servers and Postgres.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::database::{TaskQueue, claimed_tasks, slow_down_claim_commits};
use common::images::{large_png, png, sha256_hex};
use common::s3::Faults;
use common::{Backends, TestApp, TestOptions, assert_error, eventually, replica_states, spawn_app_with};
use reqwest::StatusCode;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(60);

fn with_workers(workers: usize) -> TestOptions {
    TestOptions { workers, ..TestOptions::default() }
}

/// Every image has `rf` stored copies, and each stored copy's bytes hash to its checksum.
async fn assert_fully_replicated(app: &TestApp, ids: &[String], rf: usize) {
    for id in ids {
        let image = app.image(id).await;
        let stored: Vec<String> =
            replica_states(&image).into_iter().filter(|(_, state)| state == "stored").map(|(shard, _)| shard).collect();
        assert_eq!(stored.len(), rf, "{image}");
        let checksum = image["checksum"].as_str().unwrap();
        for shard in stored {
            let bytes = std::fs::read(app.object_path(&shard, checksum)).unwrap();
            assert_eq!(sha256_hex(&bytes), checksum, "the copy on {shard} is intact");
        }
    }
}

async fn queue_depth(app: &TestApp) -> u64 {
    let status: Value = app.get("/api/v1/admin/replication").await.json().await.unwrap();
    status["queue_depth"].as_u64().unwrap()
}

/// Drives the workers (the test's own, one step at a time) until every image has two intact
/// stored copies, giving failed tasks their retry delay between rounds.
async fn retry_until_replicated(app: &TestApp, ids: &[String], what: &str) {
    eventually(CONVERGE, what, || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        app.replicate_until_idle().await;
        converged(app, ids, 2).await
    })
    .await;
    assert_fully_replicated(app, ids, 2).await;
}

async fn converged(app: &TestApp, ids: &[String], rf: usize) -> bool {
    if queue_depth(app).await > 0 {
        return false;
    }
    for id in ids {
        let image = app.image(id).await;
        if replica_states(&image).iter().filter(|(_, state)| state == "stored").count() != rf {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_with_a_shard_down_converges_once_it_returns() {
    let app = spawn_app_with(Backends::POSTGRES_S3, with_workers(2)).await;
    app.take_shard_offline("s1").await;

    let mut uploaded = Vec::new();
    for burst in 0..5u64 {
        let uploads = (0..6u64).map(|i| {
            let bytes = png(16, 16, 10_000 + burst * 10 + i);
            let app = &app;
            async move { (app.upload_ok("burst.png", bytes.clone()).await, bytes) }
        });
        uploaded.extend(futures::future::join_all(uploads).await);
    }
    for (image, bytes) in &uploaded {
        let download = app.download(image["id"].as_str().unwrap()).await;
        assert_eq!(download.bytes().await.unwrap().to_vec(), *bytes, "readable while the shard is down");
    }
    let status: Value = app.get("/api/v1/admin/replication").await.json().await.unwrap();
    assert!(status["queue_depth"].as_u64().unwrap() > 0, "copies for s1 wait in the queue: {status}");
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "degraded", "{health}");

    app.bring_shard_online("s1").await;
    let ids: Vec<String> = uploaded.iter().map(|(image, _)| image["id"].as_str().unwrap().to_owned()).collect();
    eventually(CONVERGE, "every image has two stored copies", || converged(&app, &ids, 2)).await;
    assert_fully_replicated(&app, &ids, 2).await;
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "ok", "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_are_recorded_per_shard_and_retried() {
    let app = spawn_app_with(Backends::POSTGRES_S3, TestOptions::default()).await;
    app.take_shard_offline("s2").await;
    let mut ids = Vec::new();
    for seed in 0..10 {
        ids.push(app.upload_ok("f.png", png(4, 4, 20_000 + seed)).await["id"].as_str().unwrap().to_owned());
    }
    let outcomes = app.replicate_until_idle().await;
    assert!(
        outcomes.iter().any(|o| matches!(o, chitram::replication::worker::StepOutcome::Failed { .. })),
        "{outcomes:?}"
    );
    let status: Value = app.get("/api/v1/admin/replication").await.json().await.unwrap();
    let s2 = status["shards"].as_array().unwrap().iter().find(|s| s["name"] == "s2").unwrap();
    assert!(s2["failing_tasks"].as_u64().unwrap() > 0, "{status}");
    assert!(s2["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{status}");
    assert!(status["oldest_task_age_secs"].as_f64().is_some(), "{status}");

    app.bring_shard_online("s2").await;
    retry_until_replicated(&app, &ids, "the failed tasks are retried and succeed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_share_the_work() {
    let first = spawn_app_with(Backends::POSTGRES_S3, with_workers(2)).await;
    // A second instance: same database, same shards, its own workers.
    let second = first.spawn_sibling(2).await;
    first.take_shard_offline("s0").await;
    let mut ids = Vec::new();
    for seed in 0..16 {
        let bytes = png(4, 4, 30_000 + seed);
        let image = if seed % 2 == 0 {
            first.upload_ok("two.png", bytes).await
        } else {
            second.upload_ok("two.png", bytes).await
        };
        ids.push(image["id"].as_str().unwrap().to_owned());
    }
    first.bring_shard_online("s0").await;
    eventually(CONVERGE, "both instances drained the shared queue", || converged(&first, &ids, 2)).await;
    assert_fully_replicated(&first, &ids, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_copy_is_detected_on_read_and_repaired() {
    let app = spawn_app_with(Backends::POSTGRES_S3, TestOptions::default()).await;
    let small = png(8, 8, 40_000);
    let large = large_png(3 * 1024 * 1024, 40_001);
    let mut ids = Vec::new();
    for bytes in [&small, &large] {
        ids.push(app.upload_ok("c.png", bytes.clone()).await["id"].as_str().unwrap().to_owned());
    }
    app.replicate_until_idle().await;
    assert_fully_replicated(&app, &ids, 2).await;

    for (id, bytes) in ids.iter().zip([&small, &large]) {
        let image = app.image(id).await;
        let checksum = image["checksum"].as_str().unwrap();
        // Corrupt the copy a read tries first: same length, one byte flipped.
        let first = app.read_order(&image)[0].clone();
        let path = app.object_path(&first, checksum);
        let mut corrupt = std::fs::read(&path).unwrap();
        let middle = corrupt.len() / 2;
        corrupt[middle] ^= 0xff;
        std::fs::write(&path, &corrupt).unwrap();

        let read = app.download(id).await;
        if bytes.len() <= 1024 * 1024 {
            // Small blobs are checked before sending: the client gets the good copy.
            assert_eq!(read.bytes().await.unwrap().to_vec(), *bytes);
        } else {
            // Large blobs stream; the corrupt copy ends the transfer with an error instead of
            // passing off wrong bytes.
            assert!(read.bytes().await.is_err(), "the transfer fails rather than deliver corrupt bytes");
        }
        eventually(Duration::from_secs(10), "the bad copy is recorded missing", || async {
            replica_states(&app.image(id).await).contains(&(first.clone(), "missing".into()))
        })
        .await;
        app.replicate_until_idle().await;
        assert_eq!(sha256_hex(&std::fs::read(&path).unwrap()), checksum, "repaired from the good copy");
        assert_eq!(app.download(id).await.bytes().await.unwrap().to_vec(), *bytes);
    }
    assert_fully_replicated(&app, &ids, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_shard_does_not_slow_reads_of_replicated_blobs() {
    let options = TestOptions {
        adjust: Some(|settings| {
            settings.replication.breaker_cooldown_ms = 30_000;
            for shard in &mut settings.shards {
                shard.timeout_secs = Some(2);
            }
        }),
        ..TestOptions::default()
    };
    let app = spawn_app_with(Backends::POSTGRES_S3, options).await;
    let mut ids = Vec::new();
    for seed in 0..12 {
        ids.push(app.upload_ok("h.png", png(8, 8, 50_000 + seed)).await["id"].as_str().unwrap().to_owned());
    }
    app.replicate_until_idle().await;
    // Reads of blobs whose first holder is s0: those are the ones a dead s0 could slow.
    let mut victims = Vec::new();
    for id in &ids {
        if app.read_order(&app.image(id).await)[0] == "s0" {
            victims.push(id.clone());
        }
    }
    assert!(!victims.is_empty(), "some blobs are read from s0 first");

    let healthy = median_read(&app, &victims, 30).await;
    app.shard_s3("s0").hang().await;
    // The first reads pay a timeout each until the circuit opens (3 failures).
    for id in victims.iter().cycle().take(3) {
        assert_eq!(app.download(id).await.status(), StatusCode::OK);
    }
    let degraded = median_read(&app, &victims, 30).await;
    let ratio = degraded.as_secs_f64() / healthy.as_secs_f64();
    println!("median read: s0 up {healthy:?}, s0 hung {degraded:?}, ratio {ratio:.2}");
    // Without the breaker every read would wait out the 2 s timeout (a ratio in the hundreds).
    assert!(ratio < 5.0, "reads slowed {ratio:.1}x with a hung shard");
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["shards"][0]["circuit"], "open", "{health}");
}

async fn median_read(app: &TestApp, ids: &[String], reads: usize) -> Duration {
    let mut times = Vec::with_capacity(reads);
    for id in ids.iter().cycle().take(reads) {
        let started = Instant::now();
        let response = app.download(id).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.bytes().await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    times[reads / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_quorum_stores_copies_before_the_answer() {
    let options =
        TestOptions { adjust: Some(|settings| settings.placement.write_quorum = 2), ..TestOptions::default() };
    let app = spawn_app_with(Backends::POSTGRES_S3, options).await;
    let image = app.upload_ok("q.png", png(4, 4, 60_000)).await;
    let stored: HashSet<String> =
        replica_states(&image).into_iter().filter(|(_, s)| s == "stored").map(|(shard, _)| shard).collect();
    assert_eq!(stored.len(), 2, "{image}");
    assert_eq!(queue_depth(&app).await, 0, "nothing left to replicate");

    // One shard down: the third shard completes the quorum.
    app.take_shard_offline("s0").await;
    let image = app.upload_ok("q.png", png(4, 4, 60_001)).await;
    assert_eq!(replica_states(&image).iter().filter(|(_, s)| s == "stored").count(), 2, "{image}");
    // Two down: the quorum cannot be met, nothing is recorded, and the one copy written is
    // removed before the answer.
    app.take_shard_offline("s1").await;
    let before = app.image_count().await;
    let refused = png(4, 4, 60_002);
    assert_error(app.upload("q.png", refused.clone()).await, StatusCode::SERVICE_UNAVAILABLE, "STORAGE_UNAVAILABLE")
        .await;
    assert_eq!(app.image_count().await, before);
    let key = sha256_hex(&refused);
    assert!(!app.object_path("s2", &key).exists(), "the refused upload's copy on s2 is gone");
    let blob = chitram::blob::BlobKey::parse(&key).unwrap();
    assert!(app.metadata.find_blob_copies(&blob).await.unwrap().is_none(), "and no blob row");
}

// ---------------------------------------------------------------------------------------------
// Eager copies: an upload writes its other copies from its own bytes after its commit.

fn eager_without_workers() -> TestOptions {
    TestOptions { workers: 0, eager_copies: 8, ..TestOptions::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_makes_its_other_copies_itself_with_no_worker_running() {
    let app = spawn_app_with(Backends::POSTGRES_S3, eager_without_workers()).await;
    let mut ids = Vec::new();
    // Small bodies stay in memory, large ones are spooled: both are copied from the upload.
    for (seed, bytes) in [png(8, 8, 30_001), large_png(600 * 1024, 30_002), png(9, 9, 30_003)].into_iter().enumerate() {
        let image = app.upload_ok(&format!("e{seed}.png"), bytes).await;
        ids.push(image["id"].as_str().unwrap().to_owned());
    }
    eventually(Duration::from_secs(10), "every image has both copies, with no worker", || converged(&app, &ids, 2))
        .await;
    assert_fully_replicated(&app, &ids, 2).await;
    // The spooled body is kept until its copy is written, and not a moment longer.
    eventually(Duration::from_secs(5), "the spool is empty", || async { app.spool_files() == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eager_copy_to_a_down_shard_is_recorded_as_failed_and_left_to_the_queue() {
    let app = spawn_app_with(Backends::POSTGRES_S3, eager_without_workers()).await;
    app.take_shard_offline("s2").await;
    let mut ids = Vec::new();
    for seed in 0..8 {
        ids.push(app.upload_ok("d.png", png(5, 5, 31_000 + seed)).await["id"].as_str().unwrap().to_owned());
    }
    // Every image is readable and has a stored copy; those meant for s2 wait in the queue with
    // the eager attempt's failure on record.
    eventually(Duration::from_secs(10), "the eager attempts on s2 are recorded as failures", || async {
        let status: Value = app.get("/api/v1/admin/replication").await.json().await.unwrap();
        let s2 = status["shards"].as_array().unwrap().iter().find(|s| s["name"] == "s2").unwrap().clone();
        s2["failing_tasks"].as_u64().unwrap() > 0 && s2["last_error"].as_str().is_some_and(|e| !e.is_empty())
    })
    .await;
    assert!(queue_depth(&app).await > 0, "the copies for s2 stay queued");
    for id in &ids {
        assert_eq!(app.download(id).await.status(), StatusCode::OK);
    }

    app.bring_shard_online("s2").await;
    retry_until_replicated(&app, &ids, "a worker finishes what the upload could not").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_deleted_while_its_eager_copy_is_written_leaves_no_copy_behind() {
    let app = spawn_app_with(Backends::POSTGRES_S3, eager_without_workers()).await;
    for seed in 0..6u64 {
        // Spooled, so the eager copy takes a moment: the deletion races it.
        let image = app.upload_ok("gone.png", large_png(700 * 1024, 32_000 + seed)).await;
        assert_eq!(app.delete(image["id"].as_str().unwrap()).await.status(), StatusCode::NO_CONTENT);
    }
    // Whatever order they ran in, the copies end deleted: by the deletion itself, or as
    // `deleting` copies the queue removes.
    eventually(CONVERGE, "every copy of the deleted images is gone", || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        app.replicate_until_idle().await;
        app.all_objects().is_empty() && queue_depth(&app).await == 0
    })
    .await;
    assert_eq!(app.image_count().await, 0);
    let copies = app.metadata.count_replicas_by_state().await.unwrap();
    assert_eq!(copies, Default::default(), "no copy is left recorded");
    eventually(Duration::from_secs(5), "the spool is empty", || async { app.spool_files() == 0 }).await;
}

/// Eager copies without workers, a shutdown grace of 1 s, and every PUT 3 s late: the first
/// copy's delays the 201, an eager copy's outlasts the grace.
async fn eager_app_with_a_short_grace_and_slow_puts() -> TestApp {
    let app = spawn_app_with(
        Backends::POSTGRES_S3,
        TestOptions { adjust: Some(|settings| settings.server.shutdown_grace_secs = 1), ..eager_without_workers() },
    )
    .await;
    for name in ["s0", "s1", "s2"] {
        let late = Faults { late: Some(Duration::from_secs(3)), late_method: Some("PUT"), ..Faults::default() };
        app.shard_s3(name).misbehave(late).await;
    }
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_stop_frees_the_tasks_of_eager_copies_still_running() {
    let mut app = eager_app_with_a_short_grace_and_slow_puts().await;
    let bytes = png(6, 6, 33_001);
    let image = app.upload_ok("slow.png", bytes.clone()).await;
    let pending: Vec<String> =
        replica_states(&image).into_iter().filter(|(_, state)| state == "pending").map(|(shard, _)| shard).collect();
    assert_eq!(pending.len(), 1, "one copy is left to make: {image}");
    let (metadata, blob) = (app.metadata.clone(), chitram::blob::BlobKey::parse(&sha256_hex(&bytes)).unwrap());
    let copy = chitram::metadata::CopyRef { blob, shard: pending[0].clone() };
    let url = app.database.url.clone();
    eventually(Duration::from_secs(2), "the upload has claimed its eager copy", || async {
        claimed_tasks(&url, TaskQueue::Replication).await == 1
    })
    .await;

    app.shut_down_gracefully().await;
    assert_eq!(claimed_tasks(&url, TaskQueue::Replication).await, 0, "no claim outlives the instance");
    // The copy was not made (the stop did not wait 3 s for it), its lease has 30 s to run, yet
    // the next instance's worker takes the task now.
    let task = metadata.claim_copy_task(&copy, "next-instance", Duration::from_secs(30)).await.unwrap();
    assert!(task.is_some(), "the unfinished eager copy's task is free at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_stop_during_an_eager_copys_claim_leaves_the_task_unclaimed() {
    let mut app = eager_app_with_a_short_grace_and_slow_puts().await;
    let url = app.database.url.clone();
    // The eager copy's claim spends 2 s in its COMMIT, past the 1 s grace, and its PUT would
    // then take 3 s. The stop lets the claim finish, keeps the copy from starting and releases
    // the claim. Releasing during the COMMIT, as the code before the fix did, matched no row:
    // the claim then committed and held the task while the copy went on.
    slow_down_claim_commits(&url, TaskQueue::Replication).await;
    app.upload_ok("claimed.png", png(6, 6, 33_101)).await;
    app.shut_down_while_a_claim_commits().await;
    assert_eq!(claimed_tasks(&url, TaskQueue::Replication).await, 0, "no claim outlives the instance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eager_copies_and_workers_racing_for_the_same_tasks_converge() {
    // Workers polling every 50 ms and eager copies claim the same tasks: whoever claims a task
    // first makes its copy, and the other leaves it.
    let app =
        spawn_app_with(Backends::POSTGRES_S3, TestOptions { workers: 2, eager_copies: 8, ..TestOptions::default() })
            .await;
    let uploads = (0..12u64).map(|seed| {
        let app = &app;
        async move { app.upload_ok("both.png", png(6, 6, 33_000 + seed)).await["id"].as_str().unwrap().to_owned() }
    });
    let ids: Vec<String> = futures::future::join_all(uploads).await;
    eventually(CONVERGE, "every image has both copies", || converged(&app, &ids, 2)).await;
    assert_fully_replicated(&app, &ids, 2).await;
    let copies = app.metadata.count_replicas_by_state().await.unwrap();
    assert_eq!(copies, chitram::metadata::ReplicaCounts { stored: 24, ..Default::default() });
}

// ---------------------------------------------------------------------------------------------
// Shutdown: claims never outlive the instance.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_stop_during_a_workers_claim_leaves_the_task_unclaimed() {
    let mut app = spawn_app_with(Backends::POSTGRES_S3, with_workers(1)).await;
    let url = app.database.url.clone();
    // Every claim's COMMIT now takes 2 s, so the stop below comes while one is in flight. The
    // worker finishes its claim, gives the task up and releases it. A worker that dropped its
    // claim there would release nothing, and the COMMIT would then hold the task for a lease
    // (as CI once saw; this test fails so on the code before the fix).
    slow_down_claim_commits(&url, TaskQueue::Replication).await;
    app.upload_ok("claimed.png", png(5, 5, 34_001)).await;
    app.shut_down_while_a_claim_commits().await;
    assert_eq!(claimed_tasks(&url, TaskQueue::Replication).await, 0, "no claim outlives the instance");
}
