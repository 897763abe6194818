//! The real binary as a separate process: killed with SIGKILL mid-replication it loses no task,
//! and on SIGTERM it finishes requests in flight and leaves unfinished tasks in the queue.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::database::{DbKind, TestDatabase};
use common::half_sent::HalfSentUpload;
use common::images::{jpeg, large_png, png, sha256_hex};
use common::s3::{ACCESS_KEY, Faults, S3Server, SECRET_KEY};
use common::{BUCKET, eventually, replica_states};
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

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
             [auth]\nenabled = false\n\
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
    let address = server.address.trim_start_matches("http://").to_owned();
    let in_flight = HalfSentUpload::start(&address, "late.png", &image).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    server.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(tokio::net::TcpStream::connect(&address).await.is_err(), "no new connections after SIGTERM");

    let response = in_flight.finish().await;
    assert!(response.starts_with("HTTP/1.1 201"), "the request in flight completes: {response}");

    let status = server.wait_for_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "a clean exit: {status:?}\n{}", server.log_text());
    let queued = deployment.count("SELECT count(*) FROM replication_tasks").await;
    let claimed = deployment.count("SELECT count(*) FROM replication_tasks WHERE claimed_by IS NOT NULL").await;
    assert!(queued > 0, "unfinished tasks stay in the queue");
    assert_eq!(claimed, 0, "and are free for the next instance at once");
}

/// SIGTERM while a worker's DELETE waits on a late shard: the process stays until the DELETE is
/// answered or its copy fenced (the control deadline, 1 s), rather than exit with it in flight
/// and unfenced, where it could later remove a copy of the same bytes uploaded after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_a_late_delete_leaves_its_copy_fenced() {
    let deployment = Deployment::new().await;
    let mut server = deployment.start().await;
    let image = deployment.upload(&server, png(8, 8, 81_000)).await;
    let id = image["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(20), "both copies are stored", || {
        deployment.converged(&server, std::slice::from_ref(&id))
    })
    .await;
    let image = deployment.get(&server, &format!("/api/v1/images/{id}")).await;
    let holder: usize = replica_states(&image)[0].0[1..].parse().unwrap();
    // Down when the image is deleted, so its copy there is left to a worker's delete task;
    // then back, answering DELETEs late.
    deployment.servers[holder].stop().await;
    let deleted = deployment.client.delete(format!("{}/api/v1/images/{id}", server.address)).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let late = Faults { late: Some(Duration::from_secs(20)), late_method: Some("DELETE"), ..Faults::default() };
    deployment.servers[holder].misbehave(late).await;
    eventually(Duration::from_secs(20), "a worker sends the DELETE", || async {
        deployment.servers[holder].faults.delayed() >= 1
    })
    .await;

    server.signal("-TERM");
    let status = server.wait_for_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "a clean exit: {status:?}\n{}", server.log_text());
    let fenced = deployment.count("SELECT count(*) FROM replicas WHERE delete_in_doubt_until > now()").await;
    assert_eq!(fenced, 1, "the copy whose DELETE was in flight is fenced\n{}", server.log_text());
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
    let mut text = format!(
        "[database]\nurl = \"sqlite://{}/chitram.db\"\n[placement]\nreplication_factor = 1\n[auth]\nenabled = false\n",
        dir.display()
    );
    for shard in shards {
        text.push_str(&format!(
            "[[shards]]\nname = \"{shard}\"\nkind = \"fs\"\npath = \"{}/{shard}\"\n",
            dir.display()
        ));
    }
    text.push_str(extra);
    text
}

