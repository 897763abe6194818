//! Everything that differs between Postgres and SQLite, in one place.
//!
//! The statements of the metadata store are written once (in `sql/*.rs`), in the SQL the two
//! databases share: `$N` parameters (sqlx binds them by number on SQLite too), `CAST(… AS
//! BIGINT)`, `INSERT … ON CONFLICT … DO UPDATE`, `COUNT(*) FILTER (…)`. Where they differ, a
//! statement names the difference with a marker that [`Dialect::render`] spells out once, at
//! first use:
//!
//! | marker | Postgres | SQLite |
//! |---|---|---|
//! | `{now}` | `now()`: the transaction's start | the current time in microseconds |
//! | `{clock}` | `clock_timestamp()`: this moment, for a long transaction | as `{now}` |
//! | `{after_micros:$N}` | `now()` plus `$N` microseconds | `{now} + $N` |
//! | `{before_micros:$N}` | `now()` minus `$N` microseconds | `{now} - $N` |
//! | `{micros_since:EXPR}` | microseconds from `EXPR` to `clock_timestamp()` | `{now} - EXPR` |
//! | `{in:$N}` / `{not_in:$N}` | `= ANY($N)` / `<> ALL($N)` over a `TEXT[]` | `IN` / `NOT IN` over `json_each($N)` |
//! | `{names:$N}` | the list as a table `names (name)`: `unnest($N)` | the same over `json_each($N)` |
//! | `{for_update}` | `FOR UPDATE`: lock the rows read | nothing: see below |
//! | `{skip_locked}` | `FOR UPDATE SKIP LOCKED` | nothing |
//! | `{table_exists:$N}` | `to_regclass($N) IS NOT NULL` | a lookup in `sqlite_master` |
//!
//! Locking is where the two differ most, and Postgres keeps its row locks: two uploads of
//! different blobs, or a claim and a deletion, never wait for each other there. SQLite locks
//! the whole database instead: every writing transaction opens with `BEGIN IMMEDIATE`
//! ([`Dialect::begin_write`]), so it holds the write lock from its first statement and the
//! `{for_update}` reads inside it need no lock of their own. (A deferred transaction that reads
//! first and writes later could fail with `SQLITE_BUSY` when another writer got in between,
//! rather than wait for it.)
//!
//! Column types: Postgres has `uuid` and `timestamptz`; SQLite stores UUIDs as lowercase
//! hyphenated TEXT (whose text order is the byte order Postgres sorts uuids by) and timestamps
//! as INTEGER microseconds since the epoch. [`Dialect::Id`] and [`Dialect::Time`] carry them.
//! SQLite's clock is the process's (it serves one instance); `unixepoch('subsec')` reads it to
//! the millisecond. Postgres' clock is the database's, shared by every instance.
//!
//! Why compile the store once per dialect instead of writing it generic over
//! `sqlx::Database`: sqlx's generic code needs a higher-ranked bound for every executor, bound
//! type and row type on every function (`for<'c> &'c mut DB::Connection: Executor<'c>`,
//! `i64: Encode<DB> + Type<DB>`, …), which the compiler does not carry from one function to
//! the next, and which fight the `Send` futures of `async_trait`. Compiled with a concrete
//! dialect, the same source reads as plain sqlx code; see `sql/mod.rs`.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{Database, Pool, Transaction};
use uuid::Uuid;

use super::liveness;
use crate::metadata::rows::sql_error;
use crate::metadata::{MetaResult, MetadataError};

