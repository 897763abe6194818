//! Does the Redis metadata cache pay? (BENCHMARKS.md, "Redis metadata cache".) Two apps in
//! this process, identical but for `[redis] metadata_cache`, each on its own Postgres database
//! and three filesystem shards (one copy, accounts off, no background workers), and one
//! private `redis-server`; measured in the same run:
//!
//! 1. latency of a metadata GET and of a file GET (8 KiB), one client over loopback
//!    (criterion), with and without the cache;
//! 2. throughput of the same with 8 concurrent clients, alternating slices;
//! 3. database transactions per request, as Postgres counts them for each database
//!    (`pg_stat_database.xact_commit + xact_rollback`; `pg_stat_statements` is not loaded on
//!    the bench's server), over 1,000 sequential requests, and the cache's hit ratio from the
//!    app's own counters.
//!
//! `cargo bench --bench cache`. `CHITRAM_BENCH_POSTGRES_URL` names the server for the
//! throwaway `chitram_bench_<uuid>` databases (default the local test server).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

// The tests' private Redis (a `redis-server` on a free port, killed when dropped).
#[path = "support/postgres.rs"]
mod postgres;
#[allow(dead_code)]
#[path = "../tests/common/private_redis.rs"]
mod private_redis;

use chitram::app::Application;
use chitram::config::{Settings, ShardSettings};
use criterion::Criterion;
use postgres::{admin_url, create_database, drop_database};
use private_redis::PrivateRedis;
use reqwest::multipart::{Form, Part};
use sqlx::{Connection, PgConnection};
use tokio::runtime::Runtime;

const IMAGES: usize = 64;
const CONCURRENCY: usize = 8;
const SLICES: usize = 3;
const SLICE_SECS: f64 = 2.0;
const COUNTED_REQUESTS: usize = 1_000;
/// Postgres folds a backend's statistics into `pg_stat_database` when it has been idle this
/// long at most (PGSTAT_IDLE_INTERVAL, 10 s in Postgres 15).
const STATS_SETTLE: Duration = Duration::from_secs(11);

/// Transactions the database has counted so far.
async fn transactions(database: &str) -> i64 {
    let mut connection = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query_scalar("SELECT (xact_commit + xact_rollback)::BIGINT FROM pg_stat_database WHERE datname = $1")
        .bind(database)
        .fetch_one(&mut connection)
        .await
        .unwrap()
}

/// One app under test, with the images it serves.
struct Setup {
    name: &'static str,
    base: String,
    database: String,
    ids: Vec<String>,
    _dir: tempfile::TempDir,
}

async fn start(name: &'static str, redis: Option<&str>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (database, database_url) = create_database().await;
    let mut settings = Settings::default();
    settings.server.bind = "127.0.0.1:0".parse().unwrap();
    settings.database.url = database_url.clone();
    settings.shards =
        ["a", "b", "c"].iter().map(|name| ShardSettings::fs(name, dir.path().join("shards").join(name))).collect();
    settings.placement.replication_factor = 1;
    settings.placement.write_quorum = 1;
    settings.auth.enabled = false;
    settings.rate_limits.enabled = false;
    // Nothing in the background reads the database while requests are counted.
    settings.replication.workers = 0;
    settings.variants.workers = 0;
    settings.maintenance.scrub_interval_secs = 0;
    settings.metrics.refresh_secs = 3_600;
    if let Some(url) = redis {
        settings.redis.url = Some(url.to_owned());
        settings.redis.metadata_cache = true;
    }
    settings.validate().expect("valid bench settings");
    let app = Application::build(&settings).await.expect("the app builds");
    let base = format!("http://{}", app.local_addr());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for seed in 0..IMAGES {
        ids.push(upload(&client, &base, png(8 * 1024, seed as u64)).await);
    }
    Setup { name, base, database, ids, _dir: dir }
}

/// A valid PNG of about `len` bytes whose content depends on `seed`.
fn png(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&1u32.to_be_bytes());
    ihdr.extend_from_slice(&1u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    chunk(&mut bytes, b"IHDR", &ihdr);
    let mut filler = seed.to_be_bytes().to_vec();
    filler.resize(len.saturating_sub(64), 0x5a);
    chunk(&mut bytes, b"tEXt", &filler);
    chunk(&mut bytes, b"IDAT", &[0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01]);
    chunk(&mut bytes, b"IEND", &[]);
    bytes
}

fn chunk(bytes: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = bytes.len();
    bytes.extend_from_slice(kind);
    bytes.extend_from_slice(data);
    let crc = crc32fast::hash(&bytes[start..]);
    bytes.extend_from_slice(&crc.to_be_bytes());
}

