//! Several real `chitram serve` processes: two on one Postgres share the work, the singleton
//! jobs run in one of them and move when it is killed, request ids reach the log and the
//! queued tasks, readiness fails while an instance drains, and a second `serve` on one SQLite
//! file is refused.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::database::{DbKind, TestDatabase};
use common::exposition::{self, sum};
use common::images::png;
use common::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use common::{BUCKET, eventually, replica_states};
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

/// Postgres, three S3 servers, and config files for the binaries.
struct Deployment {
    dir: tempfile::TempDir,
    database: TestDatabase,
    servers: Vec<Arc<S3Server>>,
    client: reqwest::Client,
}

struct Instance {
    child: Child,
    address: String,
    log: PathBuf,
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

    fn config(&self, port: u16, extra: &str) -> PathBuf {
        let mut text = format!(
            "[server]\nbind = \"127.0.0.1:{port}\"\nspool_dir = \"{spool}\"\nshutdown_grace_secs = 10\n{extra}\n\
             [database]\nurl = \"{url}\"\n\
             [replication]\nworkers = 2\nlease_secs = 2\nretry_min_ms = 50\nretry_max_secs = 1\nidle_poll_ms = 50\nbreaker_cooldown_ms = 200\n\
             [maintenance]\nscrub_interval_secs = 1\norphan_grace_secs = 3600\n\
             [auth]\nenabled = false\n[rate_limits]\nenabled = false\n\
             [metrics]\nrefresh_secs = 1\n\
             [telemetry]\nlog_format = \"json\"\n",
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

    async fn start(&self, server_extra: &str) -> Instance {
        let port = free_port();
        let log = self.dir.path().join(format!("chitram-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_chitram"))
            .args(["--config", self.config(port, server_extra).to_str().unwrap(), "serve"])
            .env("RUST_LOG", "info,sqlx=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the chitram binary starts");
        let instance = Instance { child, address: format!("http://127.0.0.1:{port}"), log };
        let started = Instant::now();
        while self.client.get(format!("{}/health/live", instance.address)).send().await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "the server did not start: {}", instance.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        instance
    }

    async fn metric(&self, instance: &Instance, name: &str) -> f64 {
        let text = self.client.get(format!("{}/metrics", instance.address)).send().await.unwrap().text().await.unwrap();
        sum(&exposition::parse(&text), name, &[])
    }

    async fn get(&self, instance: &Instance, path: &str) -> Value {
        self.client.get(format!("{}{path}", instance.address)).send().await.unwrap().json().await.unwrap()
    }

    async fn count(&self, sql: &'static str) -> i64 {
        let pool = sqlx::PgPool::connect(&self.database.url).await.unwrap();
        let count: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
        pool.close().await;
        count
    }
}

impl Instance {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
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

async fn upload(client: &reqwest::Client, instance: &str, bytes: Vec<u8>, request_id: &str) -> Option<Value> {
    let form = Form::new().part("file", Part::bytes(bytes).file_name("i.png"));
    let response = client
        .post(format!("{instance}/api/v1/images/upload"))
        .header("x-request-id", request_id)
        .multipart(form)
        .send()
        .await
        .ok()?;
    (response.status() == StatusCode::CREATED).then_some(())?;
    response.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_postgres_and_the_survivor_takes_over() {
    let deployment = Deployment::new().await;
    let a = deployment.start("").await;
    eventually(Duration::from_secs(10), "the first instance leads the maintenance jobs", || async {
        deployment.metric(&a, "chitram_maintenance_leader").await == 1.0
    })
    .await;
    let b = deployment.start("").await;

    // Upload through A, read through B at once.
    let image = upload(&deployment.client, &a.address, png(7, 7, 95_000), "first").await.expect("stored");
    let id = image["id"].as_str().unwrap();
    let file = deployment.client.get(format!("{}/api/v1/images/{id}/file", b.address)).send().await.unwrap();
    assert_eq!(file.status(), StatusCode::OK);
    assert_eq!(deployment.metric(&b, "chitram_maintenance_leader").await, 0.0, "one leader at a time");
    assert_eq!(deployment.metric(&b, "chitram_scrub_runs_total").await, 0.0, "the follower does not scrub");
    eventually(Duration::from_secs(10), "the leader scrubs", || async {
        deployment.metric(&a, "chitram_scrub_runs_total").await >= 1.0
    })
    .await;

    // A burst through A, with a shard down so that copies wait in the queue; A is killed
    // in the middle of it.
    deployment.servers[2].stop().await;
    let mut a = a;
    let burst: Vec<_> = (0..40)
        .map(|seed| {
            let (client, address) = (deployment.client.clone(), a.address.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(seed * 20)).await;
                upload(&client, &address, png(6, 6, 95_100 + seed), &format!("burst-{seed}")).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let mut acknowledged = Vec::new();
    for upload in burst {
        if let Some(image) = upload.await.unwrap() {
            acknowledged.push(image["id"].as_str().unwrap().to_owned());
        }
    }
    println!("{} of 40 uploads acknowledged before the kill", acknowledged.len());
    assert!(!acknowledged.is_empty(), "some uploads were acknowledged before the kill");

    // B finishes the tasks A queued and takes the scrub over.
    deployment.servers[2].restart().await;
    eventually(Duration::from_secs(30), "the survivor leads and scrubs", || async {
        deployment.metric(&b, "chitram_maintenance_leader").await == 1.0
            && deployment.metric(&b, "chitram_scrub_runs_total").await >= 1.0
    })
    .await;
    eventually(Duration::from_secs(60), "the survivor finishes every queued task", || async {
        deployment.count("SELECT count(*) FROM replication_tasks").await == 0
    })
    .await;
    for id in acknowledged.iter().chain([id.to_owned()].iter()) {
        let image = deployment.get(&b, &format!("/api/v1/images/{id}")).await;
        let stored = replica_states(&image).into_iter().filter(|(_, state)| state == "stored").count();
        assert_eq!(stored, 2, "every acknowledged upload is readable and fully replicated: {image}");
        let file = deployment.client.get(format!("{}/api/v1/images/{id}/file", b.address)).send().await.unwrap();
        assert_eq!(file.status(), StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_id_reaches_the_log_and_the_tasks_it_queued() {
    let deployment = Deployment::new().await;
    deployment.servers[1].stop().await;
    deployment.servers[2].stop().await;
    let server = deployment.start("").await;
    let image = upload(&deployment.client, &server.address, png(5, 5, 96_000), "upload-req-7").await.expect("stored");
    let pending = replica_states(&image).into_iter().filter(|(_, state)| state == "pending").count() as i64;
    assert!(pending >= 1, "{image}");
    let tasks = deployment.count("SELECT count(*) FROM replication_tasks WHERE request_id = 'upload-req-7'").await;
    assert_eq!(tasks, pending, "each copy task for a stopped shard records the request it came from");

    let response = deployment
        .client
        .get(format!("{}/api/v1/images/{}", server.address, image["id"].as_str().unwrap()))
        .header("x-request-id", "read-req-8")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "read-req-8");

    // Every log line is a JSON object; the upload's lines carry its id in their span list,
    // and so do the replication worker's lines about the task it queued.
    deployment.servers[1].restart().await;
    deployment.servers[2].restart().await;
    eventually(Duration::from_secs(30), "the worker logs under the request's id", || async {
        let lines = log_lines(&server);
        lines.iter().any(|line| in_span(line, "replication_task", "upload-req-7"))
    })
    .await;
    let lines = log_lines(&server);
    let stored =
        lines.iter().find(|line| line["fields"]["message"].as_str().is_some_and(|m| m.contains("stored a new blob")));
    let stored = stored.expect("the upload logged its blob");
    assert!(in_span(stored, "request", "upload-req-7"), "the line carries the request's id: {stored}");
}

fn log_lines(instance: &Instance) -> Vec<Value> {
    instance
        .log_text()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("a JSON log line: {line}")))
        .collect()
}

fn in_span(line: &Value, span: &str, request_id: &str) -> bool {
    line["spans"]
        .as_array()
        .is_some_and(|spans| spans.iter().any(|s| s["name"] == span && s["request_id"] == request_id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_fails_while_an_instance_drains_then_it_stops() {
    let deployment = Deployment::new().await;
    let mut server = deployment.start("shutdown_drain_secs = 3").await;
    let ready = || async {
        let response = deployment.client.get(format!("{}/health/ready", server.address)).send().await;
        response.map(|r| r.status()).ok()
    };
    assert_eq!(ready().await, Some(StatusCode::OK));
    let status = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ready().await, Some(StatusCode::SERVICE_UNAVAILABLE), "draining: the load balancer is told to stop");
    let image = upload(&deployment.client, &server.address, png(4, 4, 97_000), "late").await;
    assert!(image.is_some(), "requests are still served while draining");
    let started = Instant::now();
    while server.child.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(20), "the server did not stop: {}", server.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_one_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chitram.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:{port}\"\n[database]\nurl = \"sqlite://data/c.db\"\n[auth]\nenabled = false\n\
             [[shards]]\nname = \"a\"\nkind = \"fs\"\npath = \"data/a\"\n[[shards]]\nname = \"b\"\nkind = \"fs\"\npath = \"data/b\"\n"
        ),
    )
    .unwrap();
    let first = Instance {
        child: Command::new(env!("CARGO_BIN_EXE_chitram"))
            .args(["--config", config.to_str().unwrap(), "serve"])
            .stderr(std::fs::File::create(dir.path().join("first.log")).unwrap())
            .spawn()
            .unwrap(),
        address: format!("http://127.0.0.1:{port}"),
        log: dir.path().join("first.log"),
    };
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{}/health/live", first.address)).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the first did not start: {}", first.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = Command::new(env!("CARGO_BIN_EXE_chitram"))
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env("CHITRAM__SERVER__BIND", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(stderr.contains("another `chitram serve` is already running on the SQLite database"), "{stderr}");
    assert!(stderr.contains("use Postgres"), "{stderr}");
    assert_eq!(client.get(format!("{}/health/live", first.address)).send().await.unwrap().status(), StatusCode::OK);
}
