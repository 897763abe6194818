//! Shards and the database really going down: writes move to the next shard, reads fail over,
//! and only when nothing can serve does the client get a 503 with a code.

mod common;

use std::time::Duration;

use chitram::blob::BlobKey;
use chitram::metadata::CopyRef;
use chitram::placement::ring::{Ring, key_hash};
use common::database::DbKind;
use common::images::{large_png, png};
use common::proxy::TcpProxy;
use common::{Backends, TestApp, TestOptions, assert_error, eventually, replica_states, spawn_app, spawn_app_with};
use reqwest::StatusCode;
use serde_json::Value;

behaviours!(
    uploads_go_to_the_next_shard_while_one_is_down,
    reads_fail_over_to_another_holder,
    with_every_shard_down_requests_get_503_and_nothing_is_recorded,
    copies_on_a_down_shard_are_deleted_once_it_returns,
);

/// The shards of a blob's preference list, by name, computed as the router does.
fn preference_list(app: &TestApp, checksum: &str) -> Vec<String> {
    let ring = Ring::new(app.settings.ring_members(), app.settings.placement.vnodes_per_weight).unwrap();
    ring.preference_list(key_hash(checksum.as_bytes())).map(|i| ring.members()[i].name.clone()).collect()
}

async fn uploads_go_to_the_next_shard_while_one_is_down(b: Backends) {
    let app = spawn_app(b).await;
    app.take_shard_offline("s0").await;
    let mut images = Vec::new();
    for seed in 0..24 {
        let bytes = png(8, 8, 1000 + seed);
        let image = app.upload_ok("f.png", bytes.clone()).await;
        let checksum = image["checksum"].as_str().unwrap().to_owned();
        let preference = preference_list(&app, &checksum);
        let first_up = preference.iter().find(|shard| *shard != "s0").unwrap();
        let copies = replica_states(&image);
        assert!(copies.contains(&(first_up.clone(), "stored".into())), "stored on the next shard: {copies:?}");
        if preference[..2].contains(&"s0".to_owned()) {
            assert!(copies.contains(&("s0".into(), "pending".into())), "s0's copy awaits replication: {copies:?}");
        }
        images.push((image, bytes));
    }
    assert!(
        images.iter().any(|(image, _)| preference_list(&app, image["checksum"].as_str().unwrap())[0] == "s0"),
        "some uploads had the down shard as primary"
    );
    app.bring_shard_online("s0").await;
    for (image, bytes) in &images {
        let download = app.download(image["id"].as_str().unwrap()).await;
        assert_eq!(download.bytes().await.unwrap().to_vec(), *bytes);
    }
}

/// Makes the blob's pending copy real, as replication will: copy the object and record it.
async fn replicate_by_hand(app: &TestApp, image: &Value) -> (String, String) {
    let key = image["checksum"].as_str().unwrap();
    let copies = replica_states(image);
    let stored = copies.iter().find(|(_, state)| state == "stored").unwrap().0.clone();
    let pending = copies.iter().find(|(_, state)| state == "pending").unwrap().0.clone();
    let target = app.object_path(&pending, key);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(app.object_path(&stored, key), &target).unwrap();
    let copy = CopyRef { blob: BlobKey::parse(key).unwrap(), shard: pending.clone() };
    assert!(app.metadata.record_stored_copy(&copy).await.unwrap(), "the blob is referenced");
    (stored, pending)
}

async fn reads_fail_over_to_another_holder(b: Backends) {
    let app = spawn_app(b).await;
    let bytes = large_png(600 * 1024, 7);
    let image = app.upload_ok("r.png", bytes.clone()).await;
    let id = image["id"].as_str().unwrap();
    let (first, second) = replicate_by_hand(&app, &image).await;

    // A holder that is down is skipped.
    app.take_shard_offline(&first).await;
    assert_eq!(app.download(id).await.bytes().await.unwrap().to_vec(), bytes);
    app.bring_shard_online(&first).await;

    // A holder that lacks the blob is skipped, and recorded as missing for repair.
    std::fs::remove_file(app.object_path(&first, image["checksum"].as_str().unwrap())).unwrap();
    let preferred = preference_list(&app, image["checksum"].as_str().unwrap());
    let read_first = if preferred.iter().position(|s| *s == first) < preferred.iter().position(|s| *s == second) {
        &first
    } else {
        &second
    };
    assert_eq!(app.download(id).await.bytes().await.unwrap().to_vec(), bytes);
    if read_first == &first {
        // Recorded in the background, once re-checked under the blob's lock.
        let marked = (first.clone(), "missing".to_owned());
        eventually(Duration::from_secs(5), "the absent copy is recorded missing", || async {
            replica_states(&app.image(id).await).contains(&marked)
        })
        .await;
    }

    // With every holder down, the read is a 503 with a code.
    app.take_shard_offline(&second).await;
    assert_error(app.download(id).await, StatusCode::SERVICE_UNAVAILABLE, "STORAGE_UNAVAILABLE").await;
}

async fn with_every_shard_down_requests_get_503_and_nothing_is_recorded(b: Backends) {
    let app = spawn_app(b).await;
    let stored = app.upload_ok("before.png", png(3, 3, 8)).await;
    for shard in ["s0", "s1", "s2"] {
        app.take_shard_offline(shard).await;
    }
    let response = app.upload("during.png", png(3, 3, 9)).await;
    assert_eq!(response.headers()["retry-after"], "5");
    assert_error(response, StatusCode::SERVICE_UNAVAILABLE, "STORAGE_UNAVAILABLE").await;
    assert_eq!(app.image_count().await, 1, "the failed upload left no row");
    assert_error(
        app.download(stored["id"].as_str().unwrap()).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "STORAGE_UNAVAILABLE",
    )
    .await;
    // Metadata still answers.
    assert_eq!(app.get(&format!("/api/v1/images/{}", stored["id"].as_str().unwrap())).await.status(), StatusCode::OK);
}

