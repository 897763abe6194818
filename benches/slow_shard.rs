//! Slow is the new down, measured: upload and read latency with one of three S3 shards
//! answering 20 s late, against the same app with every shard healthy, on SQLite and Postgres.
//!
//! `cargo bench --bench slow_shard` (about a minute). Prints Markdown (BENCHMARKS.md quotes
//! it). Uses the test harness: the real app in process, three in-process S3 servers (s3s-fs),
//! replication factor 2, default `[latency]` settings, replication driven by hand (no workers).
//! Uploads arrive in waves of 30 at once (the reproduction); reads are of images whose
//! first holder is the late shard and whose second copy is on a healthy one.

#[allow(unused_imports, unused_macros)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::database::DbKind;
use common::images::png;
use common::s3::Faults;
use common::{Backends, StorageKind, TestApp, TestOptions, spawn_app_with};
use reqwest::StatusCode;
use serde_json::Value;

const LATE: Duration = Duration::from_secs(20);
const WAVES: u64 = 3;
const WAVE: u64 = 30;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        println!("| database | shard s0 | operation | n | failed | p50 | p99 | max |");
        println!("|---|---|---|---|---|---|---|---|");
        for db in [DbKind::Sqlite, DbKind::Postgres] {
            run(db).await;
        }
    });
}

async fn run(db: DbKind) {
    let name = format!("{db:?}");
    let app = spawn_app_with(Backends { db, storage: StorageKind::S3 }, TestOptions::default()).await;
    let healthy = upload_waves(&app, 1_000_000).await;
    report(&name, "healthy", "upload", &healthy);
    app.replicate_until_idle().await;

    let mut first_on_s0 = Vec::new();
    for (_, image) in &healthy {
        if let Some(image) = image
            && app.read_order(image).first().is_some_and(|shard| shard == "s0")
        {
            first_on_s0.push(image["id"].as_str().unwrap().to_owned());
        }
    }
    report(&name, "healthy", "read (first holder s0)", &reads(&app, &first_on_s0).await);

    app.shard_s3("s0").misbehave(Faults { late: Some(LATE), ..Faults::default() }).await;
    report(&name, "20 s late", "read (first holder s0, hedged)", &reads(&app, &first_on_s0).await);
    let late = upload_waves(&app, 2_000_000).await;
    report(&name, "20 s late", "upload", &late);
}

type Sample = (Result<Duration, StatusCode>, Option<Value>);

async fn upload_waves(app: &TestApp, seed: u64) -> Vec<Sample> {
    let mut samples = Vec::new();
    for wave in 0..WAVES {
        let uploads = (0..WAVE).map(|i| async move {
            let started = Instant::now();
            let upload =
                tokio::time::timeout(Duration::from_secs(30), app.upload("b.png", png(8, 8, seed + wave * WAVE + i)));
            match upload.await {
                Ok(response) if response.status() == StatusCode::CREATED => {
                    let took = started.elapsed();
                    (Ok(took), response.json().await.ok())
                }
                Ok(response) => (Err(response.status()), None),
                Err(_) => (Err(StatusCode::GATEWAY_TIMEOUT), None),
            }
        });
        samples.extend(futures::future::join_all(uploads).await);
    }
    samples
}

async fn reads(app: &TestApp, ids: &[String]) -> Vec<Sample> {
    let mut samples = Vec::new();
    for id in ids {
        let started = Instant::now();
        let response = app.download(id).await;
        let status = response.status();
        let sample = match response.bytes().await {
            Ok(_) if status == StatusCode::OK => Ok(started.elapsed()),
            _ => Err(status),
        };
        samples.push((sample, None));
    }
    samples
}

fn report(db: &str, shard: &str, operation: &str, samples: &[Sample]) {
    let mut times: Vec<Duration> = samples.iter().filter_map(|(sample, _)| sample.ok()).collect();
    times.sort();
    let failed = samples.len() - times.len();
    let at = |p: f64| times.get(((times.len() as f64 * p).ceil() as usize).max(1) - 1).copied().unwrap_or_default();
    println!(
        "| {db} | {shard} | {operation} | {} | {failed} | {} | {} | {} |",
        samples.len(),
        ms(at(0.50)),
        ms(at(0.99)),
        ms(times.last().copied().unwrap_or_default())
    );
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}