/// A process killed mid-upload leaves its spool file behind (nothing ran to remove it): the
/// next start removes such leftovers, and never a file young enough to be another instance's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_removes_the_spool_files_a_killed_process_left() {
    let app = common::spawn_app_with(common::Backends::POSTGRES_S3, common::TestOptions::default()).await;
    let spool = app.settings.server.spool_dir.clone().unwrap();
    let (leftover, in_use) = (spool.join("chitram-upload-killed"), spool.join("chitram-upload-running"));
    for path in [&leftover, &in_use] {
        std::fs::write(path, vec![7u8; 4096]).unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::options().write(true).open(&leftover).unwrap().set_modified(two_hours_ago).unwrap();

    let restarted = app.spawn_sibling(0).await;
    assert!(!leftover.exists(), "the leftover is removed at start");
    assert!(in_use.exists(), "a young spool file may be a live upload's: it stays");
    restarted.upload_ok("after.png", png(3, 3, 77)).await;
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
    for expected in ["keys with a moved copy:", "(ideal 25.00%)", "copies moved:"] {
        assert!(ring.contains(expected), "`ring --compare` prints {expected:?}:\n{ring}");
    }
    // `serve` on the new config creates the new shard's directory; operator commands never do.
    let (ok, refused, _) = run_cli(&new, &["rebalance", "--dry-run"]);
    assert!(ok && refused.contains("warning: shard d is down") && refused.contains("does not exist"), "{refused}");
    assert!(!dir.path().join("d").exists(), "rebalance created no directory");
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let (ok, dry, _) = run_cli(&new, &["rebalance", "--dry-run"]);
    assert!(ok && dry.contains("dry run"), "{dry}");
    let (ok, moved, stderr) = run_cli(&new, &["rebalance"]);
    assert!(ok, "{moved}\n{stderr}");
    assert!(moved.contains("rebalance done"), "{moved}");
    let (ok, again, _) = run_cli(&new, &["rebalance", "--dry-run"]);
    assert!(ok && again.contains(": 0 of 40 blobs move"), "{again}");
    // docs/operations.md's cron line: `scrub --checksums >> LOG 2>&1`, a clean store exits 0.
    let cron_log = dir.path().join("chitram-scrub.log");
    std::fs::write(&cron_log, "an earlier run\n").unwrap();
    let append = || std::fs::OpenOptions::new().append(true).open(&cron_log).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_chitram"))
        .arg("--config")
        .arg(&new)
        .args(["scrub", "--checksums"])
        .env_remove("NO_COLOR")
        .stdout(append())
        .stderr(append())
        .status()
        .unwrap();
    let scrub = std::fs::read_to_string(&cron_log).unwrap();
    assert!(status.success(), "a clean store scrubs clean:\n{scrub}");
    assert!(scrub.starts_with("an earlier run\n") && scrub.contains("40 blobs, 40 copies checked"), "{scrub}");
    assert!(!scrub.contains('\x1b'), "no colour codes in a log file:\n{scrub}");

    // A lost copy makes scrub exit non-zero and name it; `--repair` never drops the row, and
    // once the object is restored from a backup `scrub --repair` stores it again and exits 0.
    let victim = first_object(&dir.path().join("d")).expect("d received copies");
    let backup = std::fs::read(&victim).unwrap();
    std::fs::remove_file(&victim).unwrap();
    let (ok, scrub, _) = run_cli(&new, &["scrub"]);
    assert!(!ok, "problems make scrub fail:\n{scrub}");
    assert!(scrub.contains("LOST") && scrub.contains(victim.file_name().unwrap().to_str().unwrap()), "{scrub}");
    let (ok, scrub, _) = run_cli(&new, &["scrub", "--repair"]);
    assert!(!ok && scrub.contains("LOST"), "a lost blob stays reported:\n{scrub}");
    std::fs::write(&victim, &backup).unwrap();
    let (ok, scrub, stderr) = run_cli(&new, &["scrub", "--repair"]);
    assert!(ok, "the restored copy is stored again:\n{scrub}{stderr}");
    let (ok, scrub, _) = run_cli(&new, &["scrub"]);
    assert!(ok, "{scrub}");

    // Drain and remove d, as docs/operations.md says: the service refuses to start without it
    // while it holds the only copies, `ring` shows it draining, `rebalance` empties it.
    let serve_without_d = || {
        Command::new(env!("CARGO_BIN_EXE_chitram"))
            .arg("--config")
            .arg(&old)
            .arg("serve")
            .env("CHITRAM__SERVER__BIND", "127.0.0.1:0")
            .output()
            .unwrap()
    };
    let refused = serve_without_d();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("blobs have their only stored copies on shards missing from the config (d)"), "{stderr}");
    let drain = dir.path().join("drain.toml");
    std::fs::write(&drain, fs_config(dir.path(), &["a", "b", "c", "d"], "draining = true\n")).unwrap();
    let (ok, ring, _) = run_cli(&drain, &["ring"]);
    assert!(ok && ring.lines().any(|line| line.starts_with("d ") && line.contains("draining")), "{ring}");
    let (ok, moved, stderr) = run_cli(&drain, &["rebalance", "--verify"]);
    assert!(ok, "{moved}{stderr}");
    let (ok, ring, _) = run_cli(&drain, &["ring"]);
    let emptied = ring.lines().any(|line| line.split_whitespace().collect::<Vec<_>>() == ["d", "draining", "0", "0"]);
    assert!(ok && emptied, "d holds 0 stored copies:\n{ring}");
    let (ok, ring, _) = run_cli(&old, &["ring"]);
    assert!(ok, "{ring}");

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

