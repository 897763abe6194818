//! The integration harness: the real application on 127.0.0.1:0 with its own shard
//! directories and its own database, driven over HTTP (after Zero To Production's `spawn_app`).
//!
//! Set `TEST_LOG=1` to see the server's logs.

#![allow(dead_code)]

pub mod database;
pub mod exposition;
pub mod half_sent;
pub mod images;
pub mod private_redis;
pub mod proxy;
pub mod s3;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitram::app::Application;
use chitram::config::{ReplicationSettings, Settings, ShardSettings};
use chitram::metadata::MetadataStore;
use chitram::replication::backoff::RetryPolicy;
use chitram::replication::worker::{Replicator, StepOutcome, WorkerSettings};
use chitram::storage::router::StorageRouter;
use chitram::variants::service::VariantService;
use database::{DbKind, TestDatabase};
use reqwest::multipart::{Form, Part};
use reqwest::{Response, StatusCode};
use s3::S3Server;
use serde_json::Value;
use tokio::sync::oneshot;

/// Where a test app keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    /// Every shard a directory.
    Fs,
    /// Every shard a bucket on its own in-process S3 server.
    S3,
    /// Even shards directories, odd shards S3 buckets.
    Mixed,
}

/// The database and storage a test runs against.
#[derive(Clone, Copy, Debug)]
pub struct Backends {
    pub db: DbKind,
    pub storage: StorageKind,
}

impl Backends {
    pub const SQLITE_FS: Backends = Backends { db: DbKind::Sqlite, storage: StorageKind::Fs };
    pub const POSTGRES_S3: Backends = Backends { db: DbKind::Postgres, storage: StorageKind::S3 };
}

/// Runs each named test body (an `async fn(Backends)`) over every database and every kind of
/// storage: `behaviours!(name)` defines `name::sqlite_fs`, `name::postgres_fs`,
/// `name::sqlite_s3`, `name::postgres_s3` and `name::postgres_mixed`.
#[macro_export]
macro_rules! behaviours {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                use $crate::common::database::DbKind;
                use $crate::common::{Backends, StorageKind};
                async fn run(db: DbKind, storage: StorageKind) {
                    super::$name(Backends { db, storage }).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite_fs() { run(DbKind::Sqlite, StorageKind::Fs).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres_fs() { run(DbKind::Postgres, StorageKind::Fs).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite_s3() { run(DbKind::Sqlite, StorageKind::S3).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres_s3() { run(DbKind::Postgres, StorageKind::S3).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres_mixed() { run(DbKind::Postgres, StorageKind::Mixed).await }
            }
        )+
    };
}

/// One shard's backend, as the test sees it.
pub enum TestShard {
    Fs(PathBuf),
    S3(Arc<S3Server>),
}

/// The bucket every S3 shard of a test app uses.
pub const BUCKET: &str = "chitram";

pub struct TestApp {
    pub address: String,
    /// The internal metrics listener (`[metrics] bind`), when the test set one.
    pub metrics_address: Option<String>,
    /// Sends the first admin's API key with every request (accounts are on, as by default).
    pub client: reqwest::Client,
    /// The first admin's API key, from the token file the first start wrote; `None` with
    /// accounts off.
    pub admin_key: Option<String>,
    pub metadata: Arc<dyn MetadataStore>,
    pub router: Arc<StorageRouter>,
    pub variants: Arc<VariantService>,
    pub settings: Settings,
    /// Indexed like `settings.shards`.
    pub shards: Vec<TestShard>,
    /// Holds the shard directories, the S3 servers' roots and the spool directory.
    pub dir: tempfile::TempDir,
    pub database: TestDatabase,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// How a test app is set up; `TestOptions::default()` is three fs shards and two copies.
pub struct TestOptions {
    pub shards: usize,
    pub replication_factor: usize,
    pub max_upload_bytes: u64,
    /// `server.max_pixels`.
    pub max_pixels: u64,
    /// Overrides the database URL (to route it through a proxy, say).
    pub database_url: Option<String>,
    /// Changes the settings after the shards are made (wrong credentials, say).
    pub adjust: Option<fn(&mut Settings)>,
    /// Replication workers running in the background. The foundation suites run with none, so
    /// what they see is what the request path did; replication tests turn them on, or drive
    /// them one step at a time with [`TestApp::replicate_until_idle`].
    pub workers: usize,
    /// `auth.enabled` (on, as by default). The suites before accounts run as the first admin.
    pub auth: bool,
    /// `rate_limits.enabled`: off unless a test is about rate limits (the suites send hundreds
    /// of requests in a burst).
    pub rate_limits: bool,
    /// `redis.url` (a private `redis-server` the test started).
    pub redis_url: Option<String>,
    /// Variant generation workers in the background (`variants.workers`). None by default,
    /// so the other suites see no variant blobs unless they ask for a variant.
    pub variant_workers: usize,
    /// `replication.eager_copies`: off by default, like the workers, so the foundation suites
    /// see the copies the request path left pending; the eager-replication tests turn it on.
    pub eager_copies: usize,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            shards: 3,
            replication_factor: 2,
            max_upload_bytes: 8 * 1024 * 1024,
            max_pixels: 100_000_000,
            database_url: None,
            adjust: None,
            workers: 0,
            auth: true,
            rate_limits: false,
            redis_url: None,
            variant_workers: 0,
            eager_copies: 0,
        }
    }
}

pub async fn spawn_app(backends: Backends) -> TestApp {
    spawn_app_with(backends, TestOptions::default()).await
}

pub async fn spawn_app_with(backends: Backends, options: TestOptions) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = chitram::telemetry::init(chitram::telemetry::LogColor::Auto, chitram::config::LogFormat::Text, None);
    }
    let database = TestDatabase::create(backends.db).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut settings = Settings::default();
    settings.server.bind = "127.0.0.1:0".parse().unwrap();
    settings.server.max_upload_bytes = options.max_upload_bytes;
    settings.server.max_pixels = options.max_pixels;
    settings.server.spool_dir = Some(dir.path().join("spool"));
    std::fs::create_dir_all(dir.path().join("spool")).unwrap();
    settings.database.url = options.database_url.clone().unwrap_or_else(|| database.url.clone());
    settings.placement.replication_factor = options.replication_factor;
    settings.replication = fast_replication(options.workers);
    settings.replication.eager_copies = options.eager_copies;
    settings.auth.enabled = options.auth;
    settings.auth.admin_token_file = dir.path().join("admin-token");
    settings.rate_limits.enabled = options.rate_limits;
    settings.redis.url = options.redis_url.clone();
    settings.variants.workers = options.variant_workers;
    let mut shards = Vec::new();
    settings.shards.clear();
    for i in 0..options.shards {
        let name = shard_name(i);
        let s3 = backends.storage == StorageKind::S3 || (backends.storage == StorageKind::Mixed && i % 2 == 1);
        if s3 {
            let server = S3Server::start(&dir.path().join("s3").join(&name)).await;
            settings.shards.push(ShardSettings::s3(&name, &server.settings(BUCKET)));
            shards.push(TestShard::S3(server));
        } else {
            let path = dir.path().join("shards").join(&name);
            settings.shards.push(ShardSettings::fs(&name, &path));
            shards.push(TestShard::Fs(path));
        }
    }
    if let Some(adjust) = options.adjust {
        adjust(&mut settings);
    }
    settings.validate().expect("test settings are valid");
    start(settings, shards, dir, database).await
}

