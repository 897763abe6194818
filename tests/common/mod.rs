//! The integration harness: the real application on 127.0.0.1:0 with its own shard
//! directories and its own database, driven over HTTP (after Zero To Production's `spawn_app`).
//!
//! Set `TEST_LOG=1` to see the server's logs.

#![allow(dead_code)]

pub mod database;
pub mod images;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chitram::app::Application;
use chitram::config::{Settings, ShardKind, ShardSettings};
use chitram::metadata::MetadataStore;
use database::{DbKind, TestDatabase};
use reqwest::multipart::{Form, Part};
use reqwest::{Response, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;

/// Runs a test body once per database: `both_databases!(name, body_fn)` defines
/// `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! both_databases {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::common::database::DbKind::Sqlite).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::common::database::DbKind::Postgres).await;
                }
            }
        )+
    };
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub metadata: Arc<dyn MetadataStore>,
    pub settings: Settings,
    /// Holds the shard directories and the spool directory.
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
    /// Overrides the database URL (to route it through a proxy, say).
    pub database_url: Option<String>,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self { shards: 3, replication_factor: 2, max_upload_bytes: 8 * 1024 * 1024, database_url: None }
    }
}

pub async fn spawn_app(kind: DbKind) -> TestApp {
    spawn_app_with(kind, TestOptions::default()).await
}

pub async fn spawn_app_with(kind: DbKind, options: TestOptions) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        chitram::telemetry::init();
    }
    let database = TestDatabase::create(kind).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut settings = Settings::default();
    settings.server.bind = "127.0.0.1:0".parse().unwrap();
    settings.server.max_upload_bytes = options.max_upload_bytes;
    settings.server.spool_dir = Some(dir.path().join("spool"));
    std::fs::create_dir_all(dir.path().join("spool")).unwrap();
    settings.database.url = options.database_url.clone().unwrap_or_else(|| database.url.clone());
    settings.placement.replication_factor = options.replication_factor;
    settings.shards = (0..options.shards)
        .map(|i| ShardSettings {
            name: shard_name(i),
            weight: 1,
            kind: ShardKind::Fs,
            path: Some(dir.path().join("shards").join(shard_name(i))),
        })
        .collect();
    settings.validate().expect("test settings are valid");
    start(settings, dir, database).await
}

async fn start(settings: Settings, dir: tempfile::TempDir, database: TestDatabase) -> TestApp {
    let app = Application::build(&settings).await.expect("the app builds");
    let address = format!("http://{}", app.local_addr());
    let metadata = app.metadata();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        client: reqwest::Client::new(),
        metadata,
        settings,
        dir,
        database,
        shutdown: Some(shutdown),
        server: Some(server),
    }
}

pub fn shard_name(index: usize) -> String {
    format!("s{index}")
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

    pub fn shard_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("shards").join(name)
    }

    /// Takes a shard down the way a failed disk does: its root disappears.
    pub fn take_shard_offline(&self, name: &str) {
        std::fs::rename(self.shard_dir(name), self.dir.path().join(format!("offline-{name}"))).unwrap();
    }

    pub fn bring_shard_online(&self, name: &str) {
        std::fs::rename(self.dir.path().join(format!("offline-{name}")), self.shard_dir(name)).unwrap();
    }

    /// The path of a blob's object on a shard.
    pub fn object_path(&self, shard: &str, key: &str) -> PathBuf {
        self.shard_dir(shard).join(&key[0..2]).join(&key[2..4]).join(key)
    }

    /// Every object stored on any shard (temporary files excluded).
    pub fn all_objects(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        walk(&self.dir.path().join("shards"), &mut found);
        found.retain(|path| !path.components().any(|c| c.as_os_str() == ".tmp"));
        found
    }

    pub fn spool_files(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("spool")).unwrap().count()
    }

    pub async fn image_count(&self) -> usize {
        self.metadata.list_images(100, None).await.unwrap().len()
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
