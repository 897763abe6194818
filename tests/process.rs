//! The real binary as a separate process: killed with SIGKILL mid-replication it loses no task,
//! and on SIGTERM it finishes requests in flight and leaves unfinished tasks in the queue.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::database::{DbKind, TestDatabase};
use common::images::{large_png, png, sha256_hex};
use common::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use common::{BUCKET, eventually, replica_states};
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Postgres, three S3 servers, and a config file for the binary.
struct Deployment {
    dir: tempfile::TempDir,
    database: TestDatabase,
    servers: Vec<Arc<S3Server>>,
    client: reqwest::Client,
}

impl Deployment {
    async fn new() -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let database = TestDatabase::create(DbKind::Postgres).await;
        let mut servers = Vec::new();
        for i in 0..3 {
            servers.push(S3Server::start(&dir.path().join(format!("s3-{i}"))).await);
        }
        std::fs::create_dir_all(dir.path().join("spool")).unwrap();
        Deployment { dir, database, servers, client: reqwest::Client::new() }
    }

    /// Writes a config for one run of the binary on `port`.
    fn config(&self, port: u16) -> PathBuf {
        let mut text = format!(
            "[server]\nbind = \"127.0.0.1:{port}\"\nspool_dir = \"{spool}\"\nshutdown_grace_secs = 10\n\
             [database]\nurl = \"{url}\"\n\
             [replication]\nworkers = 2\nlease_secs = 2\nretry_min_ms = 50\nretry_max_secs = 1\nidle_poll_ms = 50\nbreaker_cooldown_ms = 200\n",
            spool = self.dir.path().join("spool").display(),
            url = self.database.url,
        );
        for (i, server) in self.servers.iter().enumerate() {
            text.push_str(&format!(
                "[[shards]]\nname = \"s{i}\"\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\n\
                 access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\nconnect_timeout_ms = 500\n",
                server.endpoint()
            ));
        }
        let path = self.dir.path().join(format!("chitram-{port}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts the binary and waits until it answers.
    async fn start(&self) -> Server {
        let port = free_port();
        let log = self.dir.path().join(format!("chitram-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_chitram"))
            .args(["--config", self.config(port).to_str().unwrap(), "serve"])
            .env("RUST_LOG", "info,sqlx=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the chitram binary starts");
        let server = Server { child, address: format!("http://127.0.0.1:{port}"), log };
        let started = Instant::now();
        while self.client.get(format!("{}/health", server.address)).send().await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "the server did not start: {}", server.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    async fn upload(&self, server: &Server, bytes: Vec<u8>) -> Value {
        let form = Form::new().part("file", Part::bytes(bytes).file_name("p.png"));
        let response =
            self.client.post(format!("{}/api/v1/images/upload", server.address)).multipart(form).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    async fn get(&self, server: &Server, path: &str) -> Value {
        self.client.get(format!("{}{path}", server.address)).send().await.unwrap().json().await.unwrap()
    }

    async fn queue_depth(&self, server: &Server) -> u64 {
        self.get(server, "/api/v1/admin/replication").await["queue_depth"].as_u64().unwrap()
    }

    /// Every image has two stored copies whose bytes hash to its checksum, and the queue is empty.
    async fn converged(&self, server: &Server, ids: &[String]) -> bool {
        if self.queue_depth(server).await > 0 {
            return false;
        }
        for id in ids {
            let image = self.get(server, &format!("/api/v1/images/{id}")).await;
            let stored: Vec<String> =
                replica_states(&image).into_iter().filter(|(_, s)| s == "stored").map(|(shard, _)| shard).collect();
            if stored.len() != 2 {
                return false;
            }
            let checksum = image["checksum"].as_str().unwrap();
            for shard in stored {
                let index: usize = shard[1..].parse().unwrap();
                let bytes = std::fs::read(self.servers[index].object_path(BUCKET, checksum)).unwrap_or_default();
                assert_eq!(sha256_hex(&bytes), checksum, "the copy on {shard} is intact");
            }
        }
        true
    }

    async fn count(&self, sql: &'static str) -> i64 {
        let pool = sqlx::PgPool::connect(&self.database.url).await.unwrap();
        let count: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
        pool.close().await;
        count
    }
}

struct Server {
    child: Child,
    address: String,
    log: PathBuf,
}

impl Server {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    async fn wait_for_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < limit, "the server did not exit: {}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkill_during_replication_loses_no_task() {
    let deployment = Deployment::new().await;
    let mut first = deployment.start().await;
    deployment.servers[2].stop().await;
    let mut ids = Vec::new();
    for seed in 0..24 {
        let image = deployment.upload(&first, large_png(512 * 1024, 70_000 + seed)).await;
        ids.push(image["id"].as_str().unwrap().to_owned());
    }
    let queued = deployment.queue_depth(&first).await;
    assert!(queued > 0, "copies for the stopped shard are queued");

    // Let replication start, then kill the process in the middle of it.
    deployment.servers[2].restart().await;
    let started = Instant::now();
    while deployment.queue_depth(&first).await == queued && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.child.kill().unwrap();
    first.wait_for_exit(Duration::from_secs(10)).await;
    let left = deployment.count("SELECT count(*) FROM replication_tasks").await;
    let pending = deployment.count("SELECT count(*) FROM replicas WHERE state <> 'stored'").await;
    println!("killed with {left} of {queued} tasks left");
    assert_eq!(left, pending, "every copy not yet stored still has its task");

    let second = deployment.start().await;
    eventually(Duration::from_secs(60), "the restarted process finishes replication", || {
        deployment.converged(&second, &ids)
    })
    .await;
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_requests_in_flight_and_leaves_tasks_queued() {
    let deployment = Deployment::new().await;
    let mut server = deployment.start().await;
    deployment.servers[1].stop().await;
    for seed in 0..6 {
        deployment.upload(&server, png(4, 4, 80_000 + seed)).await;
    }
    assert!(deployment.queue_depth(&server).await > 0);

    // An upload in flight: headers and half the body sent.
    let image = png(32, 32, 80_100);
    let body = [
        b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"late.png\"\r\n\r\n".as_slice(),
        &image,
        b"\r\n--B--\r\n",
    ]
    .concat();
    let address = server.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /api/v1/images/upload HTTP/1.1\r\nHost: {address}\r\nContent-Type: multipart/form-data; boundary=B\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..body.len() / 2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    server.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(tokio::net::TcpStream::connect(&address).await.is_err(), "no new connections after SIGTERM");

    stream.write_all(&body[body.len() / 2..]).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "the request in flight completes: {response}");

    let status = server.wait_for_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "a clean exit: {status:?}\n{}", server.log_text());
    let queued = deployment.count("SELECT count(*) FROM replication_tasks").await;
    let claimed = deployment.count("SELECT count(*) FROM replication_tasks WHERE claimed_by IS NOT NULL").await;
    assert!(queued > 0, "unfinished tasks stay in the queue");
    assert_eq!(claimed, 0, "and are free for the next instance at once");
}

/// Runs the binary with a config and returns (success, stdout, stderr).
fn run_cli(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_chitram")).arg("--config").arg(config).args(args).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn fs_config(dir: &std::path::Path, shards: &[&str], extra: &str) -> String {
    let mut text =
        format!("[database]\nurl = \"sqlite://{}/chitram.db\"\n[placement]\nreplication_factor = 1\n", dir.display());
    for shard in shards {
        text.push_str(&format!(
            "[[shards]]\nname = \"{shard}\"\nkind = \"fs\"\npath = \"{}/{shard}\"\n",
            dir.display()
        ));
    }
    text.push_str(extra);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_commands_plan_move_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old.toml"), dir.path().join("new.toml"));
    std::fs::write(&old, fs_config(dir.path(), &["a", "b", "c"], "")).unwrap();
    std::fs::write(&new, fs_config(dir.path(), &["a", "b", "c", "d"], "")).unwrap();

    // Some images, stored through the library on the old config.
    let mut settings = chitram::config::Settings::load(Some(&old)).unwrap();
    settings.server.bind = "127.0.0.1:0".parse().unwrap();
    let app = chitram::app::Application::build(&settings).await.unwrap();
    let address = format!("http://{}", app.local_addr());
    let server = tokio::spawn(app.run_until_stopped(std::future::pending()));
    let client = reqwest::Client::new();
    for seed in 0..40 {
        let form = Form::new().part("file", Part::bytes(png(3, 3, 90_000 + seed)).file_name("c.png"));
        let response = client.post(format!("{address}/api/v1/images/upload")).multipart(form).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    server.abort();

    let (ok, ring, _) = run_cli(&old, &["ring", "--compare", new.to_str().unwrap()]);
    assert!(ok, "{ring}");
    for expected in ["peak-to-mean", "expected movement", "plan (exactly, from the metadata)", "-> d"] {
        assert!(ring.contains(expected), "`ring --compare` prints {expected:?}:\n{ring}");
    }
    let (ok, dry, _) = run_cli(&new, &["rebalance", "--dry-run"]);
    assert!(ok && dry.contains("dry run"), "{dry}");
    let (ok, moved, stderr) = run_cli(&new, &["rebalance"]);
    assert!(ok, "{moved}\n{stderr}");
    assert!(moved.contains("rebalance done"), "{moved}");
    let (ok, again, _) = run_cli(&new, &["rebalance", "--dry-run"]);
    assert!(ok && again.contains(": 0 of 40 blobs move"), "{again}");
    let (ok, scrub, _) = run_cli(&new, &["scrub", "--checksums"]);
    assert!(ok, "a clean store scrubs clean:\n{scrub}");
    assert!(scrub.contains("40 blobs, 40 copies checked"), "{scrub}");

    // A lost copy makes scrub exit non-zero and name it.
    let victim = first_object(&dir.path().join("d")).expect("d received copies");
    std::fs::remove_file(&victim).unwrap();
    let (ok, scrub, _) = run_cli(&new, &["scrub"]);
    assert!(!ok, "problems make scrub fail:\n{scrub}");
    assert!(scrub.contains("LOST") && scrub.contains(victim.file_name().unwrap().to_str().unwrap()), "{scrub}");

    let (bad_config_ok, _, stderr) = run_cli(&dir.path().join("missing.toml"), &["ring"]);
    assert!(!bad_config_ok && stderr.contains("missing.toml"), "{stderr}");
}

fn first_object(dir: &std::path::Path) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() && !name.starts_with('.') {
            if let Some(found) = first_object(&path) {
                return Some(found);
            }
        } else if name.len() == 64 {
            return Some(path);
        }
    }
    None
}
