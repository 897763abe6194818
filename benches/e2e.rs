//! End-to-end load: uploads and downloads through Chitram — the real binary, run as a separate
//! process — over four S3 shards, against the same S3 servers reached directly with the same
//! client library, in one run. Then two copies of a batch (Chitram RF=2 against a client doing
//! two PUTs), and the server's peak memory during 32 concurrent 20 MiB uploads.
//!
//! `cargo bench --bench e2e` (about three minutes). Prints Markdown (BENCHMARKS.md quotes it);
//! progress goes to stderr. Loopback only; everything it creates is removed at the end.
//!
//! - S3 shards: four s3s-fs servers, each a process of its own (a copy of this bench, started
//!   with `CHITRAM_BENCH_S3_SERVER`) on its own 127.0.0.1 port, with SigV4 authentication, each
//!   a directory under a temporary directory. Killing one (the window phase) kills its process.
//! - Chitram: two processes, replication factor 1 and 2 (write quorum 1, two replication
//!   workers: the defaults), each with its own bucket on the four servers and its own metadata
//!   database. Metadata on Postgres by default (a throwaway `chitram_bench_<uuid>` database per
//!   process on `CHITRAM_BENCH_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`,
//!   dropped at the end); `CHITRAM_BENCH_DATABASE=sqlite` puts it in SQLite files instead.
//! - Direct: aws-sdk-s3 configured as `src/storage/s3.rs` configures it, objects spread round-robin
//!   over the same four servers.
//! - Each cell (operation × size × concurrency) runs for `CHITRAM_BENCH_SECS` seconds per path
//!   (default 2), split into three slices that rotate between the paths so drift in a noisy
//!   machine hits them alike: direct, RF=1 and RF=2, and for uploads also a direct client that
//!   writes each object to two servers at once, which RF=2 uploads are set beside (RF=2 rows
//!   show both shares). A cell stops early at 384 MiB per path. Every upload is
//!   unique bytes (no deduplication); every download's length is checked. After an RF=2 upload
//!   slice the bench waits, unmeasured, for the replication queue to empty. CPU time of the load
//!   generator, of the S3 servers, of Chitram and of Postgres is read from /proc around every
//!   slice.
//! - Where an RF=1 upload's time goes: the RF=1 server's `chitram_store_stage_seconds` is read
//!   from its `/metrics` around each of its upload slices, and each upload cell gets the mean
//!   milliseconds of every stage (receive, check, lookup, write, lock, confirm, commit) beside
//!   the direct PUT's.
//! - `CHITRAM_BENCH_WRITE_QUORUM=N` sets `placement.write_quorum` on the servers with at least N
//!   copies (the RF=2 server, with 2).
//! - `CHITRAM_BENCH_WORKERS=N` sets `replication.workers`; `CHITRAM_BENCH_PHASES` runs a subset of
//!   `matrix,replication,lag,window,memory` (and `profile`, for scripts/profile-requests.sh).
//! - `CHITRAM_BENCH_WRAPPER="heaptrack -o FILE"` (or callgrind) runs each server under a
//!   profiler; such a server is stopped with SIGTERM so that the profiler writes its data.
//! - Chitram uploads declare their file's SHA-256 (`X-Checksum-SHA256`, hashed inside the timed
//!   request, as the direct client hashes its body to sign it), so files of 1 MiB and more
//!   stream to their shard as they arrive (cut-through); `CHITRAM_BENCH_CHECKSUM=0` sends none,
//!   and every upload stores and forwards; `=hash` computes it without sending it (the same
//!   client cost, store and forward).
//! - `CHITRAM_BENCH_BINARY=PATH` runs another build of the server (a copy of an earlier
//!   `target/release/chitram`), to compare two versions against the same direct baseline.

// The test fixtures' PNG chunk writer (length, type, data, CRC): one copy for tests and benches.
#[allow(dead_code)]
#[path = "../tests/common/images.rs"]
mod images;
// The tests' parser of Prometheus' text format, for the stage figures read from `/metrics`.
#[allow(dead_code)]
#[path = "../tests/common/exposition.rs"]
mod exposition;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aws_sdk_s3::Client as S3Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use reqwest::multipart::{Form, Part};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const SIZES: [usize; 3] = [64 * KIB, MIB, 16 * MIB];
const CONCURRENCY: [usize; 3] = [1, 8, 16];
const SHARDS: usize = 4;
const SLICES: usize = 3;
/// Most bytes one path uploads in one cell (bounds disk use and run time).
const CELL_CAP: u64 = 384 * MIB as u64;
const RSS_UPLOADS: usize = 32;
const RSS_SIZE: usize = 20 * MIB;
const ACCESS_KEY: &str = "chitram-bench";
const SECRET_KEY: &str = "chitram-bench-secret";
const DIRECT_BUCKET: &str = "direct";

/// What to run, from the environment.
struct Options {
    /// Seconds per cell and path (`CHITRAM_BENCH_SECS`, default 2).
    secs: f64,
    /// `replication.workers` of the Chitram processes (`CHITRAM_BENCH_WORKERS`; Chitram's default
    /// when unset).
    workers: Option<usize>,
    /// `placement.write_quorum` of the servers with at least that many copies
    /// (`CHITRAM_BENCH_WRITE_QUORUM`; 1 when unset).
    write_quorum: Option<usize>,
    /// Which parts run (`CHITRAM_BENCH_PHASES`, a comma-separated subset of
    /// `matrix,replication,lag,window,memory`; all by default).
    matrix: bool,
    replication: bool,
    lag: bool,
    window: bool,
    memory: bool,
    profile: bool,
}

const PHASES: [&str; 5] = ["matrix", "replication", "lag", "window", "memory"];
/// Not run unless named: requests for a profiler (scripts/profile-requests.sh).
const PROFILE: &str = "profile";

impl Options {
    fn from_env() -> Options {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let phases = var("CHITRAM_BENCH_PHASES").unwrap_or_else(|| PHASES.join(","));
        let phases: Vec<&str> = phases.split(',').map(str::trim).collect();
        for phase in &phases {
            assert!(
                PHASES.contains(phase) || *phase == PROFILE,
                "CHITRAM_BENCH_PHASES: unknown phase {phase:?} ({}, {PROFILE})",
                PHASES.join(", ")
            );
        }
        Options {
            secs: var("CHITRAM_BENCH_SECS").map_or(2.0, |v| v.parse().expect("CHITRAM_BENCH_SECS: seconds")),
            workers: var("CHITRAM_BENCH_WORKERS").map(|v| v.parse().expect("CHITRAM_BENCH_WORKERS: a count")),
            write_quorum: var("CHITRAM_BENCH_WRITE_QUORUM")
                .map(|v| v.parse().expect("CHITRAM_BENCH_WRITE_QUORUM: a count")),
            matrix: phases.contains(&"matrix"),
            replication: phases.contains(&"replication"),
            lag: phases.contains(&"lag"),
            window: phases.contains(&"window"),
            memory: phases.contains(&"memory"),
            profile: phases.contains(&PROFILE),
        }
    }
}

fn main() {
    if let Ok(spec) = std::env::var(S3_CHILD_ENV) {
        return serve_s3(&spec);
    }
    let options = Options::from_env();
    let database = match std::env::var("CHITRAM_BENCH_DATABASE").as_deref() {
        Ok("sqlite") => DatabaseKind::Sqlite,
        Ok("postgres") | Err(_) => DatabaseKind::Postgres(
            std::env::var("CHITRAM_BENCH_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        ),
        Ok(other) => panic!("CHITRAM_BENCH_DATABASE must be postgres or sqlite, not {other:?}"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    let databases = Databases::new(database);
    runtime.block_on(run(&options, &databases));
    // Chitram processes are gone by now (dropped in `run`); the databases go last.
    drop(databases);
}

// ---------------------------------------------------------------------------------------------
// The run

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Direct,
    /// A client writing each object to two S3 servers at once: what RF=2 uploads are set
    /// beside (issue 11). Uploads only; its downloads would be `Direct`'s.
    DirectTwice,
    Rf1,
    Rf2,
}

const ROUTES: [Route; 3] = [Route::Direct, Route::Rf1, Route::Rf2];
const UPLOAD_ROUTES: [Route; 4] = [Route::Direct, Route::DirectTwice, Route::Rf1, Route::Rf2];

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct S3",
            Route::DirectTwice => "direct S3, two copies",
            Route::Rf1 => "Chitram RF=1",
            Route::Rf2 => "Chitram RF=2",
        }
    }
}

struct Cell {
    op: &'static str,
    size: usize,
    concurrency: usize,
    results: Vec<(Route, Stats)>,
    /// Where the RF=1 server's upload time went (upload cells only).
    stages: StageTotals,
}