/// A SQL dialect the metadata store speaks; see the module documentation.
pub trait Dialect: Send + Sync + Sized + 'static {
    type Db: Database;
    /// An image id as a column value.
    type Id;
    /// A point in time as a column value.
    type Time;
    /// A list of names bound as one parameter, for `{in:$N}` and `{not_in:$N}`.
    type NameList;

    /// `"postgres"` or `"sqlite"`, for health output.
    const NAME: &'static str;

    /// Spells out the markers of a statement written in the shared SQL.
    fn render(template: &str) -> String;

    /// Opens a pool, and one connection, so a wrong URL or a dead server shows at start-up.
    async fn connect(url: &str) -> MetaResult<Pool<Self::Db>>;

    /// Applies this dialect's migrations (`migrations/postgres` or `migrations/sqlite`).
    async fn migrate(pool: &Pool<Self::Db>) -> MetaResult<()>;

    /// Opens a transaction that will write (see the module documentation).
    async fn begin_write(pool: &Pool<Self::Db>, context: &'static str) -> MetaResult<Transaction<'static, Self::Db>>;

    fn id(id: Uuid) -> Self::Id;
    fn parse_id(column: Self::Id) -> MetaResult<Uuid>;
    fn time(time: DateTime<Utc>) -> Self::Time;
    fn parse_time(column: Self::Time) -> MetaResult<DateTime<Utc>>;
    fn name_list(names: &[&str], context: &'static str) -> MetaResult<Self::NameList>;
}

pub enum Postgres {}

/// Connections one instance opens at most; an upload guard holds one for the whole upload.
const POSTGRES_MAX_CONNECTIONS: u32 = 10;

/// How long a Postgres query waits for a connection. A dead database makes every query wait
/// this long and then fail as unavailable, so it stays short enough for a quick 503.
const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// A pooled connection idle longer than this is pinged before it is handed out. sqlx pings
/// every connection it hands out unless told otherwise, a round trip before each query or
/// transaction (two per upload and two per download); and it pings each connection again as
/// it comes back to the pool, in the background. So a connection released within this window
/// answered a ping then. What the window risks: a database that went away within it fails the
/// first query on such a connection (503, and the connection is dropped) instead of the pool
/// reconnecting first. HikariCP makes the same trade with half a second. Once a query has lost
/// its connection, the connections idle since then are pinged however recent
/// (`liveness.rs`), so a database that comes back is not answered with 503 again.
const POSTGRES_TRUST_RECENT: Duration = Duration::from_secs(1);

impl Dialect for Postgres {
    type Db = sqlx::Postgres;
    type Id = Uuid;
    type Time = DateTime<Utc>;
    type NameList = Vec<String>;

    const NAME: &'static str = "postgres";

    fn render(template: &str) -> String {
        render_markers(template, |marker, argument| match marker {
            "now" => "now()".to_owned(),
            "clock" => "clock_timestamp()".to_owned(),
            "after_micros" => format!("now() + {argument} * INTERVAL '1 microsecond'"),
            "before_micros" => format!("now() - {argument} * INTERVAL '1 microsecond'"),
            "micros_since" => format!("CAST(EXTRACT(EPOCH FROM clock_timestamp() - {argument}) * 1000000 AS BIGINT)"),
            "in" => format!("= ANY({argument})"),
            "not_in" => format!("<> ALL({argument})"),
            "names" => format!("unnest({argument}) AS names (name)"),
            "for_update" => "FOR UPDATE".to_owned(),
            "skip_locked" => "FOR UPDATE SKIP LOCKED".to_owned(),
            "table_exists" => format!("to_regclass({argument}) IS NOT NULL"),
            other => panic!("unknown SQL marker {{{other}}}"),
        })
    }

    async fn connect(url: &str) -> MetaResult<PgPool> {
        PgPoolOptions::new()
            .max_connections(POSTGRES_MAX_CONNECTIONS)
            .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for > POSTGRES_TRUST_RECENT || liveness::idle_across_a_loss(meta.idle_for) {
                        sqlx::Connection::ping(connection).await?;
                    }
                    Ok(true)
                })
            })
            .connect(url)
            .await
            .map_err(sql_error("connecting to Postgres"))
    }

    async fn migrate(pool: &PgPool) -> MetaResult<()> {
        sqlx::migrate!("migrations/postgres").run(pool).await?;
        Ok(())
    }

    async fn begin_write(pool: &PgPool, context: &'static str) -> MetaResult<Transaction<'static, sqlx::Postgres>> {
        pool.begin().await.map_err(sql_error(context))
    }

    fn id(id: Uuid) -> Uuid {
        id
    }

    fn parse_id(column: Uuid) -> MetaResult<Uuid> {
        Ok(column)
    }

    fn time(time: DateTime<Utc>) -> DateTime<Utc> {
        time
    }

    fn parse_time(column: DateTime<Utc>) -> MetaResult<DateTime<Utc>> {
        Ok(column)
    }

    fn name_list(names: &[&str], _context: &'static str) -> MetaResult<Vec<String>> {
        Ok(names.iter().map(|name| (*name).to_owned()).collect())
    }
}

