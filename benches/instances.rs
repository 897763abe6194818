//! Many instances and the cost of metrics, measured on the real binary (BENCHMARKS.md,
//! "Instances and metrics"):
//!
//! 1. Metrics on against off: two `chitram serve` processes, identical but for
//!    `[metrics] enabled`, each on its own Postgres database and shard directories; the same
//!    load (metadata GETs, then 8 KiB uploads) alternates between them in slices.
//! 2. Two instances against one: one process, then two on one Postgres database behind a
//!    round-robin client, under the same upload and download load; afterwards the replication
//!    tasks run by both instances are counted against the copies that needed one, to show
//!    that none was done twice.
//!
//! `cargo bench --bench instances` (about a minute). Prints Markdown; `CHITRAM_BENCH_SECS`
//! sets seconds per slice (default 2); `CHITRAM_BENCH_POSTGRES_URL` the server for the
//! throwaway `chitram_bench_<uuid>` databases (default the local test server).

#[allow(dead_code)]
#[path = "../tests/common/images.rs"]
mod images;
#[path = "support/postgres.rs"]
mod postgres;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postgres::{create_database, drop_database};
use reqwest::multipart::{Form, Part};
use sqlx::{Connection, PgConnection};

const CONCURRENCY: usize = 8;
const SLICES: usize = 3;