/// Runs the binary in `dir` with no config file, with `env` set; returns (success, stdout, stderr).
fn run_in(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chitram"));
    command.current_dir(dir).args(args).env_remove("CHITRAM_CONFIG").env_remove("NO_COLOR");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn operator_commands_refuse_a_database_that_does_not_exist_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let expected_file = dir.path().canonicalize().unwrap().join("data/chitram.db");
    for args in
        [&["scrub", "--checksums"][..], &["scrub", "--repair"], &["rebalance"], &["rebalance", "--dry-run"], &["ring"]]
    {
        let (ok, stdout, stderr) = run_in(dir.path(), args, &[]);
        assert!(!ok, "`chitram {args:?}` fails in an empty directory:\n{stdout}{stderr}");
        assert!(!stdout.contains("scrub done"), "no all-clear about nothing:\n{stdout}");
        assert!(
            stderr.contains("the metadata database sqlite://data/chitram.db does not exist")
                && stderr.contains(&expected_file.display().to_string())
                && stderr.contains("chitram migrate"),
            "`chitram {args:?}` names the file it looked for and the fix:\n{stderr}"
        );
        let created: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(created.is_empty(), "`chitram {args:?}` created nothing: {created:?}");
    }

    // An empty SQLite file is a database that was never migrated.
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/chitram.db"), b"").unwrap();
    let (ok, _, stderr) = run_in(dir.path(), &["scrub"], &[]);
    assert!(!ok && stderr.contains("sqlite://data/chitram.db has no Chitram tables"), "{stderr}");
    assert!(!dir.path().join("data/shards").exists(), "no shard directory either");

    // `migrate` creates it; then scrub runs, and the missing shard directories are shards that
    // are down, not directories to create.
    let (ok, _, stderr) = run_in(dir.path(), &["migrate"], &[]);
    assert!(ok, "{stderr}");
    let (ok, report, _) = run_in(dir.path(), &["scrub"], &[]);
    assert!(!ok, "unreachable shards keep scrub from an all-clear:\n{report}");
    assert!(report.contains("does not exist"), "{report}");
    assert!(!dir.path().join("data/shards").exists(), "scrub created no shard directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_refuse_an_unmigrated_postgres_database_without_showing_its_password() {
    let database = TestDatabase::create(DbKind::Postgres).await;
    let (scheme, rest) = database.url.split_once("://").unwrap();
    let (user, server) = rest.split_once('@').unwrap();
    let user = user.split(':').next().unwrap();
    let with_password = format!("{scheme}://{user}:hunter2-secret@{server}");
    let dir = tempfile::tempdir().unwrap();
    let env = [("CHITRAM__DATABASE__URL", with_password.as_str())];

    let (ok, _, stderr) = run_in(dir.path(), &["scrub"], &env);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("has no Chitram tables") && stderr.contains(&format!("{user}:***@")), "{stderr}");
    assert!(!stderr.contains("hunter2-secret"), "the password stays out of the message:\n{stderr}");

    let missing = with_password.replace("chitram_test_", "chitram_absent_");
    let (ok, _, stderr) = run_in(dir.path(), &["rebalance"], &[("CHITRAM__DATABASE__URL", missing.as_str())]);
    assert!(!ok && stderr.contains("chitram_absent_") && stderr.contains("does not exist"), "{stderr}");
    assert!(!stderr.contains("hunter2-secret"), "{stderr}");

    let (ok, stdout, stderr) = run_in(dir.path(), &["migrate"], &env);
    assert!(ok && !stderr.contains("hunter2-secret"), "{stderr}");
    assert!(stdout.contains(&format!("migrations applied to {scheme}://{user}:***@")), "{stdout}");
    // A password passed as a query parameter stays out of the output too.
    let in_query = format!("{scheme}://{user}@{server}?password=hunter2-secret");
    let (ok, stdout, stderr) = run_in(dir.path(), &["migrate"], &[("CHITRAM__DATABASE__URL", in_query.as_str())]);
    assert!(ok && !stdout.contains("hunter2-secret") && !stderr.contains("hunter2-secret"), "{stdout}{stderr}");
    let (ok, ring, stderr) = run_in(dir.path(), &["ring"], &env);
    assert!(ok, "once migrated, the commands run:\n{ring}{stderr}");
}

