//! [`SingletonLocks`] on each database; see `metadata/singleton.rs`.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Connection, PgConnection};

use super::SqlStore;
use super::dialect::{Postgres, Sqlite};
use crate::metadata::MetaResult;
use crate::metadata::rows::sql_error;
use crate::metadata::singleton::{SingletonLock, SingletonLocks};

/// How long a check that the lock's session lives may take before the lock counts as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP keepalives on the lock's session, so that Postgres ends the session of an instance
/// whose host vanished (no FIN ever comes) within about idle + interval × count = 20 s,
/// which bounds how long the others wait to take over. A killed process closes its socket,
/// which Postgres sees at once.
const KEEPALIVES: &str = "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3";

/// The advisory lock key of a job: its name, hashed with a fixed function (stable across
/// versions and processes). Advisory locks are per database, so two stores on one server
/// do not collide.
fn lock_key(job: &str) -> i64 {
    xxhash_rust::xxh3::xxh3_64(format!("chitram-singleton:{job}").as_bytes()) as i64
}

#[async_trait]
impl SingletonLocks for SqlStore<Postgres> {
    async fn try_lock_singleton(&self, job: &str) -> MetaResult<Option<Box<dyn SingletonLock>>> {
        const CONTEXT: &str = "taking a singleton lock";
        // A connection of its own, out of the pool: the lock lives as long as this session.
        let mut connection = self.pool.acquire().await.map_err(sql_error(CONTEXT))?.detach();
        let key = lock_key(job);
        sqlx::raw_sql(KEEPALIVES).execute(&mut connection).await.map_err(sql_error(CONTEXT))?;
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut connection)
            .await
            .map_err(sql_error(CONTEXT))?;
        if !taken {
            let _ = connection.close().await;
            return Ok(None);
        }
        Ok(Some(Box::new(AdvisoryLock { connection, key })))
    }
}

struct AdvisoryLock {
    connection: PgConnection,
    key: i64,
}

#[async_trait]
impl SingletonLock for AdvisoryLock {
    async fn still_held(&mut self) -> bool {
        let ping = sqlx::query("SELECT 1").execute(&mut self.connection);
        matches!(tokio::time::timeout(CHECK_TIMEOUT, ping).await, Ok(Ok(_)))
    }

    async fn release(mut self: Box<Self>) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(self.key).execute(&mut self.connection).await;
        let _ = self.connection.close().await;
    }
}

#[async_trait]
impl SingletonLocks for SqlStore<Sqlite> {
    async fn try_lock_singleton(&self, _job: &str) -> MetaResult<Option<Box<dyn SingletonLock>>> {
        Ok(Some(Box::new(OnlyInstance)))
    }
}

/// The lock of the only instance a SQLite database can have.
struct OnlyInstance;

#[async_trait]
impl SingletonLock for OnlyInstance {
    async fn still_held(&mut self) -> bool {
        true
    }

    async fn release(self: Box<Self>) {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn lock_keys_are_stable_and_distinct() {
        assert_eq!(super::lock_key("maintenance"), super::lock_key("maintenance"));
        assert_ne!(super::lock_key("maintenance"), super::lock_key("other"));
    }
}
