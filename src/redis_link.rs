//! One Redis connection shared by a feature that must never fail because Redis does: each call
//! is bounded by [`CALL_TIMEOUT`], and after a failure Redis is left alone for [`RETRY_AFTER`],
//! so an outage costs one timeout per interval instead of one per request. The metadata cache
//! and the shared rate limits each hold one link, with their own words for the log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

/// How long one call (or connecting) may take before Redis counts as down.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// How long Redis is left alone after a failure.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why a call to Redis failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisCallError {
    #[error("Redis did not answer in time")]
    Timeout,
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

pub struct RedisLink {
    client: redis::Client,
    state: Mutex<Connection>,
    /// Logged when a connection opens, and when Redis goes down.
    up_message: &'static str,
    down_message: &'static str,
}

enum Connection {
    Unopened,
    Open(ConnectionManager),
    Down { since: Instant },
}

impl RedisLink {
    pub fn new(client: redis::Client, up_message: &'static str, down_message: &'static str) -> Self {
        Self { client, state: Mutex::new(Connection::Unopened), up_message, down_message }
    }

    pub fn is_up(&self) -> bool {
        matches!(*self.state.lock().expect("never poisoned"), Connection::Open(_))
    }

    /// The open connection, opening it when due; `None` while Redis is down.
    pub async fn connection(&self) -> Option<ConnectionManager> {
        {
            let state = self.state.lock().expect("never poisoned");
            match &*state {
                Connection::Open(connection) => return Some(connection.clone()),
                Connection::Down { since } if since.elapsed() < RETRY_AFTER => return None,
                _ => {}
            }
        }
        match self.call(ConnectionManager::new(self.client.clone())).await {
            Ok(connection) => {
                tracing::info!("{}", self.up_message);
                *self.state.lock().expect("never poisoned") = Connection::Open(connection.clone());
                Some(connection)
            }
            Err(_) => None,
        }
    }

    /// The open connection, or a new one even while Redis is being left alone after a
    /// failure: for a last attempt before the process exits.
    pub async fn connection_now(&self) -> Option<ConnectionManager> {
        if let Connection::Open(connection) = &*self.state.lock().expect("never poisoned") {
            return Some(connection.clone());
        }
        let connection = self.call(ConnectionManager::new(self.client.clone())).await.ok()?;
        *self.state.lock().expect("never poisoned") = Connection::Open(connection.clone());
        Some(connection)
    }

    /// Runs one call to Redis within [`CALL_TIMEOUT`]; a failure marks Redis down.
    pub async fn call<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, RedisCallError> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                self.down(&error.to_string());
                Err(RedisCallError::Redis(error))
            }
            Err(_) => {
                self.down("no answer in time");
                Err(RedisCallError::Timeout)
            }
        }
    }

    /// Records an outage: Redis is left alone for [`RETRY_AFTER`].
    fn down(&self, reason: &str) {
        let mut state = self.state.lock().expect("never poisoned");
        if !matches!(*state, Connection::Down { .. }) {
            tracing::warn!(reason, "{}", self.down_message);
        }
        *state = Connection::Down { since: Instant::now() };
    }
}
