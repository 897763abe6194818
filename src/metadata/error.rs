//! Errors of the metadata store, sorted for callers: unavailable (retry later, 503) or not.

use super::sql::liveness;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The database cannot be reached (connection refused or lost, pool timed out).
    #[error("the metadata database is unavailable while {context}")]
    Unavailable {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// The database answered with an error.
    #[error("metadata query failed while {context}")]
    Query {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A row holds a value this version cannot read.
    #[error("stored metadata is malformed: {0}")]
    Corrupt(String),
    /// Recording the image would take its owner over their quota; nothing was recorded.
    #[error("the upload would exceed the owner's quota")]
    QuotaExceeded,
    #[error("applying metadata migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The URL as shown, its password masked (`crate::redact::redact_url`).
    #[error("unsupported database URL {0:?}: expected sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
}

impl MetadataError {
    /// Sorts a driver error into unavailable (retry later, answer 503) or a query failure.
    /// Notes a lost connection, so that the pool checks its other connections (`sql/liveness.rs`).
    pub fn from_sqlx(context: &'static str, source: sqlx::Error) -> Self {
        let lost_connection = liveness::is_lost_connection(&source);
        if lost_connection {
            liveness::connection_lost();
        }
        let unavailable = lost_connection
            || match &source {
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
                // Class 40 is "transaction rollback" (a deadlock or serialization failure:
                // Postgres undid this transaction, and the same request succeeds when retried);
                // SQLITE_BUSY (5) and SQLITE_LOCKED (6) mean another writer held the database
                // past our busy timeout.
                sqlx::Error::Database(db) => {
                    db.code().is_some_and(|code| code.starts_with("40") || code == "5" || code == "6")
                }
                _ => false,
            };
        if unavailable {
            MetadataError::Unavailable { context, source }
        } else {
            MetadataError::Query { context, source }
        }
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, MetadataError::Unavailable { .. })
    }
}

pub type MetaResult<T> = Result<T, MetadataError>;