async fn upload(client: &reqwest::Client, base: &str, bytes: Vec<u8>) -> String {
    let form = Form::new().part("file", Part::bytes(bytes).file_name("b.png"));
    let response = client.post(format!("{base}/api/v1/images/upload")).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap_or_default());
    let image: serde_json::Value = response.json().await.unwrap();
    image["id"].as_str().unwrap().to_owned()
}

#[derive(Clone, Copy)]
enum Load {
    Metadata,
    File,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Metadata => "metadata GET",
            Load::File => "file GET (8 KiB)",
        }
    }

    fn path(self, id: &str) -> String {
        match self {
            Load::Metadata => format!("/api/v1/images/{id}"),
            Load::File => format!("/api/v1/images/{id}/file"),
        }
    }
}

async fn request(client: &reqwest::Client, setup: &Setup, load: Load, n: usize) {
    let id = &setup.ids[n % setup.ids.len()];
    let response = client.get(format!("{}{}", setup.base, load.path(id))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
}

/// Requests per second of `load` with `CONCURRENCY` clients for `secs`.
async fn rate(client: &reqwest::Client, setup: &Arc<Setup>, load: Load, secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let (client, setup, done) = (client.clone(), setup.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = worker * 7;
            while Instant::now() < deadline {
                request(&client, &setup, load, n).await;
                done.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / secs
}

async fn metric(client: &reqwest::Client, setup: &Setup, name: &str) -> f64 {
    let text = client.get(format!("{}/metrics", setup.base)).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.split([' ', '{']).next() == Some(name))
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, value)| value.parse::<f64>().ok()))
        .sum()
}

fn main() {
    let runtime = Runtime::new().unwrap();
    let redis = PrivateRedis::start();
    let setups = runtime.block_on(async {
        [Arc::new(start("no cache", None).await), Arc::new(start("Redis cache", Some(&redis.url)).await)]
    });
    let client = reqwest::Client::new();
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();

    // 1. Latency, one client.
    for load in [Load::Metadata, Load::File] {
        let mut group = criterion.benchmark_group(load.name());
        for setup in &setups {
            let mut n = 0;
            group.bench_function(setup.name, |b| {
                b.iter(|| {
                    n += 1;
                    runtime.block_on(request(&client, setup, load, n))
                })
            });
        }
        group.finish();
    }

    runtime.block_on(async {
        // 2. Throughput, CONCURRENCY clients, alternating slices.
        println!("\n| load ({CONCURRENCY} clients) | no cache (req/s) | Redis cache (req/s) | cache / no cache |");
        println!("|---|---|---|---|");
        for load in [Load::Metadata, Load::File] {
            let mut totals = [0.0, 0.0];
            for _ in 0..SLICES {
                for (setup, total) in setups.iter().zip(totals.iter_mut()) {
                    *total += rate(&client, setup, load, SLICE_SECS).await;
                }
            }
            let [plain, cached] = totals.map(|total| total / SLICES as f64);
            println!("| {} | {plain:.0} | {cached:.0} | {:.2} |", load.name(), cached / plain);
        }

        // 3. Database transactions per request, and the hit ratio.
        println!("\n| load ({COUNTED_REQUESTS} sequential requests) | no cache (transactions/request) | Redis cache (transactions/request) |");
        println!("|---|---|---|");
        let cached = &setups[1];
        let hits_before = metric(&client, cached, "chitram_metadata_cache_hits_total").await;
        let misses_before = metric(&client, cached, "chitram_metadata_cache_misses_total").await;
        for load in [Load::Metadata, Load::File] {
            tokio::time::sleep(STATS_SETTLE).await;
            let before = [transactions(&setups[0].database).await, transactions(&setups[1].database).await];
            for setup in &setups {
                for n in 0..COUNTED_REQUESTS {
                    request(&client, setup, load, n).await;
                }
            }
            tokio::time::sleep(STATS_SETTLE).await;
            let after = [transactions(&setups[0].database).await, transactions(&setups[1].database).await];
            let per = |i: usize| (after[i] - before[i]) as f64 / COUNTED_REQUESTS as f64;
            println!("| {} | {:.3} | {:.3} |", load.name(), per(0), per(1));
        }
        let hits = metric(&client, cached, "chitram_metadata_cache_hits_total").await - hits_before;
        let misses = metric(&client, cached, "chitram_metadata_cache_misses_total").await - misses_before;
        let fallbacks = metric(&client, cached, "chitram_metadata_cache_fallbacks_total").await.max(0.0);
        println!(
            "\nCache over the counted requests: {hits} hits, {misses} misses (hit ratio {:.3}); fallbacks in the whole run: {fallbacks}",
            hits / (hits + misses)
        );
        for setup in &setups {
            drop_database(&setup.database).await;
        }
    });
    criterion.final_summary();
}
