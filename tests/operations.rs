//! Growing and shrinking the store: the exact plan, rebalance under traffic, resuming, draining,
//! refusing to start without a shard that holds the only copies, and scrub.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use chitram::app::{Application, StartError, open_storage};
use chitram::blob::BlobKey;
use chitram::config::{Settings, ShardSettings};
use chitram::maintenance::progress::{Progress, Silent};
use chitram::maintenance::rebalance::{self, RebalanceOptions};
use chitram::maintenance::scrub::{self, ScrubOptions};
use chitram::metadata::ReplicaState;
use chitram::placement::plan::write_set_names;
use chitram::placement::ring::key_hash;
use chitram::storage::router::StorageRouter;
use common::images::{png, sha256_hex};
use common::s3::S3Server;
use common::{BUCKET, Backends, TestApp, TestOptions, spawn_app_with};
use tokio_util::sync::CancellationToken;

fn options(stop: CancellationToken) -> RebalanceOptions {
    RebalanceOptions { concurrency: 4, bytes_per_sec: None, spool_dir: None, verify_kept: false, stop }
}

async fn upload_many(app: &TestApp, count: u64, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut uploaded = Vec::new();
    for chunk in (0..count).collect::<Vec<_>>().chunks(8) {
        let uploads = chunk.iter().map(|i| {
            let bytes = png(6, 6, seed + i);
            async move { (app.upload_ok("g.png", bytes.clone()).await["id"].as_str().unwrap().to_owned(), bytes) }
        });
        uploaded.extend(futures::future::join_all(uploads).await);
    }
    uploaded
}

/// Asserts every blob's stored copies are exactly its write set under `settings`.
async fn assert_in_place(app: &TestApp, settings: &Settings) {
    let ring =
        chitram::placement::ring::Ring::new(settings.ring_members(), settings.placement.vnodes_per_weight).unwrap();
    let blobs = app.metadata.list_blob_copies(None, 10_000).await.unwrap();
    assert!(!blobs.is_empty());
    for blob in blobs {
        let mut stored: Vec<&str> =
            blob.replicas.iter().filter(|r| r.state == ReplicaState::Stored).map(|r| r.shard.as_str()).collect();
        let mut wanted =
            write_set_names(&ring, key_hash(blob.blob.as_str().as_bytes()), settings.placement.replication_factor);
        stored.sort_unstable();
        wanted.sort_unstable();
        assert_eq!(stored, wanted, "blob {}", blob.blob);
        assert_eq!(blob.replicas.len(), wanted.len(), "no other copy is recorded for {}", blob.blob);
    }
}

