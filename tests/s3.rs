//! S3 shards specifically: streaming, dead servers, and bad storage config. (The behavioural
//! suites of `api.rs`, `input.rs` and `failover.rs` also run over S3 and mixed rings.)

mod common;

use std::time::{Duration, Instant};

use common::images::{png, sha256_hex};
use common::{Backends, TestOptions, assert_error, spawn_app_with};
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use sha2::Digest;

const MIB: usize = 1024 * 1024;

/// Resident memory of this process (the server, the S3 servers and the client), in bytes.
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A deterministic `len`-byte PNG, produced in 64 KiB pieces so the test never holds it whole.
fn streamed_png(len: usize) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    futures::stream::iter(common::images::png_pieces(len, 42).map(Ok))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_40_mib_image_streams_through_without_being_buffered() {
    let options = TestOptions { max_upload_bytes: 64 * MIB as u64, replication_factor: 1, ..TestOptions::default() };
    let app = spawn_app_with(Backends::POSTGRES_S3, options).await;
    let len = 40 * MIB;
    let mut expected = sha2::Sha256::new();
    let mut chunks = Box::pin(streamed_png(len));
    while let Some(chunk) = chunks.next().await {
        expected.update(chunk.unwrap());
    }
    let expected = hex::encode(expected.finalize());

    let part = Part::stream_with_length(reqwest::Body::wrap_stream(streamed_png(len)), len as u64).file_name("big.png");
    let image = app.upload_form(Form::new().part("file", part)).await.json::<Value>().await.unwrap();
    assert_eq!(image["checksum"], expected.as_str(), "{image}");

    let baseline = resident_bytes();
    let mut peak = baseline;
    let mut download = app.download(image["id"].as_str().unwrap()).await;
    assert_eq!(download.status(), StatusCode::OK);
    let mut received = sha2::Sha256::new();
    let mut total = 0;
    while let Some(chunk) = download.chunk().await.unwrap() {
        total += chunk.len();
        received.update(&chunk);
        peak = peak.max(resident_bytes());
    }
    assert_eq!(total, len);
    assert_eq!(hex::encode(received.finalize()), expected, "byte for byte");
    let growth = peak.saturating_sub(baseline);
    assert!(growth < 16 * MIB, "memory grew by {} MiB while streaming 40 MiB", growth / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_skipped_at_once() {
    let app = spawn_app_with(Backends::POSTGRES_S3, TestOptions::default()).await;
    app.take_shard_offline("s0").await;
    let started = Instant::now();
    for seed in 0..12 {
        app.upload_ok("x.png", png(2, 2, 3000 + seed)).await;
    }
    // Twelve uploads, some of which had the dead shard first, well inside one retry chain of
    // the SDK's defaults: a refused connection is not retried.
    assert!(started.elapsed() < Duration::from_secs(6), "took {:?}", started.elapsed());

    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "degraded");
    let shard = &health["shards"][0];
    assert_eq!(shard["status"], "down", "{health}");
    // Either the check itself found no connection, or the uploads' failures had opened the
    // shard's circuit already.
    let error = shard["error"].as_str().unwrap();
    assert!(error.contains("no connection") || error.contains("circuit open"), "{shard}");
    app.bring_shard_online("s0").await;
    // The circuit opened while the shard was down; after its cooldown, the next check is the
    // trial that closes it.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["shards"][0]["status"], "ok", "{health}");
    assert_eq!(health["shards"][0]["circuit"], "closed", "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_named_in_health_and_writes_fail_over() {
    let options = TestOptions {
        adjust: Some(|settings| settings.shards[1].secret_access_key = Some("not-the-secret".into())),
        ..TestOptions::default()
    };
    let app = spawn_app_with(Backends::POSTGRES_S3, options).await;
    let health: Value = app.get("/health").await.json().await.unwrap();
    let shard = &health["shards"][1];
    assert_eq!((shard["name"].as_str(), shard["status"].as_str()), (Some("s1"), Some("down")), "{health}");
    assert!(shard["error"].as_str().unwrap().contains("credentials"), "{shard}");

    for seed in 0..12 {
        let image = app.upload_ok("x.png", png(2, 2, 4000 + seed)).await;
        let stored: Vec<&str> = image["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "stored")
            .map(|r| r["shard"].as_str().unwrap())
            .collect();
        assert!(!stored.contains(&"s1"), "never stored on the shard that refuses us: {image}");
        let bytes = app.download(image["id"].as_str().unwrap()).await.bytes().await.unwrap();
        assert_eq!(sha256_hex(&bytes), image["checksum"].as_str().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_shard_refusing_us_the_client_gets_503_not_500() {
    let options = TestOptions {
        replication_factor: 1,
        adjust: Some(|settings| {
            for shard in &mut settings.shards {
                shard.access_key_id = Some("nobody".into());
            }
        }),
        ..TestOptions::default()
    };
    let app = spawn_app_with(Backends::POSTGRES_S3, options).await;
    assert_error(app.upload("x.png", png(2, 2, 5)).await, StatusCode::SERVICE_UNAVAILABLE, "STORAGE_UNAVAILABLE").await;
    assert_eq!(app.image_count().await, 0);
    assert_eq!(app.get("/health").await.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_and_a_missing_bucket_are_named_in_health() {
    let options = TestOptions {
        adjust: Some(|settings| {
            // Nothing listens on port 9 (discard) here: connections are refused.
            settings.shards[0].endpoint = Some("http://127.0.0.1:9".into());
            settings.shards[2].bucket = Some("never-created".into());
            settings.shards[2].create_bucket = Some(false);
        }),
        ..TestOptions::default()
    };
    let app = spawn_app_with(Backends::POSTGRES_S3, options).await;
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["shards"][0]["error"].as_str().unwrap().contains("no connection"), "{health}");
    assert!(health["shards"][2]["error"].as_str().unwrap().contains("does not exist"), "{health}");
    assert_eq!(health["shards"][1]["status"], "ok");

    // Nothing lands on the unreachable shard, and reads come back. (The test server, unlike
    // MinIO, accepts writes into a bucket that does not exist, so s2 may take some.)
    for seed in 0..8 {
        let image = app.upload_ok("x.png", png(2, 2, 6000 + seed)).await;
        let on_s0 = image["replicas"].as_array().unwrap().iter().any(|r| r["shard"] == "s0" && r["state"] == "stored");
        assert!(!on_s0, "{image}");
        assert_eq!(app.download(image["id"].as_str().unwrap()).await.status(), StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_of_another_store_or_an_empty_wrong_bucket_is_fenced() {
    let app = spawn_app_with(Backends::POSTGRES_S3, TestOptions::default()).await;
    let image = app.upload_ok("a.png", png(8, 8, 7)).await;
    let key = chitram::blob::BlobKey::parse(image["checksum"].as_str().unwrap()).unwrap();
    let holder = image["replicas"][0]["shard"].as_str().unwrap().to_owned();

    // Another store (its own database) pointed at this store's buckets by mistake.
    let other_db = common::database::TestDatabase::create(common::database::DbKind::Sqlite).await;
    let mut other = app.settings.clone();
    other.database.url = other_db.url.clone();
    let metadata = chitram::app::open_metadata(&other.database.url).await.unwrap();
    let router = chitram::app::open_storage(&other, metadata.as_ref()).await.unwrap();
    for shard in router.check_health(Duration::from_secs(5)).await {
        let reason = shard.result.expect_err("every shard is fenced").to_string();
        assert!(reason.contains("another Chitram store"), "{reason}");
    }
    assert!(router.open_on(&holder, &key).await.is_err(), "a fenced bucket serves nothing");

    // This store with one shard's bucket name mistyped: an empty bucket where copies should be.
    let mut mistyped = app.settings.clone();
    let index = mistyped.shards.iter().position(|shard| shard.name == holder).unwrap();
    let server = app.shard_s3(&holder);
    mistyped.shards[index] = chitram::config::ShardSettings::s3(&holder, &server.settings("chitram-typo"));
    let router = chitram::app::open_storage(&mistyped, app.metadata.as_ref()).await.unwrap();
    let health = router.check_health(Duration::from_secs(5)).await;
    let reason = health.iter().find(|shard| shard.name == holder).unwrap().result.as_ref().unwrap_err().to_string();
    assert!(reason.contains("is its disk mounted, and is this the right path or bucket"), "{reason}");
    let read = router.open_on(&holder, &key).await.expect_err("fenced");
    assert!(!read.to_string().contains("not on this shard"), "down, not NotFound: {read}");
    // The service itself, on the right buckets, reads on.
    assert_eq!(app.download(image["id"].as_str().unwrap()).await.status(), StatusCode::OK);
}