struct Instance {
    child: Child,
    address: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start(dir: &Path, url: &str, shards: &Path, metrics: bool) -> Instance {
    let port = free_port();
    let config = dir.join(format!("chitram-{port}.toml"));
    let mut text = format!(
        "[server]\nbind = \"127.0.0.1:{port}\"\n[database]\nurl = \"{url}\"\n[metrics]\nenabled = {metrics}\n\
         [replication]\nidle_poll_ms = 50\n"
    );
    for name in ["a", "b", "c"] {
        text.push_str(&format!(
            "[[shards]]\nname = \"{name}\"\nkind = \"fs\"\npath = \"{}\"\n",
            shards.join(name).display()
        ));
    }
    std::fs::write(&config, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_chitram"))
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the chitram binary starts");
    let instance = Instance { child, address: format!("http://127.0.0.1:{port}") };
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{}/health/live", instance.address)).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    instance
}

#[derive(Clone, Copy)]
enum Load {
    /// `GET /api/v1/images/{id}` of one stored image.
    Metadata,
    /// `GET /api/v1/images/{id}/file` over the stored images.
    Download,
    /// 8 KiB PNG uploads, every one new bytes.
    Upload,
}

static SEED: AtomicU64 = AtomicU64::new(1_000_000);

/// Requests per second of `load` against `targets` (round robin) for `secs`.
async fn run(client: &reqwest::Client, targets: &[String], ids: &[String], load: Load, secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let (client, targets, ids, done) = (client.clone(), targets.to_vec(), ids.to_vec(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = worker;
            while Instant::now() < deadline {
                let target = &targets[n % targets.len()];
                let id = &ids[n % ids.len()];
                let ok = match load {
                    Load::Metadata => {
                        client.get(format!("{target}/api/v1/images/{id}")).send().await.is_ok_and(|r| r.status() == 200)
                    }
                    Load::Download => match client.get(format!("{target}/api/v1/images/{id}/file")).send().await {
                        Ok(response) if response.status() == 200 => response.bytes().await.is_ok(),
                        _ => false,
                    },
                    Load::Upload => upload(&client, target).await.is_some(),
                };
                assert!(ok, "a request failed");
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

async fn upload(client: &reqwest::Client, target: &str) -> Option<String> {
    let bytes = images::large_png(8 * 1024, SEED.fetch_add(1, Ordering::Relaxed));
    let form = Form::new().part("file", Part::bytes(bytes).file_name("b.png"));
    let response = client.post(format!("{target}/api/v1/images/upload")).multipart(form).send().await.ok()?;
    if response.status() != 201 {
        return None;
    }
    let image: serde_json::Value = response.json().await.ok()?;
    image["id"].as_str().map(str::to_owned)
}

async fn seed_images(client: &reqwest::Client, target: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..count {
        ids.push(upload(client, target).await.expect("a seed upload"));
    }
    ids
}

/// One set-up under test: the instances a client spreads requests over, the images it reads,
/// and its database (to wait, unmeasured, for the replication an upload slice left behind, so
/// that it does not slow the next slice, which belongs to the other set-up).
struct Setup<'a> {
    targets: &'a [String],
    ids: &'a [String],
    database: &'a str,
}

/// Alternates `secs`-long slices of `load` between two set-ups; returns the mean rates.
async fn compare(client: &reqwest::Client, a: &Setup<'_>, b: &Setup<'_>, load: Load, secs: f64) -> (f64, f64) {
    let (mut total_a, mut total_b) = (0.0, 0.0);
    for _ in 0..SLICES {
        for (setup, total) in [(a, &mut total_a), (b, &mut total_b)] {
            *total += run(client, setup.targets, setup.ids, load, secs).await;
            wait_for_replication(setup.database).await;
        }
    }
    (total_a / SLICES as f64, total_b / SLICES as f64)
}

async fn wait_for_replication(database: &str) {
    let mut connection = PgConnection::connect(database).await.unwrap();
    let started = Instant::now();
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM replication_tasks").fetch_one(&mut connection).await.unwrap();
        if left == 0 || started.elapsed() > Duration::from_secs(120) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metric(client: &reqwest::Client, target: &str, name: &str, label: &str) -> f64 {
    let text = client.get(format!("{target}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(label))
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, value)| value.parse::<f64>().ok()))
        .sum()
}

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::var("CHITRAM_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut databases = Vec::new();

    // 1. Metrics on against off.
    let (on_db, on_url) = create_database().await;
    let (off_db, off_url) = create_database().await;
    databases.extend([on_db, off_db]);
    let on = start(dir.path(), &on_url, &dir.path().join("on"), true).await;
    let off = start(dir.path(), &off_url, &dir.path().join("off"), false).await;
    let on_ids = seed_images(&client, &on.address, 32).await;
    let off_ids = seed_images(&client, &off.address, 32).await;
    println!("## Metrics on against off ({CONCURRENCY} concurrent clients, {SLICES} alternating slices of {secs} s)\n");
    println!("| load | metrics off (req/s) | metrics on (req/s) | on / off |\n|---|---|---|---|");
    for (name, load) in [("metadata GET", Load::Metadata), ("8 KiB upload", Load::Upload)] {
        let off_setup = Setup { targets: std::slice::from_ref(&off.address), ids: &off_ids, database: &off_url };
        let on_setup = Setup { targets: std::slice::from_ref(&on.address), ids: &on_ids, database: &on_url };
        let (rate_off, rate_on) = compare(&client, &off_setup, &on_setup, load, secs).await;
        println!("| {name} | {rate_off:.0} | {rate_on:.0} | {:.3} |", rate_on / rate_off);
    }
    drop((on, off));

    // 2. Two instances against one, on one database.
    let (shared_db, shared_url) = create_database().await;
    databases.push(shared_db);
    let shards = dir.path().join("shared");
    let first = start(dir.path(), &shared_url, &shards, true).await;
    let second = start(dir.path(), &shared_url, &shards, true).await;
    let ids = seed_images(&client, &first.address, 64).await;
    let one = [first.address.clone()];
    let both = [first.address.clone(), second.address.clone()];
    println!("\n## Two instances against one (one Postgres, round-robin client, {CONCURRENCY} concurrent clients)\n");
    println!("| load | one instance (req/s) | two instances (req/s) | two / one |\n|---|---|---|---|");
    for (name, load) in [("file GET (8 KiB)", Load::Download), ("8 KiB upload", Load::Upload)] {
        let one = Setup { targets: &one, ids: &ids, database: &shared_url };
        let two = Setup { targets: &both, ids: &ids, database: &shared_url };
        let (rate_one, rate_two) = compare(&client, &one, &two, load, secs).await;
        println!("| {name} | {rate_one:.0} | {rate_two:.0} | {:.3} |", rate_two / rate_one);
    }
    // Every new blob needs one copy task (replication factor 2, write quorum 1): the two
    // instances together must run exactly as many.
    wait_for_replication(&shared_url).await;
    let mut pool = PgConnection::connect(&shared_url).await.unwrap();
    let blobs: i64 = sqlx::query_scalar("SELECT count(*) FROM blobs").fetch_one(&mut pool).await.unwrap();
    let done_first = metric(&client, &first.address, "chitram_replication_tasks_total", "outcome=\"done\"").await;
    let done_second = metric(&client, &second.address, "chitram_replication_tasks_total", "outcome=\"done\"").await;
    let leaders = metric(&client, &first.address, "chitram_maintenance_leader", "").await
        + metric(&client, &second.address, "chitram_maintenance_leader", "").await;
    println!(
        "\nBlobs stored: {blobs}; copy tasks run: {done_first} by the first instance + {done_second} by the second = {}; \
         maintenance leaders: {leaders}",
        done_first + done_second
    );
    drop((first, second));
    for name in databases {
        drop_database(&name).await;
    }
}