impl Cell {
    fn stats(&self, route: Route) -> Option<&Stats> {
        self.results.iter().find(|(r, _)| *r == route).map(|(_, stats)| stats)
    }

    /// `route`'s throughput over `baseline`'s, when the cell measured both.
    fn share(&self, route: Route, baseline: Route) -> Option<f64> {
        Some(self.stats(route)?.mib_per_sec() / self.stats(baseline)?.mib_per_sec())
    }
}

/// Seconds and counts of the RF=1 server's `chitram_store_stage_seconds{for="upload"}`, by
/// stage, plus its time to the upload's response head (`"response"`), summed over a cell's
/// RF=1 upload slices from `/metrics` read before and after each.
#[derive(Default, Clone)]
struct StageTotals(BTreeMap<&'static str, (f64, f64)>);

/// The stages in the order an upload passes them (`src/observability/stages.rs`).
const STAGES: [&str; 7] = ["receive", "check", "lookup", "write", "lock", "confirm", "commit"];

impl StageTotals {
    /// Reads the sums and counts out of a Prometheus exposition.
    fn parse(text: &str) -> Self {
        let samples = exposition::parse(text);
        let total = |family: &str, labels: &[(&str, &str)]| {
            let sum = exposition::sum(&samples, &format!("{family}_sum"), labels);
            (sum, exposition::sum(&samples, &format!("{family}_count"), labels))
        };
        let mut totals: BTreeMap<&'static str, (f64, f64)> = STAGES
            .iter()
            .map(|stage| (*stage, total("chitram_store_stage_seconds", &[("for", "upload"), ("stage", stage)])))
            .collect();
        let upload_route = [("method", "POST"), ("route", "/api/v1/images/upload")];
        totals.insert("response", total("chitram_http_request_duration_seconds", &upload_route));
        Self(totals)
    }

    /// Adds what happened between two readings.
    fn add_between(&mut self, before: &StageTotals, after: &StageTotals) {
        for (stage, (sum, count)) in &after.0 {
            let (sum_before, count_before) = before.0.get(stage).copied().unwrap_or_default();
            let entry = self.0.entry(*stage).or_default();
            entry.0 += sum - sum_before;
            entry.1 += count - count_before;
        }
    }

    /// Mean milliseconds per upload in `stage`.
    fn mean_ms(&self, stage: &str) -> f64 {
        match self.0.get(stage) {
            Some((sum, count)) if *count > 0.0 => sum * 1000.0 / count,
            _ => f64::NAN,
        }
    }
}

/// A batch stored with two copies: directly (two PUTs per object) and through Chitram RF=2.
struct Replication {
    size: usize,
    objects: u64,
    direct_two_puts: Stats,
    acknowledged: Stats,
    /// From the first upload until the replication queue is empty.
    until_replicated: Duration,
}

/// Everything one run measured.
#[derive(Default)]
struct Results {
    cells: Vec<Cell>,
    replication: Vec<Replication>,
    lag: Vec<Lag>,
    window: Vec<Window>,
    memory: Option<MemoryResult>,
    /// VmHWM of the RF=1 and RF=2 processes after the matrix and the replication runs.
    matrix_hwm: Vec<(&'static str, u64)>,
    load_before: String,
    load_after: String,
}

async fn run(options: &Options, databases: &Databases) {
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("chitram-bench-").tempdir().expect("a temporary directory");
    let mut results = Results { load_before: loadavg(), ..Results::default() };
    eprintln!("e2e: working in {} ({} s per cell and path)", dir.path().display(), options.secs);

    let mut servers = Vec::new();
    for i in 0..SHARDS {
        servers.push(S3Server::start(dir.path().join(format!("s3-{i}")), None).await);
    }
    let direct: Vec<S3Client> = servers.iter().map(|server| s3_client(&format!("http://{}", server.addr))).collect();
    for client in &direct {
        client.create_bucket().bucket(DIRECT_BUCKET).send().await.expect("creating the direct bucket");
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().expect("an HTTP client");
    let addrs: Vec<SocketAddr> = servers.iter().map(|server| server.addr).collect();
    let rf1 = Chitram::start(
        dir.path(),
        "rf1",
        1,
        ReplicationSetup::new(options, true),
        &databases.create("rf1").await,
        &addrs,
        &http,
    )
    .await;
    let rf2 = Chitram::start(
        dir.path(),
        "rf2",
        2,
        ReplicationSetup::new(options, true),
        &databases.create("rf2").await,
        &addrs,
        &http,
    )
    .await;
    let targets =
        Targets { direct: Arc::new(direct), rf1: rf1.base.clone(), rf2: rf2.base.clone(), http: http.clone() };

    // Warm-up: connection pools, allocators, page cache for the binaries. Not measured.
    eprintln!("e2e: warming up");
    let base = Arc::new(payload_base(MIB));
    for path in ROUTES {
        let uploaded = Arc::new(Mutex::new(Vec::new()));
        run_slice(targets.upload(path, base.clone(), uploaded.clone()), 8, Duration::ZERO, 16, 16).await;
        let objects = Arc::new(uploaded.lock().unwrap().clone());
        run_slice(targets.download(path, objects.clone(), MIB), 8, Duration::ZERO, 16, 16).await;
        targets.cleanup(path, &objects).await;
    }
    targets.drain(Route::Rf2).await;

    let budget = Duration::from_secs_f64(options.secs / SLICES as f64);
    for size in SIZES.into_iter().filter(|_| options.matrix) {
        let base = Arc::new(payload_base(size));
        for concurrency in CONCURRENCY {
            let max_ops = (CELL_CAP / size as u64 / SLICES as u64).max(concurrency as u64);
            let min_ops = concurrency as u64;
            let mut uploads: Vec<(Route, Stats)> = UPLOAD_ROUTES.iter().map(|p| (*p, Stats::default())).collect();
            let mut downloads: Vec<(Route, Stats)> = ROUTES.iter().map(|p| (*p, Stats::default())).collect();
            let objects: Vec<Arc<Mutex<Vec<String>>>> = UPLOAD_ROUTES.iter().map(|_| Arc::default()).collect();
            let mut stages = StageTotals::default();
            for slice in 0..SLICES {
                for turn in 0..UPLOAD_ROUTES.len() {
                    let i = (slice + turn) % UPLOAD_ROUTES.len();
                    let op = targets.upload(UPLOAD_ROUTES[i], base.clone(), objects[i].clone());
                    let before = if UPLOAD_ROUTES[i] == Route::Rf1 { Some(targets.rf1_stages().await) } else { None };
                    uploads[i].1.merge(run_slice(op, concurrency, budget, min_ops, max_ops).await);
                    if let Some(before) = before {
                        stages.add_between(&before, &targets.rf1_stages().await);
                    }
                    if UPLOAD_ROUTES[i] == Route::Rf2 {
                        // The next slice starts on a quiet machine.
                        targets.drain(Route::Rf2).await;
                    }
                }
            }
            let lists: Vec<Arc<Vec<String>>> =
                objects.iter().map(|o| Arc::new(std::mem::take(&mut *o.lock().unwrap()))).collect();
            for slice in 0..SLICES {
                for turn in 0..ROUTES.len() {
                    let i = (slice + turn) % ROUTES.len();
                    let uploaded = UPLOAD_ROUTES.iter().position(|route| *route == ROUTES[i]).expect("an upload route");
                    let op = targets.download(ROUTES[i], lists[uploaded].clone(), size);
                    downloads[i].1.merge(run_slice(op, concurrency, budget, min_ops, max_ops).await);
                }
            }
            for (i, path) in UPLOAD_ROUTES.iter().enumerate() {
                targets.cleanup(*path, &lists[i]).await;
            }
            targets.drain(Route::Rf2).await;
            for (op, results) in [("upload", &uploads), ("download", &downloads)] {
                let line: Vec<String> =
                    results.iter().map(|(p, s)| format!("{} {:.0} MiB/s", p.label(), s.mib_per_sec())).collect();
                eprintln!("e2e: {op} {} × {concurrency}: {}", human(size), line.join(", "));
            }
            results.cells.push(Cell { op: "upload", size, concurrency, results: uploads, stages });
            let stages = StageTotals::default();
            results.cells.push(Cell { op: "download", size, concurrency, results: downloads, stages });
        }
    }
    if options.replication {
        results.replication = replication_throughput(&targets).await;
    }
    if options.profile {
        profile_requests(&targets, rf1.child.id()).await;
    }
    if options.lag {
        results.lag = replication_lag(dir.path(), options, databases, &addrs, &http).await;
    }
    if options.window {
        results.window = failure_window(dir.path(), options, databases, &mut servers, &http).await;
    }
    results.matrix_hwm = vec![("RF=1", rf1.memory("VmHWM")), ("RF=2", rf2.memory("VmHWM"))];
    drop(rf1);
    drop(rf2);

    if options.memory {
        eprintln!("e2e: memory during {RSS_UPLOADS} concurrent {} uploads", human(RSS_SIZE));
        results.memory = Some(memory_under_large_uploads(dir.path(), options, databases, &addrs, &http).await);
    }
    results.load_after = loadavg();

    report(&results, options, databases);
    println!("\n(finished in {:.0} s)", started.elapsed().as_secs_f64());
}

/// Uploads unique copies of `base` to the Chitram at `chitram`; each answer's id goes to
/// `uploaded`, and with `acked` its checksum and the moment the 201 arrived.
fn chitram_upload(
    http: &reqwest::Client,
    chitram: &str,
    base: Arc<Bytes>,
    uploaded: Arc<Mutex<Vec<String>>>,
    acked: Option<mpsc::UnboundedSender<(String, Instant)>>,
) -> Op {
    let (http, url) = (http.clone(), format!("{chitram}/api/v1/images/upload"));
    Arc::new(move |_| {
        let (http, url, base, uploaded, acked) =
            (http.clone(), url.clone(), base.clone(), uploaded.clone(), acked.clone());
        Box::pin(async move {
            let body = stamped(&base, UNIQUE.fetch_add(1, Ordering::Relaxed));
            let len = body.len() as u64;
            let started = Instant::now();
            let mut request = http.post(&url);
            let checksum = checksum_mode();
            if checksum != ChecksumMode::None {
                let sha256 = hex::encode(Sha256::digest(&body));
                if checksum == ChecksumMode::Declared {
                    request = request.header("X-Checksum-SHA256", sha256);
                }
            }
            let part = Part::stream_with_length(body, len).file_name("bench.png").mime_str("image/png")?;
            let response = request.multipart(Form::new().part("file", part)).send().await?;
            let status = response.status();
            if status != reqwest::StatusCode::CREATED {
                bail!("upload answered {status}: {}", response.text().await.unwrap_or_default());
            }
            let image: Value = response.json().await?;
            let latency = started.elapsed();
            let id = image["id"].as_str().context("an id in the upload's answer")?.to_owned();
            if let Some(acked) = acked {
                let checksum = image["checksum"].as_str().context("a checksum in the upload's answer")?;
                let _ = acked.send((checksum.to_owned(), started + latency));
            }
            uploaded.lock().unwrap().push(id);
            Ok((len, latency))
        })
    })
}

/// What a Chitram upload's client does with its file's SHA-256 (`CHITRAM_BENCH_CHECKSUM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChecksumMode {
    /// `1`, the default: computes it and declares it (cut-through from 1 MiB).
    Declared,
    /// `hash`: computes it and sends nothing, to compare the server's two paths at the same
    /// client cost.
    HashedOnly,
    /// `0`: neither.
    None,
}

fn checksum_mode() -> ChecksumMode {
    static MODE: std::sync::OnceLock<ChecksumMode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("CHITRAM_BENCH_CHECKSUM").as_deref() {
        Ok("0") => ChecksumMode::None,
        Ok("hash") => ChecksumMode::HashedOnly,
        _ => ChecksumMode::Declared,
    })
}

/// Where each path sends its requests.
struct Targets {
    direct: Arc<Vec<S3Client>>,
    rf1: String,
    rf2: String,
    http: reqwest::Client,
}

type OpFuture = Pin<Box<dyn Future<Output = anyhow::Result<(u64, Duration)>> + Send>>;
/// One request: returns the bytes moved and the request's latency (preparation excluded).
type Op = Arc<dyn Fn(u64) -> OpFuture + Send + Sync>;

static UNIQUE: AtomicU64 = AtomicU64::new(1);
/// The Chitram processes running, for CPU accounting.
static CHITRAM_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

impl Targets {
    fn chitram(&self, path: Route) -> &str {
        if path == Route::Rf1 { &self.rf1 } else { &self.rf2 }
    }

    /// The RF=1 server's stage figures now (empty if `/metrics` does not answer).
    async fn rf1_stages(&self) -> StageTotals {
        let text = match self.http.get(format!("{}/metrics", self.rf1)).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        StageTotals::parse(&text)
    }

    fn upload(&self, path: Route, base: Arc<Bytes>, uploaded: Arc<Mutex<Vec<String>>>) -> Op {
        match path {
            Route::Direct => {
                let clients = self.direct.clone();
                Arc::new(move |_| {
                    let (clients, base, uploaded) = (clients.clone(), base.clone(), uploaded.clone());
                    Box::pin(async move {
                        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
                        let body = stamped(&base, n);
                        let (len, key, shard) = (body.len(), format!("object-{n}"), n as usize % SHARDS);
                        let started = Instant::now();
                        clients[shard]
                            .put_object()
                            .bucket(DIRECT_BUCKET)
                            .key(&key)
                            .content_length(len as i64)
                            .body(ByteStream::from(body))
                            .send()
                            .await
                            .context("direct PUT")?;
                        let latency = started.elapsed();
                        uploaded.lock().unwrap().push(format!("{shard}/{key}"));
                        Ok((len as u64, latency))
                    })
                })
            }
            Route::DirectTwice => self.upload_twice(base, uploaded),
            Route::Rf1 | Route::Rf2 => chitram_upload(&self.http, self.chitram(path), base, uploaded, None),
        }
    }

    /// A direct client storing two copies itself: each object to two servers at once.
    fn upload_twice(&self, base: Arc<Bytes>, uploaded: Arc<Mutex<Vec<String>>>) -> Op {
        let clients = self.direct.clone();
        Arc::new(move |_| {
            let (clients, base, uploaded) = (clients.clone(), base.clone(), uploaded.clone());
            Box::pin(async move {
                let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
                let body = stamped(&base, n);
                let (len, key) = (body.len(), format!("object-{n}"));
                let shards = [n as usize % SHARDS, (n as usize + 1) % SHARDS];
                let started = Instant::now();
                let puts = shards.map(|shard| {
                    clients[shard]
                        .put_object()
                        .bucket(DIRECT_BUCKET)
                        .key(&key)
                        .content_length(len as i64)
                        .body(ByteStream::from(body.clone()))
                        .send()
                });
                let [first, second] = puts;
                let (first, second) = tokio::join!(first, second);
                first.context("direct PUT")?;
                second.context("direct PUT")?;
                let latency = started.elapsed();
                uploaded.lock().unwrap().extend(shards.map(|shard| format!("{shard}/{key}")));
                Ok((len as u64, latency))
            })
        })
    }

    /// Reads objects of `size` bytes round-robin; a short or long body counts as a failure.
    fn download(&self, path: Route, objects: Arc<Vec<String>>, size: usize) -> Op {
        match path {
            Route::Direct => {
                let clients = self.direct.clone();
                Arc::new(move |n| {
                    let (clients, objects) = (clients.clone(), objects.clone());
                    Box::pin(async move {
                        let (shard, key) = objects[n as usize % objects.len()].split_once('/').expect("shard/key");
                        let started = Instant::now();
                        let output = clients[shard.parse::<usize>()?]
                            .get_object()
                            .bucket(DIRECT_BUCKET)
                            .key(key)
                            .send()
                            .await
                            .context("direct GET")?;
                        let mut body = output.body;
                        let mut len = 0u64;
                        while let Some(chunk) = body.try_next().await? {
                            len += chunk.len() as u64;
                        }
                        let latency = started.elapsed();
                        if len != size as u64 {
                            bail!("read {len} bytes of {size}");
                        }
                        Ok((len, latency))
                    })
                })
            }
            _ => {
                let (http, base) = (self.http.clone(), self.chitram(path).to_owned());
                Arc::new(move |n| {
                    let (http, url) =
                        (http.clone(), format!("{base}/api/v1/images/{}/file", objects[n as usize % objects.len()]));
                    Box::pin(async move {
                        let started = Instant::now();
                        let mut response = http.get(&url).send().await?;
                        if !response.status().is_success() {
                            bail!("download answered {}", response.status());
                        }
                        let mut len = 0u64;
                        while let Some(chunk) = response.chunk().await? {
                            len += chunk.len() as u64;
                        }
                        let latency = started.elapsed();
                        if len != size as u64 {
                            bail!("read {len} bytes of {size}");
                        }
                        Ok((len, latency))
                    })
                })
            }
        }
    }

    /// Deletes what a cell stored, so disk use stays bounded. Not measured.
    async fn cleanup(&self, path: Route, objects: &[String]) {
        let deletions = futures::stream::iter(objects.iter().cloned())
            .map(|object| async move {
                match path {
                    Route::Direct | Route::DirectTwice => {
                        let (shard, key) = object.split_once('/').expect("shard/key");
                        let client = &self.direct[shard.parse::<usize>().expect("a shard index")];
                        client
                            .delete_object()
                            .bucket(DIRECT_BUCKET)
                            .key(key)
                            .send()
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    }
                    _ => {
                        let url = format!("{}/api/v1/images/{object}", self.chitram(path));
                        match self.http.delete(url).send().await {
                            Ok(response) if response.status().is_success() => Ok(()),
                            Ok(response) => Err(format!("delete answered {}", response.status())),
                            Err(error) => Err(error.to_string()),
                        }
                    }
                }
            })
            .buffer_unordered(16);
        let failures = deletions.filter(|r| std::future::ready(r.is_err())).count().await;
        if failures > 0 {
            eprintln!("e2e: warning: {failures} deletions failed on {}", path.label());
        }
    }

    /// Waits until the replication queue of `path` is empty; returns how long that took.
    async fn drain(&self, path: Route) -> Duration {
        drain_queue(&self.http, self.chitram(path)).await
    }
}

async fn drain_queue(http: &reqwest::Client, base: &str) -> Duration {
    let started = Instant::now();
    loop {
        let depth = async {
            let status: Value = http.get(format!("{base}/api/v1/admin/replication")).send().await?.json().await?;
            anyhow::Ok(status["queue_depth"].as_u64().unwrap_or(u64::MAX))
        }
        .await;
        if let Ok(0) = depth {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(300), "the replication queue did not empty: {depth:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Load generation and statistics

#[derive(Default)]
struct Stats {
    latencies: Vec<Duration>,
    bytes: u64,
    elapsed: Duration,
    errors: u64,
    first_error: Option<String>,
    cpu: Cpu,
}

/// CPU seconds (user + system) spent while a slice ran, by process group.
#[derive(Default, Clone, Copy)]
struct Cpu {
    /// This process: the load generator.
    client: f64,
    /// The four S3 server processes.
    s3: f64,
    /// Every Chitram process.
    chitram: f64,
    /// Every process named `postgres` (the server and its backends).
    postgres: f64,
}

impl Cpu {
    fn now(chitram: &[u32]) -> Cpu {
        let postgres = std::fs::read_dir("/proc")
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres")
                    })
                    .map(cpu_seconds)
                    .sum()
            })
            .unwrap_or(0.0);
        let s3_pids = S3_PIDS.lock().unwrap().clone();
        Cpu {
            client: cpu_seconds(std::process::id()),
            s3: s3_pids.into_iter().map(cpu_seconds).sum(),
            chitram: chitram.iter().copied().map(cpu_seconds).sum(),
            postgres,
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            client: self.client - before.client,
            s3: self.s3 - before.s3,
            chitram: self.chitram - before.chitram,
            postgres: self.postgres - before.postgres,
        }
    }

    fn add(&mut self, other: Cpu) {
        self.client += other.client;
        self.s3 += other.s3;
        self.chitram += other.chitram;
        self.postgres += other.postgres;
    }

    fn total(self) -> f64 {
        self.client + self.s3 + self.chitram + self.postgres
    }
}