pub enum Sqlite {}

/// Connections in the SQLite pool. Readers run side by side in WAL mode; writers take turns.
const SQLITE_MAX_CONNECTIONS: u32 = 8;

/// How long a SQLite writer waits for another writer's transaction (an upload holding its
/// guard) before giving up with `SQLITE_BUSY`, which counts as unavailable.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a SQLite query waits for a free connection in the pool.
const SQLITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite's "now" in the stored encoding: integer microseconds since the epoch.
const SQLITE_NOW: &str = "CAST(unixepoch('subsec') * 1000000 AS INTEGER)";

impl Dialect for Sqlite {
    type Db = sqlx::Sqlite;
    type Id = String;
    type Time = i64;
    type NameList = String;

    const NAME: &'static str = "sqlite";

    fn render(template: &str) -> String {
        render_markers(template, |marker, argument| match marker {
            "now" | "clock" => SQLITE_NOW.to_owned(),
            "after_micros" => format!("({SQLITE_NOW} + {argument})"),
            "before_micros" => format!("({SQLITE_NOW} - {argument})"),
            "micros_since" => format!("({SQLITE_NOW} - {argument})"),
            "in" => format!("IN (SELECT value FROM json_each({argument}))"),
            "not_in" => format!("NOT IN (SELECT value FROM json_each({argument}))"),
            "names" => format!("(SELECT value AS name FROM json_each({argument})) AS names"),
            "for_update" | "skip_locked" => String::new(),
            "table_exists" => {
                format!("EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = {argument})")
            }
            other => panic!("unknown SQL marker {{{other}}}"),
        })
    }

