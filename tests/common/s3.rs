//! S3-protocol servers inside the test process: s3s-fs over a temporary directory, on
//! 127.0.0.1:0, with SigV4 authentication. A server can be stopped for real — the port refuses
//! connections and pooled keep-alive connections are cut — and started again on the same port.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitram::storage::s3::S3Settings;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub const ACCESS_KEY: &str = "chitram-test";
pub const SECRET_KEY: &str = "chitram-test-secret";

pub struct S3Server {
    pub addr: std::net::SocketAddr,
    pub root: PathBuf,
    service: S3Service,
    /// The accept loop and every connection task; aborting it takes the server down.
    running: Mutex<Option<JoinSet<()>>>,
}

impl S3Server {
    pub async fn start(root: &Path) -> Arc<S3Server> {
        std::fs::create_dir_all(root).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Arc::new(S3Server {
            addr: listener.local_addr().unwrap(),
            root: root.to_path_buf(),
            service: build_service(root),
            running: Mutex::new(None),
        });
        server.serve(listener);
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shard settings for a bucket on this server.
    pub fn settings(&self, bucket: &str) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint()),
            bucket: bucket.to_owned(),
            region: "us-east-1".to_owned(),
            credentials: Some((ACCESS_KEY.to_owned(), SECRET_KEY.to_owned())),
            create_bucket: true,
            connect_timeout: Duration::from_millis(500),
            operation_timeout: Duration::from_secs(20),
        }
    }

    fn serve(&self, listener: TcpListener) {
        let service = self.service.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            // Connection tasks live in this set, owned by the accept loop: aborting the loop
            // drops the set, which aborts every open connection.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((socket, _)) = accepted else { continue };
                        // As real S3 servers do: without it, small responses wait on delayed ACKs.
                        let _ = socket.set_nodelay(true);
                        let service = service.clone();
                        connections.spawn(async move {
                            let _ = ConnBuilder::new(TokioExecutor::new()).serve_connection(TokioIo::new(socket), service).await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        *self.running.lock().unwrap() = Some(tasks);
    }

    /// Takes the server down: new connections are refused, open ones closed.
    pub async fn stop(&self) {
        let tasks = self.running.lock().unwrap().take();
        if let Some(mut tasks) = tasks {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Makes the server hang, the way an overloaded or wedged node does: connections are
    /// accepted and then never answered.
    pub async fn hang(&self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.expect("the server's port is free again");
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        *self.running.lock().unwrap() = Some(tasks);
    }

    /// Brings the server back on the same port, with the same data.
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("the server's port is free again");
        self.serve(listener);
    }

    /// Where an object of `bucket` lives on disk.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }
}

fn build_service(root: &Path) -> S3Service {
    let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs opens its root");
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    builder.build()
}
