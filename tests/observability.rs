//! Metrics, request ids and load-balancer probes, in process. The metrics recorder is global
//! to the process, so the tests that read metrics take turns ([`METRICS`]) and compare values
//! before and after what they do.

mod common;

use std::time::Duration;

use common::exposition::{self, Sample, has, sum};
use common::half_sent::HalfSentUpload;
use common::images::png;
use common::{Backends, TestApp, TestOptions, eventually, spawn_app_with};
use reqwest::StatusCode;

static METRICS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn observed(workers: usize) -> TestOptions {
    TestOptions {
        workers,
        adjust: Some(|settings| {
            settings.metrics.bind = Some("127.0.0.1:0".parse().unwrap());
            settings.metrics.refresh_secs = 1;
        }),
        ..TestOptions::default()
    }
}

async fn scrape(app: &TestApp) -> Vec<Sample> {
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    exposition::parse(&response.text().await.unwrap())
}

const UPLOAD: [(&str, &str); 3] = [("method", "POST"), ("route", "/api/v1/images/upload"), ("status", "201")];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_with_uploads_failover_and_replication() {
    let _turn = METRICS.lock().await;
    let app = spawn_app_with(Backends::POSTGRES_S3, observed(0)).await;
    let before = scrape(&app).await;

    // Uploads: per-route counts and latency under the route template, new bytes and dedup.
    let bytes = png(6, 6, 91_000);
    let image = app.upload_ok("m.png", bytes.clone()).await;
    app.upload_ok("again.png", bytes).await;
    let id = image["id"].as_str().unwrap();
    assert_eq!(app.get(&format!("/api/v1/images/{id}")).await.status(), StatusCode::OK);
    assert_eq!(app.get("/api/v1/images/not-an-id").await.status(), StatusCode::NOT_FOUND);
    let after = scrape(&app).await;
    assert_eq!(
        sum(&after, "chitram_http_requests_total", &UPLOAD) - sum(&before, "chitram_http_requests_total", &UPLOAD),
        2.0
    );
    let histogram = [("method", "POST"), ("route", "/api/v1/images/upload")];
    let count = "chitram_http_request_duration_seconds_count";
    assert_eq!(sum(&after, count, &histogram) - sum(&before, count, &histogram), 2.0);
    assert!(has(&after, "chitram_http_request_duration_seconds_bucket", &[("le", "0.001")]), "buckets start at 1 ms");
    assert!(has(&after, "chitram_http_request_duration_seconds_bucket", &[("le", "60")]), "and end at 60 s");
    let find = [("route", "/api/v1/images/{id}"), ("status", "200")];
    assert!(sum(&after, "chitram_http_requests_total", &find) >= 1.0);
    let not_found = [("route", "/api/v1/images/{id}"), ("status", "404"), ("code", "IMAGE_NOT_FOUND")];
    assert!(sum(&after, "chitram_http_errors_total", &not_found) >= 1.0);
    assert!(
        after.iter().all(|s| s.labels.values().all(|v| !v.contains(id) && !v.contains("not-an-id"))),
        "ids never become labels"
    );
    assert_eq!(sum(&after, "chitram_dedup_hits_total", &[]) - sum(&before, "chitram_dedup_hits_total", &[]), 1.0);
    assert_eq!(sum(&after, "chitram_new_blobs_total", &[]) - sum(&before, "chitram_new_blobs_total", &[]), 1.0);
    let writes = |samples: &[Sample]| {
        sum(samples, "chitram_shard_operations_total", &[("operation", "write"), ("outcome", "ok")])
    };
    assert_eq!(writes(&after) - writes(&before), 1.0, "one copy written on the upload path (write quorum 1)");

    // Failover: a stopped shard's errors and circuit show, and its copies wait in the queue.
    app.take_shard_offline("s0").await;
    for seed in 0..8 {
        app.upload_ok("f.png", png(5, 5, 91_100 + seed)).await;
    }
    let s0_errors = |samples: &[Sample]| sum(samples, "chitram_shard_errors_total", &[("shard", "s0")]);
    eventually(Duration::from_secs(10), "the stopped shard's failures and open circuit show", || async {
        let samples = scrape(&app).await;
        s0_errors(&samples) > s0_errors(&before)
            && sum(&samples, "chitram_shard_circuit_state", &[("shard", "s0")]) == 2.0
    })
    .await;
    eventually(Duration::from_secs(10), "pending copies and queued tasks show after a refresh", || async {
        let samples = scrape(&app).await;
        sum(&samples, "chitram_replicas", &[("state", "pending")]) > 0.0
            && sum(&samples, "chitram_replication_queue_depth", &[("kind", "copy")]) > 0.0
            && sum(&samples, "chitram_replication_queue_oldest_age_seconds", &[]) > 0.0
    })
    .await;

    // Replication: the queue drains, and the per-shard objects add up to the stored copies.
    app.bring_shard_online("s0").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    eventually(Duration::from_secs(20), "replication drains the queue", || async {
        app.replicate_until_idle().await;
        let samples = scrape(&app).await;
        sum(&samples, "chitram_replication_queue_depth", &[]) == 0.0
            && sum(&samples, "chitram_replicas", &[("state", "pending")]) == 0.0
    })
    .await;
    let samples = scrape(&app).await;
    let stored = sum(&samples, "chitram_replicas", &[("state", "stored")]);
    assert_eq!(stored, 18.0, "9 blobs, 2 copies each");
    assert_eq!(sum(&samples, "chitram_shard_objects", &[]), stored);
    assert!(sum(&samples, "chitram_shard_bytes", &[]) > 0.0);
    assert!(sum(&samples, "chitram_replication_tasks_total", &[("kind", "copy"), ("outcome", "done")]) >= 8.0);
    assert_eq!(sum(&samples, "chitram_shard_weight", &[("shard", "s1")]), 1.0);
    assert_eq!(sum(&samples, "chitram_shard_circuit_state", &[("shard", "s0")]), 0.0, "closed again");

    // The internal port serves /metrics and nothing else, without credentials.
    let internal = app.metrics_address.clone().expect("[metrics] bind was set");
    let response = app.client.get(format!("{internal}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(exposition::parse(&response.text().await.unwrap()).iter().any(|s| s.name == "chitram_replicas"));
    let response = app.client.get(format!("{internal}/api/v1/images")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

/// Each stage of an upload is timed once: a new blob passes all seven, a duplicate stops after
/// the lookup, and a refused file after its body is received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stage_of_an_upload_is_timed() {
    let _turn = METRICS.lock().await;
    let app = spawn_app_with(Backends::POSTGRES_S3, observed(0)).await;
    let before = scrape(&app).await;

    let bytes = png(7, 7, 92_000);
    app.upload_ok("new.png", bytes.clone()).await;
    app.upload_ok("duplicate.png", bytes).await;
    let refused = app.upload("not-an-image.png", b"plain text, not a PNG".to_vec()).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT");

    let after = scrape(&app).await;
    let count = "chitram_store_stage_seconds_count";
    let uploads_in = |stage: &str| {
        let labels = [("for", "upload"), ("stage", stage)];
        sum(&after, count, &labels) - sum(&before, count, &labels)
    };
    assert_eq!(uploads_in("receive"), 3.0, "every body is received");
    assert_eq!(uploads_in("check"), 2.0, "the refused file never passes its check");
    assert_eq!(uploads_in("lookup"), 2.0);
    for stage in ["write", "lock", "confirm", "commit"] {
        assert_eq!(uploads_in(stage), 1.0, "only new bytes are written ({stage})");
    }
    let seconds = |samples: &[Sample]| sum(samples, "chitram_store_stage_seconds_sum", &[("for", "upload")]);
    assert!(seconds(&after) > seconds(&before), "the stages took time");
    let fine = [("for", "upload"), ("stage", "lock"), ("le", "0.0001")];
    assert!(has(&after, "chitram_store_stage_seconds_bucket", &fine), "stage buckets start at 100 µs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_turned_off() {
    let options = TestOptions { adjust: Some(|settings| settings.metrics.enabled = false), ..TestOptions::default() };
    let app = spawn_app_with(Backends::SQLITE_FS, options).await;
    common::assert_error(app.get("/metrics").await, StatusCode::NOT_FOUND, "NOT_FOUND").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id() {
    let app = spawn_app_with(Backends::SQLITE_FS, TestOptions::default()).await;
    let id_of = |response: &reqwest::Response| response.headers()["x-request-id"].to_str().unwrap().to_owned();

    let given = app.client.get(app.url("/health")).header("x-request-id", "client-id-42").send().await.unwrap();
    assert_eq!(id_of(&given), "client-id-42", "a client's id is echoed");
    let generated = app.get("/api/v1/images/nope").await;
    assert_eq!(generated.status(), StatusCode::NOT_FOUND);
    assert!(uuid::Uuid::parse_str(&id_of(&generated)).is_ok(), "one is generated otherwise, errors included");
    let unknown = app.get("/no/such/route").await;
    assert!(uuid::Uuid::parse_str(&id_of(&unknown)).is_ok());
    let hostile = "x".repeat(300);
    let replaced = app.client.get(app.url("/health")).header("x-request-id", &hostile).send().await.unwrap();
    assert!(uuid::Uuid::parse_str(&id_of(&replaced)).is_ok(), "an overlong id is replaced, not echoed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_without_internals() {
    let app = spawn_app_with(Backends::POSTGRES_S3, TestOptions::default()).await;
    let live = app.get("/health/live").await;
    assert_eq!(live.status(), StatusCode::OK);
    assert_eq!(live.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"status": "live"}));
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(ready.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"status": "ready"}));

    for shard in ["s0", "s1", "s2"] {
        app.take_shard_offline(shard).await;
    }
    let not_ready = app.get("/health/ready").await;
    assert_eq!(not_ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(not_ready.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"status": "not_ready"}));
    assert_eq!(app.get("/health/live").await.status(), StatusCode::OK, "the process still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_upload_memory_budget_is_visible_while_bodies_hold_it() {
    let _turn = METRICS.lock().await;
    let options = TestOptions {
        auth: false,
        adjust: Some(|settings| settings.server.upload_memory_bytes = 2 * 1024 * 1024),
        ..TestOptions::default()
    };
    let app = spawn_app_with(Backends::SQLITE_FS, options).await;
    let (memory, full) = ("chitram_upload_memory_bytes", "chitram_upload_memory_full_total");
    let before = scrape(&app).await;

    // An upload of 1.5 MiB whose body is half sent holds its share of the 2 MiB budget.
    let image = common::images::large_png(1536 * 1024, 92_000);
    let address = app.address.trim_start_matches("http://").to_owned();
    let held = HalfSentUpload::start(&address, "held.png", &image).await;
    eventually(Duration::from_secs(5), "the held body shows in the gauge", || async {
        sum(&scrape(&app).await, memory, &[]) - sum(&before, memory, &[]) >= 1536.0 * 1024.0
    })
    .await;

    // Another such upload finds no room: it spools, and the refusal is counted.
    app.upload_ok("spooled.png", common::images::large_png(1536 * 1024, 92_001)).await;
    let during = scrape(&app).await;
    assert_eq!(sum(&during, full, &[]) - sum(&before, full, &[]), 1.0, "one upload found the budget full");

    let response = held.finish().await;
    assert!(response.starts_with("HTTP/1.1 201"), "the held upload completes: {response}");
    eventually(Duration::from_secs(5), "the share is given back", || async {
        sum(&scrape(&app).await, memory, &[]) == sum(&before, memory, &[])
    })
    .await;
}