/// The app's settings with one more S3 shard, `s3`.
async fn with_fourth_s3_shard(app: &TestApp) -> (Settings, Arc<S3Server>) {
    let server = S3Server::start(&app.dir.path().join("s3").join("s3")).await;
    let mut settings = app.settings.clone();
    settings.shards.push(ShardSettings::s3("s3", &server.settings(BUCKET)));
    (settings, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adding_a_fourth_shard_moves_what_the_plan_says_while_reads_go_on() {
    let app = Arc::new(spawn_app_with(Backends::POSTGRES_S3, TestOptions::default()).await);
    let uploaded = Arc::new(upload_many(&app, 240, 100_000).await);
    app.replicate_until_idle().await;
    let (new_settings, fourth) = with_fourth_s3_shard(&app).await;
    let router = Arc::new(open_storage(&new_settings, app.metadata.as_ref()).await.unwrap());

    let plan = rebalance::plan(app.metadata.as_ref(), router.ring(), 2).await.unwrap();
    let total_copies = 240 * 2;
    let fraction = plan.copies() as f64 / total_copies as f64;
    assert!((0.17..=0.33).contains(&fraction), "about a quarter of the copies move: {fraction}");
    assert!(
        plan.pairs.keys().all(|step| step.to == "s3" && step.from.is_some()),
        "all onto the new shard: {:?}",
        plan.pairs
    );
    assert_eq!(plan.removals(), plan.copies(), "each new copy replaces one");

    // Readers run throughout, through the service still configured with three shards.
    let stop_reading = CancellationToken::new();
    let (reads, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (app, uploaded, stop) = (app.clone(), uploaded.clone(), stop_reading.clone());
            let (reads, failures) = (reads.clone(), failures.clone());
            tokio::spawn(async move {
                for (id, bytes) in uploaded.iter().cycle().skip(r * 80) {
                    if stop.is_cancelled() {
                        break;
                    }
                    let response = app.download(id).await;
                    let ok = response.status() == 200 && response.bytes().await.is_ok_and(|b| b.to_vec() == *bytes);
                    reads.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let (expected_copies, expected_bytes, expected_removals) = (plan.copies(), plan.bytes(), plan.removals());
    let summary =
        rebalance::execute(app.metadata.clone(), router.clone(), plan, &options(CancellationToken::new()), &Silent)
            .await;
    stop_reading.cancel();
    for reader in readers {
        reader.await.unwrap();
    }
    assert!(summary.failures.is_empty(), "{:?}", summary.failures);
    assert_eq!(
        (summary.copies_made, summary.bytes_copied, summary.copies_removed),
        (expected_copies, expected_bytes, expected_removals)
    );
    assert!(reads.load(Ordering::Relaxed) > 100, "reads ran during the move");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no read failed");

    assert_in_place(&app, &new_settings).await;
    let again = rebalance::plan(app.metadata.as_ref(), router.ring(), 2).await.unwrap();
    assert!(again.work.is_empty(), "nothing left to move");
    for blob in app.metadata.list_blob_copies(None, 10_000).await.unwrap() {
        if blob.replicas.iter().any(|r| r.shard == "s3") {
            let bytes = std::fs::read(fourth.object_path(BUCKET, blob.blob.as_str())).unwrap();
            assert_eq!(sha256_hex(&bytes), blob.blob.as_str(), "the moved copy is intact");
        }
    }
}

/// Cancels a job after a number of units.
struct StopAfter {
    left: AtomicU64,
    stop: CancellationToken,
}

impl Progress for StopAfter {
    fn start(&self, _: &str, _: u64, _: u64) {}
    fn advance(&self, units: u64, _: u64) {
        if self.left.fetch_sub(units.min(self.left.load(Ordering::Relaxed)), Ordering::Relaxed) <= units {
            self.stop.cancel();
        }
    }
    fn finish(&self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_rebalance_resumes_where_it_stopped() {
    let app =
        spawn_app_with(Backends::SQLITE_FS, TestOptions { replication_factor: 1, ..TestOptions::default() }).await;
    upload_many(&app, 120, 200_000).await;
    let mut settings = app.settings.clone();
    settings.shards.push(ShardSettings::fs("s3", app.dir.path().join("shards/s3")));
    let router = Arc::new(open_storage(&settings, app.metadata.as_ref()).await.unwrap());

    let plan = rebalance::plan(app.metadata.as_ref(), router.ring(), 1).await.unwrap();
    let planned = plan.work.len() as u64;
    assert!(planned > 15, "{planned}");
    let stop = CancellationToken::new();
    let interrupter = StopAfter { left: AtomicU64::new(10), stop: stop.clone() };
    let one_at_a_time = RebalanceOptions { concurrency: 1, ..options(stop) };
    let first = rebalance::execute(app.metadata.clone(), router.clone(), plan, &one_at_a_time, &interrupter).await;
    assert!(first.interrupted);
    assert!(first.blobs_done < planned, "{} of {planned}", first.blobs_done);

    let rest = rebalance::plan(app.metadata.as_ref(), router.ring(), 1).await.unwrap();
    assert_eq!(rest.work.len() as u64, planned - first.blobs_done, "the second run plans only what is left");
    let second =
        rebalance::execute(app.metadata.clone(), router, rest, &options(CancellationToken::new()), &Silent).await;
    assert!(!second.interrupted && second.failures.is_empty());
    assert_in_place(&app, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_shard_empties_and_can_then_leave_the_config() {
    let mut app =
        spawn_app_with(Backends::SQLITE_FS, TestOptions { replication_factor: 1, ..TestOptions::default() }).await;
    upload_many(&app, 60, 300_000).await;
    // One `serve` per SQLite file: the builds below stand for restarts of this one.
    app.stop_serving().await;
    let mut without_s1 = app.settings.clone();
    without_s1.shards.retain(|shard| shard.name != "s1");
    without_s1.server.bind = "127.0.0.1:0".parse().unwrap();
    match Application::build(&without_s1).await {
        Err(StartError::StrandedBlobs { count, shards }) => {
            assert!(count > 0);
            assert_eq!(shards, "s1");
        }
        Err(other) => panic!("expected a refusal naming s1, got {other}"),
        Ok(_) => panic!("the service must refuse to start without the shard holding the only copies"),
    }

    let mut draining = app.settings.clone();
    draining.shards[1].draining = true;
    let report = chitram::commands::ring(&draining, None).await.unwrap().report;
    assert!(report.lines().any(|line| line.starts_with("s1") && line.contains("draining")), "{report}");
    let router = Arc::new(open_storage(&draining, app.metadata.as_ref()).await.unwrap());
    let plan = rebalance::plan(app.metadata.as_ref(), router.ring(), 1).await.unwrap();
    assert!(plan.pairs.keys().all(|step| step.from.as_deref() == Some("s1")), "only s1 gives copies up");
    let summary =
        rebalance::execute(app.metadata.clone(), router, plan, &options(CancellationToken::new()), &Silent).await;
    assert!(summary.failures.is_empty(), "{:?}", summary.failures);

    let usage = app.metadata.shard_usage().await.unwrap();
    assert!(usage.iter().all(|u| u.shard != "s1"), "no copy recorded on s1: {usage:?}");
    let s1_objects =
        app.all_objects().into_iter().filter(|path| path.starts_with(app.dir.path().join("shards/s1"))).count();
    assert_eq!(s1_objects, 0, "s1 is empty");
    assert_in_place(&app, &draining).await;
    Application::build(&without_s1).await.expect("an empty shard can leave the config");
}

fn scrub_options(repair: bool) -> ScrubOptions {
    ScrubOptions {
        repair,
        verify_checksums: true,
        orphan_grace: Duration::from_secs(3600),
        copies_per_sec: None,
        spool_dir: None,
        resume: false,
        stop: CancellationToken::new(),
    }
}

async fn first_holder(app: &TestApp, id: &str) -> (String, String) {
    let image = app.image(id).await;
    let checksum = image["checksum"].as_str().unwrap().to_owned();
    (app.read_order(&image)[0].clone(), checksum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrub_finds_and_repairs_missing_and_corrupt_copies_and_orphans() {
    let app = spawn_app_with(
        Backends { db: common::database::DbKind::Postgres, storage: common::StorageKind::Fs },
        TestOptions::default(),
    )
    .await;
    let uploaded = upload_many(&app, 10, 400_000).await;
    app.replicate_until_idle().await;
    let router: &StorageRouter = &app.router;

    // A deleted copy, a corrupted copy, a blob with every copy gone, and two stray objects.
    let (deleted_on, deleted) = first_holder(&app, &uploaded[0].0).await;
    std::fs::remove_file(app.object_path(&deleted_on, &deleted)).unwrap();
    let (corrupt_on, corrupt) = first_holder(&app, &uploaded[1].0).await;
    let corrupt_path = app.object_path(&corrupt_on, &corrupt);
    let mut bytes = std::fs::read(&corrupt_path).unwrap();
    bytes[20] ^= 0x55;
    std::fs::write(&corrupt_path, bytes).unwrap();
    let lost_image = app.image(&uploaded[2].0).await;
    let lost = lost_image["checksum"].as_str().unwrap().to_owned();
    for (shard, _) in common::replica_states(&lost_image) {
        std::fs::remove_file(app.object_path(&shard, &lost)).unwrap();
    }
    let orphan_bytes = png(9, 9, 499_999);
    let orphan = sha256_hex(&orphan_bytes);
    let orphan_path = write_object(&app, "s2", &orphan, &orphan_bytes);
    std::fs::File::options()
        .write(true)
        .open(&orphan_path)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    let young_bytes = png(9, 9, 499_998);
    write_object(&app, "s0", &sha256_hex(&young_bytes), &young_bytes);

    let report = scrub::scrub(app.metadata.as_ref(), router, &scrub_options(false), &Silent).await.unwrap();
    let bad: Vec<(&str, &str)> = report.bad_copies.iter().map(|(c, _)| (c.blob.as_str(), c.shard.as_str())).collect();
    assert!(bad.contains(&(deleted.as_str(), deleted_on.as_str())), "{:?}", report.bad_copies);
    assert!(bad.contains(&(corrupt.as_str(), corrupt_on.as_str())), "{:?}", report.bad_copies);
    assert_eq!(report.lost, vec![(BlobKey::parse(&lost).unwrap(), 1)]);
    assert_eq!(report.orphans.len(), 1, "only the old stray object is an orphan: {:?}", report.orphans);
    assert_eq!((report.orphans[0].shard.as_str(), report.orphans[0].key.as_str()), ("s2", orphan.as_str()));
    assert!(orphan_path.exists(), "nothing is deleted without --repair");

    let repaired = scrub::scrub(app.metadata.as_ref(), router, &scrub_options(true), &Silent).await.unwrap();
    assert!(repaired.restored >= 2, "{repaired:?}");
    assert_eq!(repaired.orphans_deleted, 1);
    assert!(!orphan_path.exists());
    assert_eq!(sha256_hex(&std::fs::read(app.object_path(&deleted_on, &deleted)).unwrap()), deleted);
    assert_eq!(sha256_hex(&std::fs::read(&corrupt_path).unwrap()), corrupt);
    // The lost blob's image is reported, never dropped.
    assert_eq!(app.get(&format!("/api/v1/images/{}", uploaded[2].0)).await.status(), 200);

    let clean = scrub::scrub(app.metadata.as_ref(), router, &scrub_options(false), &Silent).await.unwrap();
    assert!(clean.bad_copies.is_empty() && clean.orphans.is_empty(), "{clean:?}");
    assert_eq!(clean.lost.len(), 1, "still reported until an operator restores it");
}

fn write_object(app: &TestApp, shard: &str, key: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = app.object_path(shard, key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrub_and_rebalance_at_once_report_only_real_problems() {
    let app = spawn_app_with(
        Backends { db: common::database::DbKind::Postgres, storage: common::StorageKind::Fs },
        TestOptions::default(),
    )
    .await;
    upload_many(&app, 80, 900_000).await;
    app.replicate_until_idle().await;
    let mut settings = app.settings.clone();
    settings.shards.push(ShardSettings::fs("s3", app.dir.path().join("shards/s3")));
    let router = Arc::new(open_storage(&settings, app.metadata.as_ref()).await.unwrap());
    let plan = rebalance::plan(app.metadata.as_ref(), router.ring(), 2).await.unwrap();
    assert!(plan.copies() > 10, "a fourth shard takes a share");

    // One copy is damaged, of a blob that stays where it is; the others are healthy.
    let moving: Vec<BlobKey> = plan.work.iter().map(|work| work.blob.blob.clone()).collect();
    let blobs = app.metadata.list_blob_copies(None, 1000).await.unwrap();
    let damaged = blobs.iter().find(|blob| !moving.contains(&blob.blob)).expect("a blob that stays").clone();
    let damaged_on = damaged.replicas[0].shard.clone();
    let path = app.object_path(&damaged_on, damaged.blob.as_str());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[30] ^= 0x5a;
    std::fs::write(&path, bytes).unwrap();

    let (scrubbing, moving) = (scrub_options(true), options(CancellationToken::new()));
    let (report, summary) = tokio::join!(
        scrub::scrub(app.metadata.as_ref(), &router, &scrubbing, &Silent),
        rebalance::execute(app.metadata.clone(), router.clone(), plan, &moving, &Silent),
    );
    let report = report.unwrap();
    assert!(summary.failures.is_empty(), "{:?}", summary.failures);
    let bad: Vec<(&str, &str)> = report.bad_copies.iter().map(|(c, _)| (c.blob.as_str(), c.shard.as_str())).collect();
    assert_eq!(bad, [(damaged.blob.as_str(), damaged_on.as_str())], "only the damaged copy: {report:?}");
    assert_eq!((report.under_replicated, report.restored), (1, 1), "{report:?}");
    assert!(report.lost.is_empty() && report.orphans.is_empty() && report.recovered.is_empty(), "{report:?}");
    assert_eq!(std::fs::read(&path).map(|b| sha256_hex(&b)).unwrap(), damaged.blob.as_str(), "repaired in place");

    assert_in_place(&app, &settings).await;
    let clean = scrub::scrub(app.metadata.as_ref(), &router, &scrub_options(false), &Silent).await.unwrap();
    assert!(clean.bad_copies.is_empty() && clean.under_replicated == 0, "{clean:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_background_scrub_resumes_at_once_after_a_restart() {
    let app = spawn_app_with(
        Backends { db: common::database::DbKind::Sqlite, storage: common::StorageKind::Fs },
        TestOptions::default(),
    )
    .await;
    upload_many(&app, 4, 950_000).await;
    // A background scrub stopped by a restart left its place behind.
    let first = app.metadata.list_blob_copies(None, 1).await.unwrap()[0].blob.clone();
    app.metadata.save_job_cursor(scrub::JOB, Some(&first)).await.unwrap();

    let stop = CancellationToken::new();
    let options = ScrubOptions { resume: true, stop: stop.clone(), ..scrub_options(true) };
    let daily = Duration::from_secs(86_400);
    let scrubber = tokio::spawn(scrub::run_periodic(app.metadata.clone(), app.router.clone(), daily, options));
    common::eventually(Duration::from_secs(10), "the interrupted scrub has finished its run", || async {
        app.metadata.load_job_cursor(scrub::JOB).await.unwrap().is_none()
    })
    .await;
    stop.cancel();
    scrubber.await.unwrap();
}

/// A copy that stays rotted at the right size: the size check under the lock passes it, so a
/// plain rebalance removes the surplus copy, the blob's last good one. `verify_kept`
/// (`chitram rebalance --verify`) reads the kept copies first: the surplus copy stays, the bad
/// copy is recorded `missing` for repair, and once it is repaired a rebalance removes the surplus.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_keeps_the_surplus_copy_while_a_kept_copy_is_rotten() {
    let app =
        spawn_app_with(Backends::SQLITE_FS, TestOptions { replication_factor: 3, ..TestOptions::default() }).await;
    let bytes = png(64, 64, 700_000);
    let image = app.upload_ok("rot.png", bytes.clone()).await;
    app.replicate_until_idle().await;
    let blob = BlobKey::parse(image["checksum"].as_str().unwrap()).unwrap();
    let router = Arc::new(open_storage(&app.settings, app.metadata.as_ref()).await.unwrap());
    // Two copies wanted now: one is surplus.
    let plan = rebalance::plan(app.metadata.as_ref(), router.ring(), 2).await.unwrap();
    assert_eq!(plan.work.len(), 1);
    let (kept, surplus) = (plan.work[0].wanted[0].clone(), plan.work[0].surplus.clone());
    assert_eq!(surplus.len(), 1);
    let rotten = app.object_path(&kept, blob.as_str());
    let mut rotted = std::fs::read(&rotten).unwrap();
    let last = rotted.len() - 1;
    rotted[last] ^= 0xFF;
    std::fs::write(&rotten, rotted).unwrap();

    let verified = RebalanceOptions { verify_kept: true, ..options(CancellationToken::new()) };
    let summary = rebalance::execute(app.metadata.clone(), router.clone(), plan, &verified, &Silent).await;
    assert_eq!((summary.copies_removed, summary.copies_kept), (0, 1));
    assert!(summary.failures[0].1.contains(&format!("the kept copy on {kept} is bad")), "{:?}", summary.failures);
    assert!(app.object_path(&surplus[0], blob.as_str()).exists(), "the surplus copy stays");
    let copies = app.metadata.find_blob_copies(&blob).await.unwrap().unwrap();
    let state_on = |shard: &str| copies.replicas.iter().find(|r| r.shard == shard).map(|r| r.state);
    assert_eq!(state_on(&kept), Some(ReplicaState::Missing), "{copies:?}");

    app.replicate_until_idle().await; // Repairs the rotten copy from a good one.
    let again = rebalance::plan(app.metadata.as_ref(), router.ring(), 2).await.unwrap();
    let summary = rebalance::execute(app.metadata.clone(), router, again, &verified, &Silent).await;
    assert!(summary.failures.is_empty(), "{:?}", summary.failures);
    assert_eq!(summary.copies_removed, 1);
    let download = app.download(image["id"].as_str().unwrap()).await;
    assert_eq!(download.bytes().await.unwrap().to_vec(), bytes);
    assert_eq!(sha256_hex(&std::fs::read(&rotten).unwrap()), blob.as_str(), "repaired in place");
}