async fn start(settings: Settings, shards: Vec<TestShard>, dir: tempfile::TempDir, database: TestDatabase) -> TestApp {
    let app = Application::build(&settings).await.expect("the app builds");
    let address = format!("http://{}", app.local_addr());
    let metrics_address = app.metrics_addr().map(|addr| format!("http://{addr}"));
    let metadata = app.metadata();
    let router = app.router();
    let variants = app.variants();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let admin_key = settings.auth.enabled.then(|| read_admin_key(&settings.auth.admin_token_file));
    TestApp {
        address,
        metrics_address,
        client: client_with_key(admin_key.as_deref()),
        admin_key,
        metadata,
        router,
        variants,
        settings,
        shards,
        dir,
        database,
        shutdown: Some(shutdown),
        server: Some(server),
    }
}

/// Replication paced for tests: quick retries and polls, and a circuit that reopens for trials
/// after a fifth of a second.
pub fn fast_replication(workers: usize) -> ReplicationSettings {
    ReplicationSettings {
        workers,
        max_workers: workers.max(4),
        tasks_per_worker: 4,
        eager_copies: 0,
        lease_secs: 30,
        retry_min_ms: 50,
        retry_max_secs: 1,
        idle_poll_ms: 50,
        pending_overdue_secs: 60,
        breaker_failures: 3,
        breaker_cooldown_ms: 200,
    }
}

/// The key the first start wrote to the token file.
pub fn read_admin_key(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("the first start writes the admin token file");
    text.trim().to_owned()
}

/// A client that sends `key` as its bearer token with every request (none: anonymous).
pub fn client_with_key(key: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = key {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).expect("a key is a header value");
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder().default_headers(headers).build().expect("a client builds")
}

pub fn shard_name(index: usize) -> String {
    format!("s{index}")
}

