//! A TCP proxy that a test can cut, to take a server (Postgres, an S3 node) really down:
//! new connections are refused and open ones are closed, then the same address comes back.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

pub struct TcpProxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    running: Arc<Mutex<Option<JoinSet<()>>>>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = TcpProxy { addr, upstream, running: Arc::new(Mutex::new(None)) };
        proxy.serve(listener).await;
        proxy
    }

    async fn serve(&self, listener: TcpListener) {
        let mut tasks = JoinSet::new();
        let upstream = self.upstream;
        // The accept loop owns the connection tasks, so aborting the set ends both.
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let owned = connections.clone();
        tasks.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                owned.lock().await.spawn(forward(client, upstream));
            }
        });
        tasks.spawn(async move {
            // Keeps the connection set alive as long as the proxy runs; dropping it on abort
            // aborts every connection.
            let _connections = connections;
            std::future::pending::<()>().await;
        });
        *self.running.lock().await = Some(tasks);
    }

    /// Takes the server down: the port refuses connections and open connections are closed.
    pub async fn cut(&self) {
        if let Some(mut tasks) = self.running.lock().await.take() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Brings the server back on the same address.
    pub async fn restore(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("the proxy's port is free again");
        self.serve(listener).await;
    }
}

async fn forward(mut client: TcpStream, upstream: SocketAddr) {
    if let Ok(mut server) = TcpStream::connect(upstream).await {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    }
}