#[test]
fn relative_paths_in_a_config_file_resolve_against_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/chitram.toml"),
        "[database]\nurl = \"sqlite://db/chitram.db\"\n[placement]\nreplication_factor = 1\n\
         [[shards]]\nname = \"a\"\nkind = \"fs\"\npath = \"shards/a\"\n",
    )
    .unwrap();
    let (ok, _, stderr) = run_in(&root, &["--config", "etc/chitram.toml", "migrate"], &[]);
    assert!(ok, "{stderr}");
    assert!(root.join("etc/db/chitram.db").is_file(), "the database sits beside the config file");
    assert!(!root.join("db").exists(), "not in the working directory");

    // From anywhere else, the same file names the same database and shard.
    let elsewhere = tempfile::tempdir().unwrap();
    let config = root.join("etc/chitram.toml");
    let (ok, printed, stderr) = run_in(elsewhere.path(), &["--config", config.to_str().unwrap(), "config"], &[]);
    assert!(ok, "{stderr}");
    assert!(printed.contains(&format!("url = \"sqlite://{}\"", root.join("etc/db/chitram.db").display())), "{printed}");
    assert!(printed.contains(&format!("path = \"{}\"", root.join("etc/shards/a").display())), "{printed}");
    let (ok, from_env, _) = run_in(elsewhere.path(), &["config"], &[("CHITRAM_CONFIG", config.to_str().unwrap())]);
    assert!(ok && from_env == printed, "CHITRAM_CONFIG=FILE is --config FILE:\n{from_env}");
    let (ok, ring, stderr) = run_in(elsewhere.path(), &["--config", config.to_str().unwrap(), "ring"], &[]);
    assert!(ok, "{ring}{stderr}");
    assert!(std::fs::read_dir(elsewhere.path()).unwrap().next().is_none(), "nothing appears in the working directory");
}