/// Another instance sharing a [`TestApp`]'s database and shards.
pub struct SiblingApp {
    pub address: String,
    pub client: reqwest::Client,
    _shutdown: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl SiblingApp {
    pub async fn get(&self, path: &str) -> Response {
        self.client.get(format!("{}{path}", self.address)).send().await.unwrap()
    }

    pub async fn upload_ok(&self, filename: &str, bytes: Vec<u8>) -> Value {
        let part = Part::bytes(bytes).file_name(filename.to_owned());
        let response = self
            .client
            .post(format!("{}/api/v1/images/upload", self.address))
            .multipart(Form::new().part("file", part))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }
}

impl Drop for SiblingApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl TestApp {
    /// `Authorization: Bearer <first admin's key>\r\n` for a raw HTTP request (empty with
    /// accounts off).
    pub fn authorization_line(&self) -> String {
        self.admin_key.as_ref().map(|key| format!("Authorization: Bearer {key}\r\n")).unwrap_or_default()
    }

    /// Stops serving (as a killed process would, without draining), keeping the database and
    /// shards for the test to use: another `serve` of the same SQLite file may start then.
    pub async fn stop_serving(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Stops serving as SIGTERM does (no new connections, requests and eager copies in flight
    /// given `server.shutdown_grace_secs`), and waits until the server has returned.
    pub async fn shut_down_gracefully(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("the server task ends").expect("the server stops cleanly");
        }
    }

    /// Stops gracefully while a worker's claim is committing, and waits for that `COMMIT` to
    /// end. The test has slowed claims down ([`database::slow_down_claim_commits`]) before
    /// queueing the task.
    pub async fn shut_down_while_a_claim_commits(&mut self) {
        let url = self.database.url.clone();
        let commits = || database::sleeping_commits(&url);
        eventually(Duration::from_secs(5), "a worker is committing its claim", || async { commits().await == 1 }).await;
        self.shut_down_gracefully().await;
        eventually(Duration::from_secs(5), "the claim's COMMIT has ended", || async { commits().await == 0 }).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn upload(&self, filename: &str, bytes: Vec<u8>) -> Response {
        let part = Part::bytes(bytes).file_name(filename.to_owned()).mime_str("image/png").unwrap();
        self.upload_form(Form::new().part("file", part)).await
    }

    pub async fn upload_form(&self, form: Form) -> Response {
        self.client.post(self.url("/api/v1/images/upload")).multipart(form).send().await.expect("upload request")
    }

    /// Uploads and returns the image JSON, asserting a 201.
    pub async fn upload_ok(&self, filename: &str, bytes: Vec<u8>) -> Value {
        let response = self.upload(filename, bytes).await;
        assert_eq!(response.status(), StatusCode::CREATED, "upload failed: {}", response.text().await.unwrap());
        response.json().await.unwrap()
    }

    pub async fn batch(&self, files: Vec<(&str, Vec<u8>)>) -> Response {
        let mut form = Form::new();
        for (name, bytes) in files {
            form = form.part("files", Part::bytes(bytes).file_name(name.to_owned()));
        }
        self.client.post(self.url("/api/v1/images/batch")).multipart(form).send().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn delete(&self, id: &str) -> Response {
        self.client.delete(self.url(&format!("/api/v1/images/{id}"))).send().await.unwrap()
    }

    pub async fn download(&self, id: &str) -> Response {
        self.get(&format!("/api/v1/images/{id}/file")).await
    }

    pub fn shard(&self, name: &str) -> &TestShard {
        let index = self.settings.shards.iter().position(|shard| shard.name == name).expect("a shard of this app");
        &self.shards[index]
    }

    /// Takes a shard really down: a directory disappears the way an unmounted disk does; an S3
    /// server stops, refusing connections and cutting open ones.
    pub async fn take_shard_offline(&self, name: &str) {
        match self.shard(name) {
            TestShard::Fs(path) => std::fs::rename(path, offline_path(path)).unwrap(),
            TestShard::S3(server) => server.stop().await,
        }
    }

    pub async fn bring_shard_online(&self, name: &str) {
        match self.shard(name) {
            TestShard::Fs(path) => std::fs::rename(offline_path(path), path).unwrap(),
            TestShard::S3(server) => server.restart().await,
        }
    }

    /// The file that holds a blob's object on a shard (S3 servers here keep objects as files).
    pub fn object_path(&self, shard: &str, key: &str) -> PathBuf {
        match self.shard(shard) {
            TestShard::Fs(path) => path.join(&key[0..2]).join(&key[2..4]).join(key),
            TestShard::S3(server) => server.object_path(BUCKET, key),
        }
    }

    /// Every object stored on any shard (temporary and bookkeeping files excluded).
    pub fn all_objects(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for shard in &self.shards {
            let root = match shard {
                TestShard::Fs(path) => path.clone(),
                TestShard::S3(server) => server.root.join(BUCKET),
            };
            let mut objects = Vec::new();
            walk(&root, &mut objects);
            let hidden = |path: &PathBuf| {
                path.strip_prefix(&root).unwrap().components().any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
            };
            found.extend(objects.into_iter().filter(|path| !hidden(path)));
        }
        found
    }

    /// A replication worker the test drives step by step, paced for tests.
    pub fn replicator(&self, id: &str) -> Replicator {
        let settings = WorkerSettings {
            lease: Duration::from_secs(30),
            retry: RetryPolicy { min: Duration::from_millis(50), max: Duration::from_secs(1) },
            idle_poll: Duration::from_millis(50),
            spool_dir: self.settings.server.spool_dir.clone(),
        };
        Replicator::new(self.metadata.clone(), self.router.clone(), settings, id.to_owned())
    }

    /// Runs replication steps in the test's own task until no task is due.
    pub async fn replicate_until_idle(&self) -> Vec<StepOutcome> {
        let replicator = self.replicator("test-driver");
        let mut outcomes = Vec::new();
        loop {
            match replicator.try_run_next().await.expect("the database answers") {
                StepOutcome::Idle => return outcomes,
                outcome => outcomes.push(outcome),
            }
        }
    }

    /// The shard of a stored copy that a read of this image tries first, then the others.
    pub fn read_order(&self, image: &Value) -> Vec<String> {
        let key = chitram::blob::BlobKey::parse(image["checksum"].as_str().unwrap()).unwrap();
        let states = replica_states(image);
        let holders: Vec<&str> =
            states.iter().filter(|(_, s)| s == "stored").map(|(shard, _)| shard.as_str()).collect();
        self.router.read_order(&key, &holders).into_iter().map(str::to_owned).collect()
    }

    /// The in-process S3 server behind a shard.
    pub fn shard_s3(&self, name: &str) -> &Arc<S3Server> {
        match self.shard(name) {
            TestShard::S3(server) => server,
            TestShard::Fs(_) => panic!("shard {name} is not an S3 shard"),
        }
    }

    /// A second instance of the app on the same database and shards, with its own workers.
    pub async fn spawn_sibling(&self, workers: usize) -> SiblingApp {
        self.spawn_sibling_adjusted(workers, |_| {}).await
    }

    /// A sibling whose settings `adjust` changes (a new config rolled out to one instance).
    pub async fn spawn_sibling_adjusted(&self, workers: usize, adjust: fn(&mut Settings)) -> SiblingApp {
        let mut settings = self.settings.clone();
        settings.replication.workers = workers;
        adjust(&mut settings);
        let app = Application::build(&settings).await.expect("the sibling builds");
        let address = format!("http://{}", app.local_addr());
        let (shutdown, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        SiblingApp { address, client: client_with_key(self.admin_key.as_deref()), _shutdown: shutdown, server }
    }

    /// The image as the API shows it now.
    pub async fn image(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/images/{id}")).await.json().await.unwrap()
    }

    pub fn spool_files(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("spool")).unwrap().count()
    }

    pub async fn image_count(&self) -> usize {
        self.metadata.list_images(100, None, None).await.unwrap().len()
    }

    /// Asserts that a rejected request left nothing behind.
    pub async fn assert_nothing_stored(&self) {
        assert_eq!(self.image_count().await, 0, "no image row");
        assert_eq!(self.all_objects(), Vec::<PathBuf>::new(), "no object on any shard");
        assert_eq!(self.spool_files(), 0, "no spooled file");
        let counts = self.metadata.count_replicas_by_state().await.unwrap();
        assert_eq!(counts.stored + counts.pending + counts.missing + counts.deleting, 0, "no replica row");
    }
}

fn offline_path(path: &Path) -> PathBuf {
    path.with_file_name(format!("{}.offline", path.file_name().unwrap().to_string_lossy()))
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() { walk(&path, found) } else { found.push(path) }
    }
}

/// Asserts the error code and status of a response.
pub async fn assert_error(response: Response, status: StatusCode, code: &str) {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("error bodies are JSON");
    assert_eq!(body["detail"]["code"], code, "{body}");
    assert!(body["detail"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

/// Polls `check` until it holds, failing the test after `limit` with `what` in the message.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The states of an image's copies, as `(shard, state)` pairs.
pub fn replica_states(image: &Value) -> Vec<(String, String)> {
    image["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["shard"].as_str().unwrap().to_owned(), r["state"].as_str().unwrap().to_owned()))
        .collect()
}