async fn copies_on_a_down_shard_are_deleted_once_it_returns(b: Backends) {
    let app = spawn_app_with(b, TestOptions { replication_factor: 1, ..TestOptions::default() }).await;
    let image = app.upload_ok("d.png", png(4, 4, 10)).await;
    let (holder, _) = replica_states(&image).remove(0);
    app.take_shard_offline(&holder).await;
    assert_eq!(app.delete(image["id"].as_str().unwrap()).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.metadata.count_replicas_by_state().await.unwrap().deleting, 1, "the copy waits, recorded");

    app.bring_shard_online(&holder).await;
    assert_eq!(app.all_objects().len(), 1);
    // The shard's circuit may be open from the failed delete: wait out its cooldown.
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    app.replicate_until_idle().await;
    assert!(app.all_objects().is_empty());
    assert_eq!(app.metadata.count_replicas_by_state().await.unwrap().deleting, 0);
}

/// An S3 holder that dies while a large download streams from it: the response goes on from
/// the other holder, and the client gets every byte, checked, in one 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_dying_mid_download_is_replaced_without_cutting_the_response() {
    let options = TestOptions { max_upload_bytes: 48 * 1024 * 1024, ..TestOptions::default() };
    let app = spawn_app_with(Backends::POSTGRES_S3, options).await;
    let bytes = large_png(40 * 1024 * 1024, 9);
    let image = app.upload_ok("big.png", bytes.clone()).await;
    let id = image["id"].as_str().unwrap();
    let (first, second) = replicate_by_hand(&app, &image).await;
    let preferred = preference_list(&app, image["checksum"].as_str().unwrap());
    let serving = preferred.iter().find(|shard| **shard == first || **shard == second).unwrap().clone();

    let mut response = app.download(id).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut received = response.chunk().await.unwrap().expect("a first chunk").to_vec();
    // Far less than the 40 MiB is buffered between the holder and the client by now: the
    // rest must come from the other holder.
    app.take_shard_offline(&serving).await;
    while let Some(chunk) = response.chunk().await.expect("the body goes on") {
        received.extend_from_slice(&chunk);
    }
    assert_eq!(received.len(), bytes.len());
    assert!(received == bytes, "the bytes are the image's");
}

/// The pool pings only connections idle for over a second before handing them out (a ping per
/// query was a round trip on every upload and download). Connections the database dropped
/// while they sat idle are found dead then and replaced: no request pays for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_dropped_while_idle_are_replaced_before_use() {
    let database = common::database::TestDatabase::create(DbKind::Postgres).await;
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = database.url.replacen("127.0.0.1:5432", &proxy.addr.to_string(), 1);
    let app =
        spawn_app_with(Backends::SQLITE_FS, TestOptions { database_url: Some(url), ..TestOptions::default() }).await;
    // Several uploads at once leave several connections in the pool.
    let uploads = (0..4).map(|seed| app.upload_ok("a.png", png(2, 2, 20 + seed)));
    let before = futures::future::join_all(uploads).await;

    proxy.cut().await; // every pooled connection is closed under the pool's feet
    proxy.restore().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    for (seed, image) in before.iter().enumerate() {
        let id = image["id"].as_str().unwrap();
        assert_eq!(app.get(&format!("/api/v1/images/{id}")).await.status(), StatusCode::OK, "read {seed}");
        app.upload_ok("b.png", png(2, 2, 30 + seed as u64)).await;
    }
    assert_eq!(app.get("/api/v1/images").await.status(), StatusCode::OK);
    drop(app);
    drop(database);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_gets_503_and_the_service_recovers() {
    let database = common::database::TestDatabase::create(DbKind::Postgres).await;
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = database.url.replacen("127.0.0.1:5432", &proxy.addr.to_string(), 1);
    assert_ne!(url, database.url, "the test database is reached through the proxy");
    let app =
        spawn_app_with(Backends::SQLITE_FS, TestOptions { database_url: Some(url), ..TestOptions::default() }).await;
    let before = app.upload_ok("a.png", png(2, 2, 11)).await;
    let id = before["id"].as_str().unwrap();
    // Requests side by side leave several connections idle in the pool, each released just
    // now: the pool would hand them out without a ping.
    let path = format!("/api/v1/images/{id}");
    let side_by_side = (0..8).map(|_| app.get(&path));
    for response in futures::future::join_all(side_by_side).await {
        assert_eq!(response.status(), StatusCode::OK);
    }

    proxy.cut().await;
    assert_error(app.upload("b.png", png(2, 2, 12)).await, StatusCode::SERVICE_UNAVAILABLE, "DATABASE_UNAVAILABLE")
        .await;
    assert_error(
        app.get(&format!("/api/v1/images/{id}")).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
    )
    .await;
    assert_error(app.get("/api/v1/images").await, StatusCode::SERVICE_UNAVAILABLE, "DATABASE_UNAVAILABLE").await;
    let health = app.get("/health").await;
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.json::<Value>().await.unwrap()["database"]["status"], "down");

    proxy.restore().await;
    // The connections idle through the outage are dead; none of them fails a request now.
    let after = app.upload_ok("c.png", png(2, 2, 13)).await;
    let after_path = format!("/api/v1/images/{}", after["id"].as_str().unwrap());
    for _ in 0..8 {
        assert_eq!(app.get(&after_path).await.status(), StatusCode::OK);
    }
    drop(app);
    drop(database);
}