#[test]
fn the_printed_configuration_masks_secrets_and_feeds_ring_compare() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = [("CHITRAM__DATABASE__URL", "postgres://chitram:pg-secret-1@db.internal:5432/chitram")];
    std::fs::write(
        dir.path().join("s3.toml"),
        "[placement]\nreplication_factor = 1\n[[shards]]\nname = \"m\"\nkind = \"s3\"\nbucket = \"b\"\n\
         access_key_id = \"AKIDEXAMPLE\"\nsecret_access_key = \"s3-secret-2\"\n",
    )
    .unwrap();
    let (ok, printed, stderr) = run_in(dir.path(), &["--config", "s3.toml", "config"], &secrets);
    assert!(ok, "{stderr}");
    assert!(!printed.contains("pg-secret-1") && !printed.contains("s3-secret-2"), "{printed}");
    assert!(printed.contains("postgres://chitram:***@db.internal:5432/chitram"), "{printed}");
    assert!(printed.contains("secret_access_key = \"***\""), "{printed}");
    let loaded = chitram::config::Settings::from_toml(&printed).expect("the output is a config");
    let mut expected = chitram::config::Settings::default();
    expected.database.url = "postgres://chitram:***@db.internal:5432/chitram".to_owned();
    expected.placement.replication_factor = 1;
    let mut shard = chitram::config::ShardSettings::fs("m", "unused");
    (shard.kind, shard.path, shard.bucket) = (chitram::config::ShardKind::S3, None, Some("b".to_owned()));
    (shard.access_key_id, shard.secret_access_key) = (Some("AKIDEXAMPLE".to_owned()), Some("***".to_owned()));
    expected.shards = vec![shard];
    assert_eq!(loaded, expected);

    // On the embedded default: save it, write the grown ring, and compare.
    let (ok, current, _) = run_in(dir.path(), &["config"], &[]);
    assert!(ok);
    std::fs::write(dir.path().join("current.toml"), &current).unwrap();
    let grown = format!("{current}\n[[shards]]\nname = \"d\"\nkind = \"fs\"\npath = \"data/shards/d\"\n");
    std::fs::write(dir.path().join("new.toml"), grown).unwrap();
    let (ok, _, stderr) = run_in(dir.path(), &["migrate"], &[]);
    assert!(ok, "{stderr}");
    let (ok, ring, stderr) = run_in(dir.path(), &["--config", "current.toml", "ring", "--compare", "new.toml"], &[]);
    assert!(ok, "{ring}{stderr}");
    let keys = ring.lines().find(|line| line.contains("keys with a moved copy")).unwrap_or_default();
    let copies = ring.lines().find(|line| line.contains("copies moved")).unwrap_or_default();
    assert!(keys.ends_with("(ideal 50.00%)"), "half the keys move one of their two copies:\n{ring}");
    assert!(copies.ends_with("(ideal 25.00%)"), "a quarter of the copies move:\n{ring}");
    let (ok, same, _) = run_in(dir.path(), &["ring", "--compare", "current.toml"], &[]);
    assert!(ok && same.contains("(ideal 0.00%)"), "the saved default is the default:\n{same}");
}

