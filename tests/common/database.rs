//! A database of its own for each test: a SQLite file in a temporary directory, or a fresh
//! Postgres database on the test server, dropped when the test ends.
//!
//! Postgres tests never skip: a missing server fails them loudly, so a green run always means
//! both backends were exercised.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use uuid::Uuid;

/// Names the admin URL of the Postgres server tests create their databases on.
const POSTGRES_URL_VAR: &str = "CHITRAM_TEST_POSTGRES_URL";
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long the admin connection may take before the server counts as unreachable.
const ADMIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

/// A test's own database; `url` opens it.
pub struct TestDatabase {
    pub url: String,
    owned: Owned,
}

/// What has to go when the test ends.
enum Owned {
    /// The directory holding the SQLite file; deleting it deletes the database.
    SqliteDir(tempfile::TempDir),
    /// A Postgres database, dropped through the admin URL.
    PostgresDatabase { admin_url: String, name: String },
}

impl TestDatabase {
    pub async fn create(kind: DbKind) -> TestDatabase {
        match kind {
            DbKind::Sqlite => create_sqlite(),
            DbKind::Postgres => create_postgres().await,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Owned::PostgresDatabase { admin_url, name } = &self.owned else {
            return;
        };
        // Drop cannot await, and blocking on the test's own runtime from inside it would
        // deadlock: drop the database from a thread with a runtime of its own.
        let (admin_url, name) = (admin_url.clone(), name.clone());
        let dropped = std::thread::spawn(move || drop_postgres_database(&admin_url, &name)).join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(message)) => eprintln!("{message}"),
            Err(_) => eprintln!("dropping test database {} panicked", self.url),
        }
    }
}

fn create_sqlite() -> TestDatabase {
    let dir = tempfile::tempdir().expect("creating a temporary directory for a SQLite database");
    let url = format!("sqlite://{}/chitram.db", dir.path().display());
    TestDatabase { url, owned: Owned::SqliteDir(dir) }
}

async fn create_postgres() -> TestDatabase {
    let admin_url = std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
    let name = format!("chitram_test_{}", Uuid::new_v4().simple());
    let mut admin = connect_admin(&admin_url).await;
    // A database name cannot be a bind parameter; this one is built from a UUID only.
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("creating test database {name} on {admin_url}: {e}"));
    let _ = admin.close().await;
    let url = url_for_database(&admin_url, &name);
    TestDatabase { url, owned: Owned::PostgresDatabase { admin_url, name } }
}

async fn connect_admin(admin_url: &str) -> PgConnection {
    let connected = tokio::time::timeout(ADMIN_CONNECT_TIMEOUT, PgConnection::connect(admin_url)).await;
    match connected {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => panic!("{}", unreachable_message(admin_url, &e.to_string())),
        Err(_) => panic!("{}", unreachable_message(admin_url, "timed out")),
    }
}

fn unreachable_message(admin_url: &str, cause: &str) -> String {
    format!(
        "the Postgres tests need a server, but {admin_url} cannot be reached ({cause}). Start \
         Postgres, or set {POSTGRES_URL_VAR} to the URL of a role that may create databases, \
         e.g. {POSTGRES_URL_VAR}=postgres://postgres@127.0.0.1:5432/postgres"
    )
}

/// The admin URL with its database replaced by `name`, keeping any query string.
fn url_for_database(admin_url: &str, name: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let authority_start = base.find("://").map_or(0, |at| at + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

fn drop_postgres_database(admin_url: &str, name: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime to drop test database {name}: {e}"))?;
    runtime.block_on(async {
        let mut admin = PgConnection::connect(admin_url)
            .await
            .map_err(|e| format!("connecting to {admin_url} to drop test database {name}: {e}"))?;
        // FORCE: the test's pool may still hold connections to it.
        sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
            .execute(&mut admin)
            .await
            .map_err(|e| format!("dropping test database {name}: {e}"))?;
        let _ = admin.close().await;
        Ok(())
    })
}

/// Sets a copy's state by hand, as no production path does: for tests that need a history
/// the store would not make by itself.
pub async fn set_replica_state(url: &str, blob: &str, shard: &str, state: &str) {
    const SET_STATE: &str = "UPDATE replicas SET state = $3 WHERE blob_checksum = $1 AND shard = $2";
    let updated = if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(SET_STATE).bind(blob).bind(shard).bind(state).execute(&mut conn).await.unwrap().rows_affected()
    } else {
        let mut conn = PgConnection::connect(url).await.unwrap();
        sqlx::query(SET_STATE).bind(blob).bind(shard).bind(state).execute(&mut conn).await.unwrap().rows_affected()
    };
    assert_eq!(updated, 1, "the copy of {blob} on {shard} is recorded");
}

/// A durable queue whose workers claim rows (`claimed_by`, `claimed_until`).
#[derive(Clone, Copy, Debug)]
pub enum TaskQueue {
    Replication,
    Variants,
}

impl TaskQueue {
    fn table(self) -> &'static str {
        match self {
            Self::Replication => "replication_tasks",
            Self::Variants => "variant_tasks",
        }
    }
}

/// Tasks of `queue` some worker or upload holds a claim on (Postgres).
pub async fn claimed_tasks(url: &str, queue: TaskQueue) -> i64 {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let sql = format!("SELECT count(*) FROM {} WHERE claimed_by IS NOT NULL", queue.table());
    sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&mut conn).await.unwrap()
}

/// Makes every claim of a task of `queue` spend 2 s in its `COMMIT` (Postgres): a deferred
/// constraint trigger runs at commit time. A claim whose `COMMIT` is in flight is the one a
/// worker must not give up half-way: dropped, it still commits on the server, possibly after
/// the worker has released its claims. (A claim dropped before its `COMMIT` is rolled back.)
pub async fn slow_down_claim_commits(url: &str, queue: TaskQueue) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let table = queue.table();
    for statement in [
        "CREATE OR REPLACE FUNCTION slow_claim() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$ LANGUAGE plpgsql".to_owned(),
        format!(
            "CREATE CONSTRAINT TRIGGER slow_claim AFTER UPDATE ON {table} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
             WHEN (OLD.claimed_by IS NULL AND NEW.claimed_by IS NOT NULL) EXECUTE FUNCTION slow_claim()"
        ),
    ] {
        sqlx::query(AssertSqlSafe(statement)).execute(&mut conn).await.unwrap();
    }
}

/// `COMMIT`s of this test's database sleeping in [`slow_down_claim_commits`]'s trigger.
pub async fn sleeping_commits(url: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event = 'PgSleep' AND query = 'COMMIT'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap()
}
