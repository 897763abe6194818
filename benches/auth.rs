//! What accounts and rate limits cost (issue 12): a small authenticated GET and an upload,
//! with accounts off and with an API key, in the same run; and the rate limiter's own check,
//! in process and through a private `redis-server`. BENCHMARKS.md, "Accounts and rate limits".
//!
//! The app runs in this process (SQLite, three filesystem shards, one copy), reached over
//! loopback HTTP by one client, so the figures compare like with like; the absolute numbers
//! are this machine's.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chitram::app::Application;
use chitram::config::{RateLimitSettings, Settings, ShardSettings};
use chitram::ratelimit::{Class, RateLimiter};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use reqwest::multipart::{Form, Part};
use tokio::runtime::Runtime;

/// An app on its own temporary directory; `key` is the first admin's when accounts are on.
struct Bench {
    base: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn start(runtime: &Runtime, accounts: bool, credential_cache_secs: u64) -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.bind = "127.0.0.1:0".parse().unwrap();
    settings.database.url = format!("sqlite://{}/chitram.db", dir.path().display());
    settings.shards =
        ["a", "b", "c"].iter().map(|name| ShardSettings::fs(name, dir.path().join("shards").join(name))).collect();
    settings.placement.replication_factor = 1;
    settings.auth.enabled = accounts;
    settings.auth.admin_token_file = dir.path().join("admin-token");
    settings.auth.credential_cache_secs = credential_cache_secs;
    // The limiter's cost is measured on its own below; here it would only throttle the bench.
    settings.rate_limits.enabled = false;
    settings.maintenance.scrub_interval_secs = 0;
    let app = runtime.block_on(Application::build(&settings)).expect("the app builds");
    let base = format!("http://{}", app.local_addr());
    runtime.spawn(app.run_until_stopped(std::future::pending()));
    let mut headers = reqwest::header::HeaderMap::new();
    if accounts {
        let key = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {}", key.trim()).parse().unwrap());
    }
    let client = reqwest::Client::builder().default_headers(headers).build().unwrap();
    Bench { base, client, _dir: dir }
}

/// A valid PNG of about `len` bytes whose content depends on `seed` (each upload a new blob).
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

async fn upload(bench: &Bench, bytes: Vec<u8>) -> String {
    let form = Form::new().part("file", Part::bytes(bytes).file_name("b.png"));
    let response = bench.client.post(format!("{}/api/v1/images/upload", bench.base)).multipart(form).send().await;
    let response = response.expect("the upload is answered");
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap_or_default());
    let image: serde_json::Value = response.json().await.unwrap();
    image["id"].as_str().unwrap().to_owned()
}

fn requests(c: &mut Criterion) {
    let runtime = Runtime::new().unwrap();
    let setups = [
        ("accounts off", start(&runtime, false, 5)),
        ("API key", start(&runtime, true, 5)),
        ("API key, no credential cache", start(&runtime, true, 0)),
    ];
    let mut group = c.benchmark_group("small GET (metadata of a public image)");
    for (name, bench) in &setups {
        let id = runtime.block_on(upload(bench, png(1_000, 0)));
        let url = format!("{}/api/v1/images/{id}", bench.base);
        group.bench_function(*name, |b| {
            b.iter(|| runtime.block_on(async { bench.client.get(&url).send().await.unwrap().bytes().await.unwrap() }))
        });
    }
    group.finish();

    let size = 256 * 1024;
    let mut group = c.benchmark_group("upload 256 KiB");
    group.throughput(Throughput::Bytes(size as u64));
    group.sample_size(30);
    for (name, bench) in &setups[..2] {
        let mut seed = 1_000;
        group.bench_function(*name, |b| {
            b.iter(|| {
                seed += 1;
                runtime.block_on(upload(bench, png(size, seed)))
            })
        });
    }
    group.finish();
}

/// A private Redis on a free port, stopped when dropped.
struct PrivateRedis(Child, String);

impl PrivateRedis {
    fn start() -> Option<PrivateRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(PrivateRedis(child, format!("redis://127.0.0.1:{port}")))
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn limiter(c: &mut Criterion) {
    let runtime = Runtime::new().unwrap();
    // Limits high enough never to refuse: the cost of the check itself.
    let settings =
        RateLimitSettings { request_per_minute: u32::MAX, request_burst: u32::MAX, ..RateLimitSettings::default() };
    let mut group = c.benchmark_group("rate limiter check");
    let local = RateLimiter::new(&settings, None).unwrap();
    let mut n = 0u64;
    group.bench_function("in process", |b| {
        b.iter(|| {
            n += 1;
            runtime.block_on(local.check(Class::Request, &format!("key:{}", n % 1_000)))
        })
    });
    match PrivateRedis::start() {
        Some(redis) => {
            let shared = RateLimiter::new(&settings, Some(&redis.1)).unwrap();
            group.bench_function("Redis (loopback)", |b| {
                b.iter(|| {
                    n += 1;
                    runtime.block_on(shared.check(Class::Request, &format!("key:{}", n % 1_000)))
                })
            });
            assert_eq!(shared.shared_state(), Some(true), "the checks went to Redis");
        }
        None => eprintln!("redis-server is not installed: the Redis figure is skipped"),
    }
    group.finish();
}

criterion_group!(benches, requests, limiter);
criterion_main!(benches);
