//! S3-protocol servers inside the test process: s3s-fs over a temporary directory, on
//! 127.0.0.1:0, with SigV4 authentication. A server can be stopped for real — the port refuses
//! connections and pooled keep-alive connections are cut — and started again on the same port.
//! A server can also misbehave while up ([`S3Server::misbehave`]): answer late, the way a MinIO
//! under GC or on a saturated disk does, or stop sending a body halfway.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitram::storage::s3::S3Settings;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub const ACCESS_KEY: &str = "chitram-test";
pub const SECRET_KEY: &str = "chitram-test-secret";

pub struct S3Server {
    pub addr: std::net::SocketAddr,
    pub root: PathBuf,
    service: S3Service,
    /// The accept loop and every connection task; aborting it takes the server down.
    running: Mutex<Option<JoinSet<()>>>,
    /// What the misbehaving server did.
    pub faults: Arc<FaultCounters>,
}

/// How a misbehaving server misbehaves (see [`S3Server::misbehave`]).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Requests are answered this late (each one waits this long before the server sees it).
    pub late: Option<Duration>,
    /// Only requests of this method are late (`"HEAD"`, say); all of them when `None`.
    pub late_method: Option<&'static str>,
    /// Each connection sends this many bytes of answers, then nothing more: a stalled body.
    pub stall_after: Option<usize>,
}

/// Counts kept by a misbehaving server.
#[derive(Debug, Default)]
pub struct FaultCounters {
    /// Requests held back as late.
    pub delayed: AtomicUsize,
    /// Late requests whose client gave up (closed the connection) before the answer.
    pub abandoned: AtomicUsize,
}

impl FaultCounters {
    pub fn abandoned(&self) -> usize {
        self.abandoned.load(Ordering::SeqCst)
    }

    pub fn delayed(&self) -> usize {
        self.delayed.load(Ordering::SeqCst)
    }
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
            faults: Arc::default(),
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
        let tasks = spawn_accept_loop(listener, move |socket| {
            let service = service.clone();
            async move {
                let _ = ConnBuilder::new(TokioExecutor::new()).serve_connection(TokioIo::new(socket), service).await;
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

    /// Keeps serving, but badly: open connections are cut, and every new one goes through a
    /// bridge that applies `faults`. `restart` heals it.
    pub async fn misbehave(&self, faults: Faults) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.expect("the server's port is free again");
        let (service, counters) = (self.service.clone(), self.faults.clone());
        let tasks = spawn_accept_loop(listener, move |socket| {
            let (service, faults, counters) = (service.clone(), faults.clone(), counters.clone());
            async move {
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                let builder = ConnBuilder::new(TokioExecutor::new());
                let serve = builder.serve_connection(TokioIo::new(ours), service);
                tokio::select! {
                    _ = serve => {}
                    () = bridge(socket, theirs, faults, counters) => {}
                }
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

/// Accepts connections until aborted, each handled by `handle` in a task of its own. The
/// connection tasks live in a set owned by the accept loop: aborting the loop drops the set,
/// which aborts every open connection.
fn spawn_accept_loop<F, Fut>(listener: TcpListener, handle: F) -> JoinSet<()>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((socket, _)) = accepted else { continue };
                    // As real S3 servers do: without it, small responses wait on delayed ACKs.
                    let _ = socket.set_nodelay(true);
                    connections.spawn(handle(socket));
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    tasks
}

fn build_service(root: &Path) -> S3Service {
    let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs opens its root");
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    builder.build()
}

/// Carries one connection between the client and the server, applying `faults`.
async fn bridge(client: TcpStream, server: DuplexStream, faults: Faults, counters: Arc<FaultCounters>) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = tokio::io::split(server);
    // The next bytes from the client start a new request (HTTP/1.1 without pipelining).
    let request_starts = AtomicBool::new(true);
    let upstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let Ok(n @ 1..) = from_client.read(&mut buffer).await else { return };
            let mut pending = buffer[..n].to_vec();
            let is_late = request_starts.swap(false, Ordering::SeqCst)
                && faults.late.is_some()
                && faults.late_method.is_none_or(|method| pending.starts_with(format!("{method} ").as_bytes()));
            if is_late {
                counters.delayed.fetch_add(1, Ordering::SeqCst);
                let late = tokio::time::sleep(faults.late.unwrap());
                tokio::pin!(late);
                // Keep reading while the request waits, to see a client that gives up.
                loop {
                    tokio::select! {
                        () = &mut late => break,
                        read = from_client.read(&mut buffer) => match read {
                            Ok(n @ 1..) => pending.extend_from_slice(&buffer[..n]),
                            _ => {
                                counters.abandoned.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        },
                    }
                }
            }
            if to_server.write_all(&pending).await.is_err() {
                return;
            }
        }
    };
    let downstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut sent = 0;
        loop {
            let Ok(n @ 1..) = from_server.read(&mut buffer).await else { return };
            let allowed = faults.stall_after.map_or(n, |limit| n.min(limit.saturating_sub(sent)));
            if to_client.write_all(&buffer[..allowed]).await.is_err() {
                return;
            }
            sent += allowed;
            if allowed < n {
                std::future::pending::<()>().await; // stalled: the rest never comes
            }
            request_starts.store(true, Ordering::SeqCst);
        }
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}