/// utime + stime of a process, in seconds (clock ticks of 1/100 s, the Linux value).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses: state is the first, utime the 12th.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.latencies.extend(other.latencies);
        self.bytes += other.bytes;
        self.elapsed += other.elapsed;
        self.errors += other.errors;
        self.cpu.add(other.cpu);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / MIB as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn ops_per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1].as_secs_f64() * 1000.0
    }
}

/// Runs `op` from `concurrency` workers until `budget` has passed and at least `min_ops` ran,
/// or `max_ops` ran. Wall time counts from the first request to the last answer.
async fn run_slice(op: Op, concurrency: usize, budget: Duration, min_ops: u64, max_ops: u64) -> Stats {
    let chitram_pids = CHITRAM_PIDS.lock().unwrap().clone();
    let cpu_before = Cpu::now(&chitram_pids);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (op, next) = (op.clone(), next.clone());
        workers.spawn(async move {
            let mut stats = Stats::default();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= max_ops || (n >= min_ops && started.elapsed() >= budget) {
                    break;
                }
                match op(n).await {
                    Ok((bytes, latency)) => {
                        stats.bytes += bytes;
                        stats.latencies.push(latency);
                    }
                    Err(error) => {
                        stats.errors += 1;
                        stats.first_error.get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            stats
        });
    }
    let mut total = Stats::default();
    while let Some(stats) = workers.join_next().await {
        total.merge(stats.expect("a load worker panicked"));
    }
    total.elapsed = started.elapsed();
    total.cpu = Cpu::now(&chitram_pids).since(cpu_before);
    if let Some(error) = &total.first_error {
        eprintln!("e2e: warning: {} failed requests, first: {error}", total.errors);
    }
    total
}

/// A complete PNG (Chitram walks every chunk and checks its CRC) of `size` bytes: IHDR, an
/// 8-byte private chunk `stMp` that [`stamped`] rewrites, incompressible filler as IDAT, IEND.
fn payload_base(size: usize) -> Bytes {
    let mut header = 4000u32.to_be_bytes().to_vec();
    header.extend_from_slice(&3000u32.to_be_bytes());
    header.extend_from_slice(&[8, 6, 0, 0, 0]);
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    images::png_chunk(&mut bytes, b"IHDR", &header);
    images::png_chunk(&mut bytes, b"stMp", &[0; 8]);
    let filler = size.saturating_sub(bytes.len() + 24).max(1);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = Vec::with_capacity(filler + 8);
    while data.len() < filler {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(filler);
    images::png_chunk(&mut bytes, b"IDAT", &data);
    images::png_chunk(&mut bytes, b"IEND", b"");
    Bytes::from(bytes)
}

/// Where the `stMp` chunk of [`payload_base`] starts: after the signature and IHDR.
const STAMP_CHUNK: usize = 8 + 25;

/// A copy of `base` made unique by `n` (written into the `stMp` chunk, its CRC redone).
fn stamped(base: &Bytes, n: u64) -> Bytes {
    let mut bytes = base.to_vec();
    let chunk = STAMP_CHUNK;
    bytes[chunk + 8..chunk + 16].copy_from_slice(&n.to_le_bytes());
    let crc = crc32fast::hash(&bytes[chunk + 4..chunk + 16]);
    bytes[chunk + 16..chunk + 20].copy_from_slice(&crc.to_be_bytes());
    Bytes::from(bytes)
}

/// Per size, a batch stored with two copies: by a client that PUTs each object to two servers
/// itself, and through Chitram RF=2 until its replication queue is empty (the workers poll every
/// `replication.idle_poll_ms`, 500 ms by default, when idle: part of the lag).
async fn replication_throughput(targets: &Targets) -> Vec<Replication> {
    let mut runs = Vec::new();
    for size in SIZES {
        eprintln!("e2e: two copies of {} objects", human(size));
        let objects = (256 * MIB / size).min(1024) as u64;
        let base = Arc::new(payload_base(size));
        let direct_objects = Arc::new(Mutex::new(Vec::new()));
        let op = targets.upload_twice(base.clone(), direct_objects.clone());
        let direct_two_puts = run_slice(op, 16, Duration::ZERO, objects, objects).await;
        let chitram_objects = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let op = targets.upload(Route::Rf2, base, chitram_objects.clone());
        let acknowledged = run_slice(op, 16, Duration::ZERO, objects, objects).await;
        targets.drain(Route::Rf2).await;
        let until_replicated = started.elapsed();
        let direct_objects = std::mem::take(&mut *direct_objects.lock().unwrap());
        let chitram_objects = std::mem::take(&mut *chitram_objects.lock().unwrap());
        targets.cleanup(Route::Direct, &direct_objects).await;
        targets.cleanup(Route::Rf2, &chitram_objects).await;
        targets.drain(Route::Rf2).await;
        runs.push(Replication { size, objects, direct_two_puts, acknowledged, until_replicated });
    }
    runs
}

/// Where an RF=1 upload's time goes, stage by stage, beside a direct PUT of the same bytes.
fn print_upload_stages(cells: &[Cell]) {
    let uploads: Vec<&Cell> = cells.iter().filter(|c| c.op == "upload" && !c.stages.0.is_empty()).collect();
    if uploads.is_empty() {
        return;
    }
    println!("## Where an RF=1 upload's time goes (mean ms per upload)\n");
    println!(
        "From the RF=1 server's `chitram_store_stage_seconds` over the cell's uploads; *response* is its time \
         to the response head, *other* what the stages do not cover (routing, the form's framing, the \
         answer). *direct PUT* and *client* are the means the bench's client saw.\n"
    );
    println!("| size | concurrency | direct PUT | client | response | {} | other |", STAGES.join(" | "));
    println!("|---:|---:|---:|---:|---:|{}---:|", "---:|".repeat(STAGES.len()));
    for cell in uploads {
        let mean = |stats: &Stats| {
            stats.latencies.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0
                / stats.latencies.len().max(1) as f64
        };
        let response = cell.stages.mean_ms("response");
        let staged: f64 = STAGES.iter().map(|stage| cell.stages.mean_ms(stage)).filter(|ms| ms.is_finite()).sum();
        let columns: Vec<String> = STAGES.iter().map(|stage| format!("{:.2}", cell.stages.mean_ms(stage))).collect();
        println!(
            "| {} | {} | {:.2} | {:.2} | {response:.2} | {} | {:.2} |",
            human(cell.size),
            cell.concurrency,
            cell.stats(Route::Direct).map_or(f64::NAN, mean),
            cell.stats(Route::Rf1).map_or(f64::NAN, mean),
            columns.join(" | "),
            response - staged
        );
    }
    println!();
}

/// The server binary: this build's, or `CHITRAM_BENCH_BINARY`.
fn server_binary() -> String {
    std::env::var("CHITRAM_BENCH_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_chitram").to_owned())
}

// ---------------------------------------------------------------------------------------------
// Requests for a profiler

/// 1 MiB uploads, then downloads, one at a time to the RF=1 process, with callgrind told to
/// write its counts before and between them (`callgrind_control --dump`), so each file holds
/// one kind of request. `CHITRAM_BENCH_PROFILE_OPS` requests of each (default 50).
async fn profile_requests(targets: &Targets, pid: u32) {
    let ops: u64 = std::env::var("CHITRAM_BENCH_PROFILE_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    // callgrind takes a command only while the process runs code, so a dump asked of an idle
    // server lands later, among the next requests: wait for each dump's file, waking the
    // server with probes meanwhile, before going on.
    let out_file = std::env::var("CHITRAM_BENCH_WRAPPER")
        .ok()
        .and_then(|w| w.split_whitespace().find_map(|a| a.strip_prefix("--callgrind-out-file=").map(str::to_owned)))
        .expect("the profile phase runs under callgrind with --callgrind-out-file")
        .replace("%p", &pid.to_string());
    let mut dumps = 0;
    let mut dump = async |label: &str| {
        let status = Command::new("callgrind_control").arg(format!("--dump={label}")).arg(pid.to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "callgrind_control --dump={label} {pid} failed");
        dumps += 1;
        let written = PathBuf::from(format!("{out_file}.{dumps}"));
        let started = Instant::now();
        while !written.exists() {
            assert!(started.elapsed() < Duration::from_secs(120), "callgrind did not write {}", written.display());
            let _ = targets.http.get(format!("{}/health/live", targets.rf1)).send().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    dump("before").await;
    let uploaded = Arc::new(Mutex::new(Vec::new()));
    let op = targets.upload(Route::Rf1, Arc::new(payload_base(MIB)), uploaded.clone());
    let uploads = run_slice(op, 1, Duration::ZERO, ops, ops).await;
    dump("uploads").await;
    let objects = Arc::new(std::mem::take(&mut *uploaded.lock().unwrap()));
    let downloads = run_slice(targets.download(Route::Rf1, objects.clone(), MIB), 1, Duration::ZERO, ops, ops).await;
    dump("downloads").await;
    println!(
        "profile: {} uploads and {} downloads of 1 MiB; callgrind dumped after each kind",
        uploads.latencies.len(),
        downloads.latencies.len()
    );
    targets.cleanup(Route::Rf1, &objects).await;
}

// ---------------------------------------------------------------------------------------------
// The window of one copy: from the 201 to the second copy stored, and reads while a shard is down

/// RF=2 uploads and how long each waited, after its 201, for its second copy.
struct Lag {
    label: &'static str,
    uploads: Stats,
    /// From each 201 until the metadata recorded two stored copies.
    lags: Vec<Duration>,
    /// Uploads whose second copy was not stored within a minute of the last 201.
    unfinished: usize,
}

/// 1 MiB uploads at concurrency 8 to an RF=2 Chitram, with eager copies off (the queue alone)
/// and on (the default), each watched in its metadata database until its second copy is stored.
async fn replication_lag(
    dir: &Path,
    options: &Options,
    databases: &Databases,
    servers: &[SocketAddr],
    http: &reqwest::Client,
) -> Vec<Lag> {
    if !matches!(databases.kind, DatabaseKind::Postgres(_)) {
        eprintln!("e2e: the lag phase reads the metadata on Postgres; skipped on SQLite");
        return Vec::new();
    }
    let mut runs = Vec::new();
    for (label, eager) in [("queue only (eager_copies = 0)", false), ("eager copies (the default)", true)] {
        eprintln!("e2e: time to the second copy, {label}");
        let name = if eager { "lag-eager" } else { "lag-queue" };
        let url = databases.create(name).await;
        let chitram = Chitram::start(dir, name, 2, ReplicationSetup::new(options, eager), &url, servers, http).await;
        let (acked_tx, acked) = mpsc::unbounded_channel();
        let watcher = tokio::spawn(watch_second_copies(url, acked));
        let uploaded = Arc::new(Mutex::new(Vec::new()));
        let op = chitram_upload(http, &chitram.base, Arc::new(payload_base(MIB)), uploaded, Some(acked_tx));
        let uploads = run_slice(op, 8, Duration::from_secs_f64(options.secs * 3.0), 8, u64::MAX).await;
        let (lags, unfinished) = watcher.await.expect("the watcher finishes");
        runs.push(Lag { label, uploads, lags, unfinished });
    }
    runs
}

/// Records, for each acknowledged blob, when its metadata first shows two stored copies.
/// Polls every 5 ms with one query for every blob still waiting.
async fn watch_second_copies(
    database_url: String,
    mut acked: mpsc::UnboundedReceiver<(String, Instant)>,
) -> (Vec<Duration>, usize) {
    let mut db = PgConnection::connect(&database_url).await.expect("the bench reads the metadata");
    let mut waiting: HashMap<String, Instant> = HashMap::new();
    let mut lags = Vec::new();
    let mut uploads_done_at: Option<Instant> = None;
    loop {
        loop {
            match acked.try_recv() {
                Ok((checksum, at)) => {
                    waiting.insert(checksum, at);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    uploads_done_at.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        if !waiting.is_empty() {
            let keys: Vec<String> = waiting.keys().cloned().collect();
            let stored: Vec<(String,)> = sqlx::query_as(
                "SELECT blob_checksum FROM replicas WHERE blob_checksum = ANY($1)
                 GROUP BY blob_checksum HAVING COUNT(*) FILTER (WHERE state = 'stored') >= 2",
            )
            .bind(&keys)
            .fetch_all(&mut db)
            .await
            .expect("reading the replicas");
            let now = Instant::now();
            for (checksum,) in stored {
                if let Some(at) = waiting.remove(&checksum) {
                    lags.push(now.saturating_duration_since(at));
                }
            }
        }
        match uploads_done_at {
            Some(_) if waiting.is_empty() => break,
            Some(done) if done.elapsed() > Duration::from_secs(60) => break,
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let _ = db.close().await;
    (lags, waiting.len())
}

/// Mixed traffic while one of the four shards is down.
struct Window {
    label: &'static str,
    reads: u64,
    /// Reads of acknowledged, undeleted images that did not answer 200 with every byte, by
    /// status and error code.
    failed_reads: BTreeMap<String, u64>,
    uploads: u64,
    failed_uploads: u64,
}

/// 16 clients, a quarter of their requests 200 KiB uploads and the rest reads of images
/// uploaded earlier, for three equal periods: all shards up, one S3 server killed, back up.
/// With eager copies off and on (write quorum 1, RF=2).
async fn failure_window(
    dir: &Path,
    options: &Options,
    databases: &Databases,
    servers: &mut [S3Server],
    http: &reqwest::Client,
) -> Vec<Window> {
    let addrs: Vec<SocketAddr> = servers.iter().map(|server| server.addr).collect();
    let third = Duration::from_secs_f64(options.secs * 5.0);
    let mut runs = Vec::new();
    for (label, eager) in [("queue only (eager_copies = 0)", false), ("eager copies (the default)", true)] {
        eprintln!("e2e: reads while a shard is down for {} s, {label}", third.as_secs());
        let name = if eager { "window-eager" } else { "window-queue" };
        let chitram = Chitram::start(
            dir,
            name,
            2,
            ReplicationSetup::new(options, eager),
            &databases.create(name).await,
            &addrs,
            http,
        )
        .await;
        let base = Arc::new(payload_base(200 * KIB));
        let live = Arc::new(Mutex::new(Vec::new()));
        let seed = chitram_upload(http, &chitram.base, base.clone(), live.clone(), None);
        run_slice(seed, 8, Duration::ZERO, 64, 64).await;
        let traffic = MixedTraffic { http: http.clone(), base_url: chitram.base.clone(), base, live };
        let until = Instant::now() + third * 3;
        let clients: Vec<_> = (0..16).map(|client| tokio::spawn(traffic.clone().run(client, until))).collect();
        tokio::time::sleep(third).await;
        servers[1].kill();
        tokio::time::sleep(third).await;
        servers[1].restart().await;
        let mut run = Window { label, reads: 0, failed_reads: BTreeMap::new(), uploads: 0, failed_uploads: 0 };
        for client in clients {
            let counts = client.await.expect("a traffic client");
            run.reads += counts.reads;
            run.uploads += counts.uploads;
            run.failed_uploads += counts.failed_uploads;
            for (cause, n) in counts.failed_reads {
                *run.failed_reads.entry(cause).or_default() += n;
            }
        }
        drop(chitram);
        runs.push(run);
    }
    runs
}

#[derive(Clone)]
struct MixedTraffic {
    http: reqwest::Client,
    base_url: String,
    base: Arc<Bytes>,
    live: Arc<Mutex<Vec<String>>>,
}

#[derive(Default)]
struct TrafficCounts {
    reads: u64,
    failed_reads: BTreeMap<String, u64>,
    uploads: u64,
    failed_uploads: u64,
}

impl MixedTraffic {
    async fn run(self, client: u64, until: Instant) -> TrafficCounts {
        let upload = chitram_upload(&self.http, &self.base_url, self.base.clone(), self.live.clone(), None);
        let mut counts = TrafficCounts::default();
        let mut n = client;
        while Instant::now() < until {
            n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            if n >> 62 == 0 {
                counts.uploads += 1;
                counts.failed_uploads += u64::from(upload(n).await.is_err());
                continue;
            }
            let id = {
                let live = self.live.lock().unwrap();
                live[(n >> 16) as usize % live.len()].clone()
            };
            counts.reads += 1;
            if let Err(cause) = self.read(&id).await {
                *counts.failed_reads.entry(cause).or_default() += 1;
            }
        }
        counts
    }

    /// Reads one image whole; the cause of a failure is its status and error code.
    async fn read(&self, id: &str) -> Result<(), String> {
        let url = format!("{}/api/v1/images/{id}/file", self.base_url);
        let response = self.http.get(url).send().await.map_err(|_| "no answer".to_owned())?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            let body: Value = response.json().await.unwrap_or_default();
            return Err(format!("{} {}", status.as_u16(), body["detail"]["code"].as_str().unwrap_or("?")));
        }
        let expected = self.base.len();
        match response.bytes().await {
            Ok(bytes) if bytes.len() == expected => Ok(()),
            _ => Err("200, cut short".to_owned()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Peak memory of the server under large concurrent uploads

struct MemoryResult {
    idle_rss: u64,
    sampled_peak_rss: u64,
    hwm_after_uploads: u64,
    hwm_after_replication: u64,
    wall: Duration,
    drain: Duration,
    stats: Stats,
}

async fn memory_under_large_uploads(
    dir: &Path,
    options: &Options,
    databases: &Databases,
    servers: &[SocketAddr],
    http: &reqwest::Client,
) -> MemoryResult {
    let chitram = Chitram::start(
        dir,
        "rss",
        2,
        ReplicationSetup::new(options, true),
        &databases.create("rss").await,
        servers,
        http,
    )
    .await;
    let targets =
        Targets { direct: Arc::new(Vec::new()), rf1: String::new(), rf2: chitram.base.clone(), http: http.clone() };
    // One small upload and download first, so the idle figure includes warm pools.
    let warm = Arc::new(Mutex::new(Vec::new()));
    run_slice(targets.upload(Route::Rf2, Arc::new(payload_base(MIB)), warm.clone()), 2, Duration::ZERO, 4, 4).await;
    let warm = Arc::new(warm.lock().unwrap().clone());
    run_slice(targets.download(Route::Rf2, warm, MIB), 2, Duration::ZERO, 4, 4).await;
    targets.drain(Route::Rf2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_rss = chitram.memory("VmRSS");

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, pid) = (sampling.clone(), chitram.child.id());
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(proc_status(pid, "VmRSS"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        })
    };
    // The bodies are ready before the clock starts; all 32 requests start at once.
    let base = Arc::new(payload_base(RSS_SIZE));
    let uploaded = Arc::new(Mutex::new(Vec::new()));
    let op = targets.upload(Route::Rf2, base, uploaded);
    let started = Instant::now();
    let stats = run_slice(op, RSS_UPLOADS, Duration::ZERO, RSS_UPLOADS as u64, RSS_UPLOADS as u64).await;
    let wall = started.elapsed();
    let hwm_after_uploads = chitram.memory("VmHWM");
    let drain = targets.drain(Route::Rf2).await;
    let hwm_after_replication = chitram.memory("VmHWM");
    sampling.store(false, Ordering::Relaxed);
    let sampled_peak_rss = sampler.await.expect("the sampler");
    MemoryResult { idle_rss, sampled_peak_rss, hwm_after_uploads, hwm_after_replication, wall, drain, stats }
}

/// A `/proc/PID/status` field in bytes (its value is in kB).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

// ---------------------------------------------------------------------------------------------
// Chitram as a separate process

/// The `[replication]` settings a Chitram process starts with.
#[derive(Clone, Copy)]
struct ReplicationSetup {
    /// `workers` (Chitram's default when `None`).
    workers: Option<usize>,
    /// Eager copies on (the default) or off (`eager_copies = 0`).
    eager: bool,
    /// `placement.write_quorum` of the servers with at least that many copies (the default, 1,
    /// when `None`).
    write_quorum: Option<usize>,
}

impl ReplicationSetup {
    fn new(options: &Options, eager: bool) -> Self {
        Self { workers: options.workers, eager, write_quorum: options.write_quorum }
    }
}

struct Chitram {
    child: Child,
    base: String,
    log: PathBuf,
    /// Set when the server runs under `CHITRAM_BENCH_WRAPPER`: with its config path, the real
    /// server process can be told from the wrapper, whose pid `child` holds.
    wrapped_config: Option<PathBuf>,
}

impl Chitram {
    async fn start(
        dir: &Path,
        label: &str,
        replication_factor: usize,
        setup: ReplicationSetup,
        database_url: &str,
        servers: &[SocketAddr],
        http: &reqwest::Client,
    ) -> Chitram {
        let port = free_port();
        let spool = dir.join(format!("spool-{label}"));
        std::fs::create_dir_all(&spool).expect("a spool directory");
        // The router's own cost against the S3 servers': accounts and rate limits are off here
        // (benches/auth.rs measures what they add), and so are the variant workers, which
        // would read every upload back to make its thumbnails (benches/variants.rs).
        let write_quorum = setup.write_quorum.filter(|&quorum| quorum <= replication_factor).unwrap_or(1);
        let mut config = format!(
            "[server]\nbind = \"127.0.0.1:{port}\"\nspool_dir = \"{}\"\n\
             [database]\nurl = \"{database_url}\"\n\
             [placement]\nreplication_factor = {replication_factor}\nwrite_quorum = {write_quorum}\n\
             [auth]\nenabled = false\n[rate_limits]\nenabled = false\n[variants]\nworkers = 0\n",
            spool.display()
        );
        config.push_str("[replication]\n");
        if let Some(workers) = setup.workers {
            config.push_str(&format!("workers = {workers}\n"));
        }
        if !setup.eager {
            config.push_str("eager_copies = 0\n");
        }
        for (i, addr) in servers.iter().enumerate() {
            config.push_str(&format!(
                "[[shards]]\nname = \"s{i}\"\nkind = \"s3\"\nendpoint = \"http://{addr}\"\nbucket = \"{label}\"\n\
                 access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n"
            ));
        }
        let config_path = dir.join(format!("chitram-{label}.toml"));
        std::fs::write(&config_path, config).expect("writing the config");
        let log = dir.join(format!("chitram-{label}.log"));
        // `CHITRAM_BENCH_WRAPPER` runs the server under another program, such as callgrind
        // (scripts/profile-requests.sh); it is slow to start there.
        let wrapper: Vec<String> = std::env::var("CHITRAM_BENCH_WRAPPER")
            .map(|w| w.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(server_binary());
                command
            }
            None => Command::new(server_binary()),
        };
        let start_limit = Duration::from_secs(if wrapper.is_empty() { 60 } else { 600 });
        let child = command
            .arg("--config")
            .arg(&config_path)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .spawn()
            .expect("the chitram binary starts");
        let wrapped_config = (!wrapper.is_empty()).then(|| config_path.clone());
        let mut server = Chitram { child, base: format!("http://127.0.0.1:{port}"), log, wrapped_config };
        let started = Instant::now();
        loop {
            if let Ok(response) = http.get(format!("{}/health", server.base)).send().await
                && response.status().is_success()
            {
                break;
            }
            let exited = server.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && started.elapsed() < start_limit,
                "Chitram ({label}) did not start:\n{}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("e2e: Chitram {label} (pid {}) on {}", server.child.id(), server.base);
        CHITRAM_PIDS.lock().unwrap().push(server.child.id());
        server
    }

    fn memory(&self, field: &str) -> u64 {
        proc_status(self.child.id(), field)
    }
}

impl Drop for Chitram {
    fn drop(&mut self) {
        let pid = self.child.id();
        CHITRAM_PIDS.lock().unwrap().retain(|p| *p != pid);
        // A profiler (heaptrack, callgrind) writes its data when the server exits, not when it
        // is killed: a wrapped server gets SIGTERM and a minute to stop gracefully.
        if let Some(config) = &self.wrapped_config {
            let server = format!("^{} --config {}", server_binary(), config.display());
            let _ = Command::new("pkill").arg("-TERM").arg("-f").arg(server).status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

// ---------------------------------------------------------------------------------------------
// S3 servers and the direct client

/// Set in the environment of a copy of this bench that serves one S3 server (see
/// [`S3Server`]): the server's root directory, a tab, and the address to listen on (empty: any
/// free port on 127.0.0.1).
const S3_CHILD_ENV: &str = "CHITRAM_BENCH_S3_SERVER";

/// The process ids of the running S3 servers, for the CPU figures.
static S3_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// An s3s-fs server on 127.0.0.1 in a process of its own, as a MinIO node is: the direct
/// client talks to it across processes just as Chitram does, its CPU time is its own, and
/// killing it closes its listener and every connection at once, as when a node dies. Started
/// again on the same port and files.
struct S3Server {
    addr: SocketAddr,
    root: PathBuf,
    process: std::process::Child,
}

impl S3Server {
    /// Starts a copy of this bench as an S3 server and waits until it listens.
    async fn start(root: PathBuf, addr: Option<SocketAddr>) -> S3Server {
        std::fs::create_dir_all(&root).expect("the server's root");
        let spec = format!("{}\t{}", root.display(), addr.map(|a| a.to_string()).unwrap_or_default());
        let mut process = Command::new(std::env::current_exe().expect("the bench's own path"))
            .env(S3_CHILD_ENV, spec)
            .stdin(Stdio::piped()) // Closed when this process ends: the server then exits too.
            .stdout(Stdio::piped())
            .spawn()
            .expect("an S3 server process");
        let stdout = process.stdout.take().expect("the server's stdout");
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
        })
        .await
        .expect("reading the server's address")
        .expect("the server's address");
        let addr = line.trim().parse().unwrap_or_else(|_| panic!("an S3 server announced {line:?}"));
        S3_PIDS.lock().unwrap().push(process.id());
        S3Server { addr, root, process }
    }

    /// Kills the process: its listener and every connection close.
    fn kill(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let pid = self.process.id();
        S3_PIDS.lock().unwrap().retain(|p| *p != pid);
    }

    /// Starts it again on the same port and files.
    async fn restart(&mut self) {
        self.kill();
        *self = S3Server::start(self.root.clone(), Some(self.addr)).await;
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The body of an S3 server process ([`S3_CHILD_ENV`]): serves until killed, or until the
/// bench that started it ends (its stdin closes).
fn serve_s3(spec: &str) {
    let (root, addr) = spec.split_once('\t').expect("root<TAB>address");
    let addr: SocketAddr =
        if addr.is_empty() { "127.0.0.1:0".parse().unwrap() } else { addr.parse().expect("an address") };
    std::thread::spawn(|| {
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await.expect("a port for an S3 server");
        println!("{}", listener.local_addr().expect("an address"));
        let mut builder = S3ServiceBuilder::new(s3s_fs::FileSystem::new(root).expect("s3s-fs opens its root"));
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        loop {
            let Ok((socket, _)) = listener.accept().await else { continue };
            // As real S3 servers do: without it, small responses wait on delayed ACKs.
            let _ = socket.set_nodelay(true);
            let service = service.clone();
            tokio::spawn(async move {
                let _ = ConnBuilder::new(TokioExecutor::new()).serve_connection(TokioIo::new(socket), service).await;
            });
        }
    });
}

/// The client as `src/storage/s3.rs` builds it for a shard (default timeouts, no SDK retries,
/// checksums only when required, path-style addressing).
fn s3_client(endpoint: &str) -> S3Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .force_path_style(true)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_millis(1000))
                .operation_timeout(Duration::from_secs(60))
                .build(),
        )
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "chitram-bench"))
        .build();
    S3Client::from_conf(config)
}

// ---------------------------------------------------------------------------------------------
// Metadata databases

enum DatabaseKind {
    Postgres(String),
    Sqlite,
}

/// The metadata databases of one run: Postgres databases dropped at the end (even on a panic),
/// or SQLite files in a temporary directory.
struct Databases {
    kind: DatabaseKind,
    sqlite_dir: tempfile::TempDir,
    created: Mutex<Vec<String>>,
}

impl Databases {
    fn new(kind: DatabaseKind) -> Self {
        let sqlite_dir = tempfile::Builder::new().prefix("chitram-bench-db-").tempdir().expect("a temporary directory");
        Databases { kind, sqlite_dir, created: Mutex::new(Vec::new()) }
    }

    fn describe(&self) -> String {
        match &self.kind {
            DatabaseKind::Postgres(url) => {
                format!(
                    "Postgres ({}, a throwaway database per Chitram process)",
                    url.split('@').next_back().unwrap_or(url)
                )
            }
            DatabaseKind::Sqlite => "SQLite (a file per Chitram process in a temporary directory)".to_owned(),
        }
    }

    async fn create(&self, label: &str) -> String {
        match &self.kind {
            DatabaseKind::Sqlite => format!("sqlite://{}/{label}.db", self.sqlite_dir.path().display()),
            DatabaseKind::Postgres(admin_url) => {
                let name = format!("chitram_bench_{}", uuid::Uuid::new_v4().simple());
                let mut admin = PgConnection::connect(admin_url).await.unwrap_or_else(|e| {
                    panic!(
                        "the e2e bench keeps metadata on Postgres, but {admin_url} cannot be reached ({e}); start it, \
                         set CHITRAM_BENCH_POSTGRES_URL, or run with CHITRAM_BENCH_DATABASE=sqlite"
                    )
                });
                // A database name cannot be a bind parameter; this one is built from a UUID only.
                sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await
                    .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
                let _ = admin.close().await;
                self.created.lock().unwrap().push(name.clone());
                url_for_database(admin_url, &name)
            }
        }
    }
}

impl Drop for Databases {
    fn drop(&mut self) {
        let DatabaseKind::Postgres(admin_url) = &self.kind else { return };
        let names = std::mem::take(&mut *self.created.lock().unwrap());
        if names.is_empty() {
            return;
        }
        let admin_url = admin_url.clone();
        // Drop cannot await; a runtime of its own on a thread of its own drops the databases.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await?;
                for name in names {
                    sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                        .execute(&mut admin)
                        .await?;
                }
                let _ = admin.close().await;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("e2e: warning: could not drop the bench databases (chitram_bench_*): {dropped:?}");
        }
    }
}

/// The admin URL with its database replaced by `name`, keeping any query string.
fn url_for_database(admin_url: &str, name: &str) -> String {
    let (base, query) = admin_url.split_once('?').map_or((admin_url, None), |(b, q)| (b, Some(q)));
    let authority_start = base.find("://").map_or(0, |at| at + 3);
    let server = base[authority_start..].find('/').map_or(base, |slash| &base[..authority_start + slash]);
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The report

fn human(bytes: usize) -> String {
    if bytes >= MIB { format!("{} MiB", bytes / MIB) } else { format!("{} KiB", bytes / KIB) }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    format!("{cpus} CPUs ({model}), {memory:.1} GiB RAM")
}

/// A share as a whole percentage, or a dash when the cell did not measure it.
fn percent(share: Option<f64>) -> String {
    share.map_or("—".to_owned(), |share| format!("{:.0}%", share * 100.0))
}

fn report(results: &Results, options: &Options, databases: &Databases) {
    println!("# End-to-end load: Chitram against direct S3\n");
    println!("- machine: {}; load average {} before, {} after", machine(), results.load_before, results.load_after);
    println!(
        "- S3: {SHARDS} s3s-fs servers, each a process of its own, on 127.0.0.1 (SigV4, files under a temporary directory)"
    );
    println!("- Chitram: the release binary as a separate process; metadata on {}", databases.describe());
    println!(
        "- replication workers per Chitram process: {}",
        options.workers.map_or("2 (the default)".to_owned(), |w| w.to_string())
    );
    println!(
        "- each cell: {} s per path in {SLICES} rotating slices, at most {} MiB per path; latency is per request",
        options.secs,
        CELL_CAP / MIB as u64
    );
    if options.write_quorum.is_some_and(|quorum| quorum >= 2) {
        println!("- RF=2 uploads are acknowledged after both copies are stored (write quorum 2)");
    } else {
        println!(
            "- RF=2 uploads are acknowledged after the first copy (write quorum 1); the upload then writes the \
             second copy from its own bytes (eager copies), the workers make any it could not, and the bench waits \
             for the queue to empty before the next slice (not counted)"
        );
    }
    println!(
        "- CPU: busy is all CPU time used during the cell over its wall time (the machine has {} CPUs in all); \
         ms/MiB splits it between the load generator (the bench process), the four S3 server processes, \
         Chitram, and Postgres\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let cells = &results.cells;
    for op in ["upload", "download"].into_iter().filter(|_| !cells.is_empty()) {
        println!("## {}s\n", if op == "upload" { "Upload" } else { "Download" });
        println!(
            "| size | concurrency | path | requests | MiB/s | req/s | p50 ms | p99 ms | vs direct | CPU busy | CPU ms/MiB: client + S3 servers + Chitram + Postgres |"
        );
        println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|");
        for cell in cells.iter().filter(|c| c.op == op) {
            for (path, stats) in &cell.results {
                let single = percent(cell.share(*path, Route::Direct));
                let ratio = match (*path, cell.share(*path, Route::DirectTwice)) {
                    (Route::Direct, _) => "—".to_owned(),
                    (Route::Rf2, twice @ Some(_)) => format!("{single} ({} of two copies)", percent(twice)),
                    _ => single,
                };
                let errors = if stats.errors > 0 { format!(" ({} failed)", stats.errors) } else { String::new() };
                let per_mib = |seconds: f64| seconds * 1000.0 / mib(stats.bytes).max(1e-9);
                println!(
                    "| {} | {} | {} | {}{errors} | {:.1} | {:.0} | {:.2} | {:.2} | {ratio} | {:.0}% | {:.1} + {:.1} + {:.1} + {:.1} |",
                    human(cell.size),
                    cell.concurrency,
                    path.label(),
                    stats.latencies.len(),
                    stats.mib_per_sec(),
                    stats.ops_per_sec(),
                    stats.percentile_ms(0.5),
                    stats.percentile_ms(0.99),
                    stats.cpu.total() / stats.elapsed.as_secs_f64() * 100.0,
                    per_mib(stats.cpu.client),
                    per_mib(stats.cpu.s3),
                    per_mib(stats.cpu.chitram),
                    per_mib(stats.cpu.postgres),
                );
            }
        }
        println!();
    }

    print_upload_stages(cells);

    if !cells.is_empty() {
        println!("## 1 MiB: Chitram throughput as a share of direct (targets: ≥ 90% at concurrency 1, ≥ 75% at 8)\n");
        println!("| operation | concurrency | RF=1 | RF=2 | RF=2 vs a client writing two copies |");
        println!("|---|---:|---:|---:|---:|");
    }
    for cell in cells.iter().filter(|c| c.size == MIB) {
        println!(
            "| {} | {} | {} | {} | {} |",
            cell.op,
            cell.concurrency,
            percent(cell.share(Route::Rf1, Route::Direct)),
            percent(cell.share(Route::Rf2, Route::Direct)),
            percent(cell.share(Route::Rf2, Route::DirectTwice)),
        );
    }
    println!();

    if !results.replication.is_empty() {
        println!("## Two copies of every object (concurrency 16)\n");
        println!(
            "Direct: the client PUTs each object to two servers at once. Chitram RF=2: acknowledged after the first \
             copy; \"both copies\" runs until the replication queue is empty (an idle worker polls every 500 ms).\n"
        );
        println!(
            "| size | objects | direct, two PUTs: MiB/s | Chitram acknowledged: MiB/s | Chitram both copies: MiB/s | both copies vs direct | lag after the last answer |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|");
    }
    for run in &results.replication {
        let direct = run.direct_two_puts.mib_per_sec();
        let both = mib(run.acknowledged.bytes) / run.until_replicated.as_secs_f64();
        println!(
            "| {} | {} | {direct:.1} | {:.1} | {both:.1} | {:.0}% | {:.2} s |",
            human(run.size),
            run.objects,
            run.acknowledged.mib_per_sec(),
            both / direct * 100.0,
            run.until_replicated.saturating_sub(run.acknowledged.elapsed).as_secs_f64()
        );
    }
    println!();

    if !results.lag.is_empty() {
        println!("## From the 201 to the second copy stored (1 MiB, RF=2, write quorum 1, concurrency 8)\n");
        println!(
            "Each acknowledged blob is watched in the metadata (one query every 5 ms for all that wait) until it \
             has two stored copies. Target: p99 ≤ 1 s.\n"
        );
        println!("| path | uploads | upload MiB/s | p50 | p90 | p99 | max | not stored within a minute |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    }
    for run in &results.lag {
        let lags = Stats { latencies: run.lags.clone(), ..Stats::default() };
        let max = run.lags.iter().max().copied().unwrap_or_default();
        println!(
            "| {} | {} | {:.1} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} |",
            run.label,
            run.uploads.latencies.len(),
            run.uploads.mib_per_sec(),
            lags.percentile_ms(0.5),
            lags.percentile_ms(0.9),
            lags.percentile_ms(0.99),
            max.as_secs_f64() * 1000.0,
            run.unfinished
        );
    }
    if !results.lag.is_empty() {
        println!();
    }

    if !results.window.is_empty() {
        println!("## Reads while one of four shards is down (RF=2, write quorum 1, 16 clients)\n");
        println!(
            "Three equal periods: every shard up, one S3 server process killed (SIGKILL), that server started again on its port and files. \
             A quarter of the requests upload 200 KiB; the rest read an image acknowledged earlier. Target: < 0.1% \
             of reads fail.\n"
        );
        println!("| path | reads | failed reads | share | causes | uploads (failed) |");
        println!("|---|---:|---:|---:|---|---:|");
    }
    for run in &results.window {
        let failed: u64 = run.failed_reads.values().sum();
        let causes: Vec<String> = run.failed_reads.iter().map(|(cause, n)| format!("{n}× {cause}")).collect();
        println!(
            "| {} | {} | {failed} | {:.3}% | {} | {} ({}) |",
            run.label,
            run.reads,
            failed as f64 / run.reads.max(1) as f64 * 100.0,
            if causes.is_empty() { "—".to_owned() } else { causes.join(", ") },
            run.uploads,
            run.failed_uploads
        );
    }
    if !results.window.is_empty() {
        println!();
    }

    if let Some(memory) = &results.memory {
        println!("## Server memory during {RSS_UPLOADS} concurrent {} uploads (RF=2)\n", human(RSS_SIZE));
        let in_flight = (RSS_UPLOADS * RSS_SIZE) as u64;
        println!("| measure | value |");
        println!("|---|---:|");
        println!("| bytes in flight | {:.0} MiB |", mib(in_flight));
        println!("| RSS when idle (warm) | {:.1} MiB |", mib(memory.idle_rss));
        println!("| peak RSS, sampled every 10 ms | {:.1} MiB |", mib(memory.sampled_peak_rss));
        println!("| VmHWM after the uploads | {:.1} MiB |", mib(memory.hwm_after_uploads));
        println!(
            "| growth over idle, per concurrent upload | {:.2} MiB |",
            mib(memory.hwm_after_uploads.saturating_sub(memory.idle_rss)) / RSS_UPLOADS as f64
        );
        println!("| VmHWM after replicating them | {:.1} MiB |", mib(memory.hwm_after_replication));
        println!(
            "| uploads: {} of {RSS_UPLOADS} succeeded, wall time | {:.2} s ({:.0} MiB/s) |",
            memory.stats.latencies.len(),
            memory.wall.as_secs_f64(),
            mib(memory.stats.bytes) / memory.wall.as_secs_f64()
        );
        println!("| replication queue emptied after | {:.2} s |", memory.drain.as_secs_f64());
        println!();
    }
    let hwm: Vec<String> =
        results.matrix_hwm.iter().map(|(label, bytes)| format!("{label} {:.1} MiB", mib(*bytes))).collect();
    println!("Peak RSS (VmHWM) of the two Chitram processes over the whole matrix: {}.", hwm.join(", "));
}
