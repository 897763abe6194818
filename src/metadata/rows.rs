//! Turning rows into domain values, shared by both stores: the row types below read the same
//! column types (`i64`, `TEXT`) from Postgres and from SQLite.

use std::fmt::Display;
use std::num::TryFromIntError;
use std::time::Duration;

use super::{
    BlobCopies, CopyRef, MetaResult, MetadataError, Replica, ReplicaState, ReplicationTask, ShardFailures, ShardUsage,
    TaskKind,
};
use crate::blob::BlobKey;

/// One claimed task, as the claim query returns it.
#[derive(sqlx::FromRow)]
pub(in crate::metadata) struct TaskRow {
    id: i64,
    kind: String,
    blob_checksum: String,
    shard: String,
    attempts: i64,
    last_error: Option<String>,
    request_id: Option<String>,
}

impl TaskRow {
    pub(in crate::metadata) fn into_task(self) -> MetaResult<ReplicationTask> {
        Ok(ReplicationTask {
            id: self.id,
            kind: TaskKind::parse(&self.kind)?,
            copy: CopyRef { blob: parse_blob_key(&self.blob_checksum)?, shard: self.shard },
            attempts: from_column(self.attempts, "attempts")?,
            last_error: self.last_error,
            request_id: self.request_id,
        })
    }
}

/// One blob joined with one of its copies (none when it has no copy).
#[derive(sqlx::FromRow)]
pub(in crate::metadata) struct BlobCopyRow {
    checksum: String,
    size: i64,
    ref_count: i64,
    shard: Option<String>,
    state: Option<String>,
}

/// Folds blob-and-copy rows into blobs. The queries order rows by blob, so the rows of one
/// blob are adjacent.
pub(in crate::metadata) fn blob_copies_from_rows(rows: Vec<BlobCopyRow>) -> MetaResult<Vec<BlobCopies>> {
    let mut blobs: Vec<BlobCopies> = Vec::new();
    for row in rows {
        let replica = match (row.shard, row.state) {
            (Some(shard), Some(state)) => Some(Replica { shard, state: ReplicaState::parse(&state)? }),
            _ => None,
        };
        if blobs.last().is_none_or(|last| last.blob.as_str() != row.checksum) {
            blobs.push(BlobCopies {
                blob: parse_blob_key(&row.checksum)?,
                size: from_column(row.size, "size")?,
                ref_count: from_column(row.ref_count, "ref_count")?,
                replicas: Vec::new(),
            });
        }
        if let Some(blob) = blobs.last_mut() {
            blob.replicas.extend(replica);
        }
    }
    // Sorted here, not in SQL: a Postgres collation may order text differently from bytes.
    for blob in &mut blobs {
        blob.replicas.sort_by(|a, b| a.shard.cmp(&b.shard));
    }
    Ok(blobs)
}

/// The failed tasks of one shard.
#[derive(sqlx::FromRow)]
pub(in crate::metadata) struct ShardFailuresRow {
    shard: String,
    failing_tasks: i64,
    failed_attempts: i64,
    last_error: Option<String>,
}

/// Converts the rows, sorted by shard name (by bytes, whatever the database's collation).
pub(in crate::metadata) fn shard_failures_from_rows(rows: Vec<ShardFailuresRow>) -> MetaResult<Vec<ShardFailures>> {
    let mut failures = rows
        .into_iter()
        .map(|row| {
            Ok(ShardFailures {
                shard: row.shard,
                failing_tasks: from_column(row.failing_tasks, "failing task count")?,
                failed_attempts: from_column(row.failed_attempts, "failed attempt count")?,
                last_error: row.last_error,
            })
        })
        .collect::<MetaResult<Vec<_>>>()?;
    failures.sort_by(|a, b| a.shard.cmp(&b.shard));
    Ok(failures)
}

/// Copies and bytes of one shard in one state.
#[derive(sqlx::FromRow)]
pub(in crate::metadata) struct ShardUsageRow {
    shard: String,
    state: String,
    copies: i64,
    bytes: i64,
}

/// Converts the rows, sorted by shard name, then by state in declaration order.
pub(in crate::metadata) fn shard_usage_from_rows(rows: Vec<ShardUsageRow>) -> MetaResult<Vec<ShardUsage>> {
    let mut usage = rows
        .into_iter()
        .map(|row| {
            Ok(ShardUsage {
                shard: row.shard,
                state: ReplicaState::parse(&row.state)?,
                copies: from_column(row.copies, "copy count")?,
                bytes: from_column(row.bytes, "byte count")?,
            })
        })
        .collect::<MetaResult<Vec<_>>>()?;
    usage.sort_by(|a, b| (&a.shard, a.state as u8).cmp(&(&b.shard, b.state as u8)));
    Ok(usage)
}

/// An age measured by the database in microseconds; a negative one (the clock stepped back
/// since the row was written) counts as zero.
pub(in crate::metadata) fn age_from_micros(micros: Option<i64>) -> Option<Duration> {
    micros.map(|micros| Duration::from_micros(u64::try_from(micros).unwrap_or(0)))
}

/// A lease or a delay in whole microseconds, the precision both databases keep.
pub(in crate::metadata) fn duration_micros(duration: Duration, context: &'static str) -> MetaResult<i64> {
    to_column(duration.as_micros(), context)
}

pub(in crate::metadata) fn parse_blob_key(checksum: &str) -> MetaResult<BlobKey> {
    BlobKey::parse(checksum).map_err(|e| MetadataError::Corrupt(e.to_string()))
}

/// Converts a value for a signed column; one past the column's range is refused as a query error.
pub(in crate::metadata) fn to_column<S, T>(value: S, context: &'static str) -> MetaResult<T>
where
    T: TryFrom<S, Error = TryFromIntError>,
{
    T::try_from(value).map_err(|e| MetadataError::from_sqlx(context, sqlx::Error::Encode(Box::new(e))))
}

/// Converts a column back; a value out of range means the row is malformed.
pub(in crate::metadata) fn from_column<S, T>(value: S, column: &str) -> MetaResult<T>
where
    S: Copy + Display,
    T: TryFrom<S>,
{
    T::try_from(value).map_err(|_| MetadataError::Corrupt(format!("{column} {value} is out of range")))
}

/// Sorts a driver error, saying what was being done.
pub(in crate::metadata) fn sql_error(context: &'static str) -> impl FnOnce(sqlx::Error) -> MetadataError {
    move |source| MetadataError::from_sqlx(context, source)
}