    /// Opens (creating if missing) the database file and its directory, in WAL mode.
    async fn connect(url: &str) -> MetaResult<SqlitePool> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(sql_error("reading the SQLite URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true);
        if let Some(dir) = options.get_filename().parent().filter(|dir| !dir.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| MetadataError::from_sqlx("creating the SQLite database directory", sqlx::Error::Io(e)))?;
        }
        SqlitePoolOptions::new()
            .max_connections(SQLITE_MAX_CONNECTIONS)
            .acquire_timeout(SQLITE_ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(sql_error("opening the SQLite database"))
    }

    async fn migrate(pool: &SqlitePool) -> MetaResult<()> {
        sqlx::migrate!("migrations/sqlite").run(pool).await?;
        Ok(())
    }

    async fn begin_write(pool: &SqlitePool, context: &'static str) -> MetaResult<Transaction<'static, sqlx::Sqlite>> {
        pool.begin_with("BEGIN IMMEDIATE").await.map_err(sql_error(context))
    }

    fn id(id: Uuid) -> String {
        id.hyphenated().to_string()
    }

    fn parse_id(column: String) -> MetaResult<Uuid> {
        Uuid::parse_str(&column).map_err(|e| MetadataError::Corrupt(format!("image id {column:?}: {e}")))
    }

    fn time(time: DateTime<Utc>) -> i64 {
        time.timestamp_micros()
    }

    fn parse_time(column: i64) -> MetaResult<DateTime<Utc>> {
        DateTime::from_timestamp_micros(column)
            .ok_or_else(|| MetadataError::Corrupt(format!("timestamp {column} is out of range")))
    }

    fn name_list(names: &[&str], context: &'static str) -> MetaResult<String> {
        serde_json::to_string(names).map_err(|e| MetadataError::from_sqlx(context, sqlx::Error::Encode(Box::new(e))))
    }
}

/// Replaces each `{marker}` or `{marker:argument}` of a template by what `spell` makes of it.
/// Statements hold no `{` of their own, so every brace opens a marker.
fn render_markers(template: &str, spell: impl Fn(&str, &str) -> String) -> String {
    let mut sql = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        sql.push_str(&rest[..open]);
        let close = rest[open..].find('}').map(|close| open + close).expect("an SQL marker is closed with '}'");
        let marker = &rest[open + 1..close];
        let (name, argument) = marker.split_once(':').unwrap_or((marker, ""));
        sql.push_str(&spell(name, argument));
        rest = &rest[close + 1..];
    }
    sql.push_str(rest);
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLAIM: &str = "UPDATE t SET until = {after_micros:$2} WHERE id = (SELECT id FROM t \
                         WHERE due <= {now} AND shard {in:$3} LIMIT 1 {skip_locked})";

    #[test]
    fn postgres_spells_out_row_locks_and_its_own_clock() {
        assert_eq!(
            Postgres::render(CLAIM),
            "UPDATE t SET until = now() + $2 * INTERVAL '1 microsecond' WHERE id = (SELECT id FROM t \
             WHERE due <= now() AND shard = ANY($3) LIMIT 1 FOR UPDATE SKIP LOCKED)"
        );
    }

    #[test]
    fn sqlite_drops_row_locks_and_counts_microseconds() {
        assert_eq!(
            Sqlite::render(CLAIM),
            format!(
                "UPDATE t SET until = ({SQLITE_NOW} + $2) WHERE id = (SELECT id FROM t \
                 WHERE due <= {SQLITE_NOW} AND shard IN (SELECT value FROM json_each($3)) LIMIT 1 )"
            )
        );
    }

    #[test]
    fn a_moment_before_now_is_now_less_microseconds_on_both() {
        let older = "SELECT 1 FROM t WHERE at < {before_micros:$1}";
        assert_eq!(Postgres::render(older), "SELECT 1 FROM t WHERE at < now() - $1 * INTERVAL '1 microsecond'");
        assert_eq!(Sqlite::render(older), format!("SELECT 1 FROM t WHERE at < ({SQLITE_NOW} - $1)"));
    }

    #[test]
    fn a_statement_without_markers_is_left_as_written() {
        let plain = "SELECT ref_count FROM blobs WHERE checksum = $1";
        assert_eq!(Postgres::render(plain), plain);
        assert_eq!(Sqlite::render(plain), plain);
    }

    #[test]
    fn the_age_of_a_row_is_measured_in_microseconds_on_both() {
        assert_eq!(
            Postgres::render("{micros_since:MIN(created_at)}"),
            "CAST(EXTRACT(EPOCH FROM clock_timestamp() - MIN(created_at)) * 1000000 AS BIGINT)"
        );
        assert_eq!(Sqlite::render("{micros_since:MIN(created_at)}"), format!("({SQLITE_NOW} - MIN(created_at))"));
    }

    #[test]
    fn both_tell_whether_a_table_exists() {
        assert_eq!(Postgres::render("SELECT {table_exists:$1}"), "SELECT to_regclass($1) IS NOT NULL");
        assert_eq!(
            Sqlite::render("SELECT {table_exists:$1}"),
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = $1)"
        );
    }

    #[test]
    #[should_panic(expected = "unknown SQL marker")]
    fn an_unknown_marker_is_a_bug_caught_at_first_use() {
        Postgres::render("SELECT {nope}");
    }

    #[test]
    fn sqlite_ids_and_times_round_trip() {
        let id = Uuid::new_v4();
        assert_eq!(Sqlite::parse_id(Sqlite::id(id)).unwrap(), id);
        let time = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        assert_eq!(Sqlite::parse_time(Sqlite::time(time)).unwrap(), time);
        assert!(Sqlite::parse_id("not a uuid".to_owned()).is_err());
        assert!(Sqlite::parse_time(i64::MAX).is_err());
    }
}