/// Starts `serve` in `dir` with stderr to a file, waits for its first log lines, and returns them.
fn serve_log(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Vec<u8> {
    let log = dir.join(format!("serve-{}.log", args.len()));
    let mut command = Command::new(env!("CARGO_BIN_EXE_chitram"));
    command
        .current_dir(dir)
        .args(args)
        .arg("serve")
        .env_remove("CHITRAM_CONFIG")
        .env_remove("NO_COLOR")
        .env("CHITRAM__SERVER__BIND", "127.0.0.1:0")
        .env("CHITRAM__MAINTENANCE__SCRUB_INTERVAL_SECS", "0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let started = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("serving") {
        assert!(started.elapsed() < Duration::from_secs(30), "serve did not start: {:?}", std::fs::read(&log));
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read(&log).unwrap()
}

#[test]
fn logs_into_a_file_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    const ESC: u8 = 0x1b;
    let auto = serve_log(dir.path(), &[], &[]);
    assert!(!auto.contains(&ESC), "stderr is a file: no ANSI codes\n{}", String::from_utf8_lossy(&auto));
    let always = serve_log(dir.path(), &["--log-color", "always"], &[]);
    assert!(always.contains(&ESC), "--log-color always colours even a file");
    let never = serve_log(dir.path(), &["--log-color=never"], &[("NO_COLOR", "1")]);
    assert!(!never.contains(&ESC));
}

/// Runs `curl ARGS` in `dir`; returns its stdout, asserting that curl succeeded.
fn curl(dir: &std::path::Path, args: &[&str]) -> String {
    let output = Command::new("curl").current_dir(dir).arg("-sS").args(args).output().expect("curl runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "curl {args:?}: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// The README's "Run it" (`chitram serve` on the embedded default, in an empty directory) and
/// every curl example of "The API", run as written against the real binary.
#[test]
fn the_readme_serve_and_curl_examples_work_against_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, printed, _) = run_in(dir.path(), &["config"], &[]);
    assert!(ok && printed.contains("bind = \"127.0.0.1:8000\""), "the default address:\n{printed}");

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("serve.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitram"))
        .current_dir(dir.path())
        .arg("serve")
        .env_remove("CHITRAM_CONFIG")
        .env("CHITRAM__SERVER__BIND", format!("127.0.0.1:{port}")) // 8000 may be taken here
        .env("CHITRAM__MAINTENANCE__SCRUB_INTERVAL_SECS", "0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("serving") {
        assert!(started.elapsed() < Duration::from_secs(30), "serve did not start: {:?}", std::fs::read(&log));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(dir.path().join("data/chitram.db").is_file(), "SQLite at ./data/chitram.db");
    for shard in ["a", "b", "c"] {
        assert!(dir.path().join("data/shards").join(shard).is_dir(), "shard {shard} under ./data/shards");
    }
    let docs = curl(dir.path(), &["-L", "-o", "/dev/null", "-w", "%{http_code}", &format!("{base}/docs")]);
    assert_eq!(docs, "200", "the interactive API page");
    // The first start wrote the first admin's key, readable by its owner only.
    let token_file = dir.path().join("data/admin-token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    let key = std::fs::read_to_string(&token_file).unwrap().trim().to_owned();
    assert!(key.starts_with("chm_"), "{key}");
    let auth = format!("Authorization: Bearer {key}");
    let refused = curl(dir.path(), &["-o", "/dev/null", "-w", "%{http_code}", &format!("{base}/api/v1/images")]);
    assert_eq!(refused, "401", "without the key");

    let cat = png(64, 48, 95_000);
    std::fs::write(dir.path().join("cat.png"), &cat).unwrap();
    std::fs::write(dir.path().join("a.png"), png(8, 8, 95_001)).unwrap();
    std::fs::write(dir.path().join("b.jpg"), jpeg(8, 8, 95_002)).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    let json = |text: &str| -> Value { serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}")) };

    let image = json(&curl(dir.path(), &["-H", &auth, "-F", "file=@cat.png", &format!("{base}/api/v1/images/upload")]));
    let id = image["id"].as_str().unwrap().to_owned();
    assert_eq!((image["filename"].as_str(), image["width"].as_u64()), (Some("cat.png"), Some(64)), "{image}");
    assert_eq!(image["replicas"].as_array().map(Vec::len), Some(2), "two copies: {image}");

    let batch = json(&curl(
        dir.path(),
        &[
            "-H",
            &auth,
            "-F",
            "files=@a.png",
            "-F",
            "files=@b.jpg",
            "-F",
            "files=@notes.txt",
            &format!("{base}/api/v1/images/batch"),
        ],
    ));
    assert_eq!((batch["succeeded"].as_u64(), batch["failed"].as_u64()), (Some(2), Some(1)), "{batch}");
    assert_eq!(batch["results"][2]["status"], 400, "{batch}");
    assert_eq!(batch["results"][2]["error"]["code"], "INVALID_FILE_FORMAT", "{batch}");

    let page = json(&curl(dir.path(), &["-H", &auth, &format!("{base}/api/v1/images?limit=50")]));
    assert_eq!(page["items"].as_array().map(Vec::len), Some(3), "{page}");
    let first = json(&curl(dir.path(), &["-H", &auth, &format!("{base}/api/v1/images?limit=2")]));
    let cursor = first["next_cursor"].as_str().expect("a next page").to_owned();
    let rest = json(&curl(dir.path(), &["-H", &auth, &format!("{base}/api/v1/images?limit=50&cursor={cursor}")]));
    assert_eq!(rest["items"][0]["id"].as_str(), Some(id.as_str()), "the oldest comes last: {rest}");

    let found = json(&curl(dir.path(), &[&format!("{base}/api/v1/images/{id}")]));
    assert_eq!(found["checksum"], image["checksum"]);
    let downloads = dir.path().join("downloads");
    std::fs::create_dir(&downloads).unwrap();
    curl(&downloads, &["-o", "cat.png", &format!("{base}/api/v1/images/{id}/file")]);
    assert_eq!(std::fs::read(downloads.join("cat.png")).unwrap(), cat, "the bytes, as uploaded");
    let etag = format!("If-None-Match: \"{}\"", image["checksum"].as_str().unwrap());
    let revalidated = curl(dir.path(), &["-H", &etag, "-i", &format!("{base}/api/v1/images/{id}/file")]);
    assert!(revalidated.starts_with("HTTP/1.1 304"), "{revalidated}");
    let private = curl(
        dir.path(),
        &[
            "-H",
            &auth,
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"visibility":"private"}"#,
            &format!("{base}/api/v1/images/{id}"),
        ],
    );
    assert!(private.contains(r#""visibility":"private""#), "{private}");
    let hidden =
        curl(dir.path(), &["-o", "/dev/null", "-w", "%{http_code}", &format!("{base}/api/v1/images/{id}/file")]);
    assert_eq!(hidden, "404", "a private image is not served to anyone");
    let signed =
        json(&curl(dir.path(), &["-H", &auth, "-X", "POST", &format!("{base}/api/v1/images/{id}/signed-url")]));
    let link = format!("{base}{}", signed["url"].as_str().unwrap());
    curl(&downloads, &["-o", "signed.png", &link]);
    assert_eq!(std::fs::read(downloads.join("signed.png")).unwrap(), cat, "the signed link serves it");
    let deleted = curl(dir.path(), &["-H", &auth, "-X", "DELETE", &format!("{base}/api/v1/images/{id}")]);
    assert!(deleted.is_empty(), "204, no body: {deleted}");
    let gone = json(&curl(dir.path(), &["-H", &auth, &format!("{base}/api/v1/images/{id}")]));
    assert_eq!(gone["detail"]["code"], "IMAGE_NOT_FOUND", "{gone}");

    let health = json(&curl(dir.path(), &["-H", &auth, &format!("{base}/health")]));
    assert!(["ok", "degraded"].contains(&health["status"].as_str().unwrap_or_default()), "{health}");
    assert_eq!(health["shards"].as_array().map(Vec::len), Some(3), "{health}");
    let _ = child.kill();
    let _ = child.wait();
}

/// The README's `CHITRAM__SHARDS='[…]' chitram serve`: the list from the environment replaces
/// the default shards as a whole.
#[test]
fn shards_set_from_the_environment_replace_the_default_list() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let shards = format!(
        "[{{name=\"a\", kind=\"fs\", path=\"{0}/srv/a\"}}, {{name=\"b\", kind=\"fs\", path=\"{0}/srv/b\"}}]",
        root.display()
    );
    let log = String::from_utf8(serve_log(&root, &[], &[("CHITRAM__SHARDS", &shards)])).unwrap();
    assert!(root.join("srv/a").is_dir() && root.join("srv/b").is_dir(), "serve creates both shards:\n{log}");
    assert!(!root.join("data/shards").exists(), "and none of the default ones:\n{log}");
}

/// `chitram variants backfill` is an operator command like the others: it refuses a database
/// that does not exist (creating nothing), and on a migrated store reports what it made.
#[test]
fn variants_backfill_is_an_operator_command() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = run_in(dir.path(), &["variants", "backfill"], &[]);
    assert!(!ok && stderr.contains("does not exist"), "{stderr}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing created");

    let (ok, _, stderr) = run_in(dir.path(), &["migrate"], &[]);
    assert!(ok, "{stderr}");
    let (ok, report, stderr) = run_in(dir.path(), &["variants", "backfill"], &[]);
    assert!(ok, "{report}{stderr}");
    assert!(report.contains("variants backfill done: 0 images"), "{report}");
}
