//! The SQLite metadata store: the embedded default, for one instance.
//!
//! SQLite locks the whole database, not rows. Every writing transaction opens with
//! `BEGIN IMMEDIATE`, so it holds the write lock from its first statement: dedup, the upload
//! lock, image deletion and copy deletion therefore take turns (invariant 7). A deferred
//! transaction that reads first and writes later could instead fail with `SQLITE_BUSY` when
//! another writer got in between, rather than wait for it.
//!
//! A guard (an upload's, or a copy deletion's) therefore holds the write lock of the whole
//! database until it commits or is dropped: every other writer, whatever blob it is about,
//! waits for it (up to `BUSY_TIMEOUT`). Callers keep the work done under a guard short.
//!
//! Encodings: timestamps are INTEGER microseconds since the epoch, read from this process's
//! clock (SQLite serves one instance, so it is the only clock); UUIDs are lowercase
//! hyphenated TEXT, whose text order matches the byte order Postgres sorts its uuids by.

use std::collections::BTreeSet;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteExecutor, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
};
use sqlx::{Sqlite, Transaction};
use uuid::Uuid;

use super::rows::{
    BlobCopyRow, ShardFailuresRow, ShardUsageRow, TaskRow, age_from_micros, blob_copies_from_rows, duration_micros,
    from_column, parse_blob_key, shard_failures_from_rows, shard_usage_from_rows, sql_error, to_column,
};
use super::{
    BlobCopies, CopyDeletionGuard, CopyRef, DeletedImage, ImageRecord, ListPosition, MetaResult, MetadataError,
    MetadataStore, NewImage, QueueStats, Replica, ReplicaCounts, ReplicaState, ReplicationTask, ShardUsage, TaskKind,
    UploadGuard,
};
use crate::blob::BlobKey;

/// Connections in the pool. Readers run side by side in WAL mode; writers take turns anyway.
const MAX_CONNECTIONS: u32 = 8;

/// How long a writer waits for another writer's transaction (an upload holding its guard)
/// before giving up with `SQLITE_BUSY`, which counts as unavailable.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a query waits for a free connection in the pool.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Every writing transaction starts here; see the module documentation.
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// One image joined with one copy of its blob (none when the blob has no copy).
const FIND_IMAGE: &str = "
    SELECT i.id, i.filename, i.content_type, i.file_size, i.width, i.height,
           i.blob_checksum, i.created_at, r.shard, r.state
    FROM images AS i
    LEFT JOIN replicas AS r ON r.blob_checksum = i.blob_checksum
    WHERE i.id = ?1";

const LIST_FIRST_PAGE: &str = "
    SELECT i.id, i.filename, i.content_type, i.file_size, i.width, i.height,
           i.blob_checksum, i.created_at, r.shard, r.state
    FROM (SELECT * FROM images ORDER BY created_at DESC, id DESC LIMIT ?1) AS i
    LEFT JOIN replicas AS r ON r.blob_checksum = i.blob_checksum
    ORDER BY i.created_at DESC, i.id DESC";

const LIST_PAGE_AFTER: &str = "
    SELECT i.id, i.filename, i.content_type, i.file_size, i.width, i.height,
           i.blob_checksum, i.created_at, r.shard, r.state
    FROM (SELECT * FROM images
          WHERE (created_at, id) < (?2, ?3)
          ORDER BY created_at DESC, id DESC LIMIT ?1) AS i
    LEFT JOIN replicas AS r ON r.blob_checksum = i.blob_checksum
    ORDER BY i.created_at DESC, i.id DESC";

const INSERT_IMAGE: &str = "
    INSERT INTO images
        (id, filename, content_type, file_size, width, height, blob_checksum, created_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// Adds a reference only to a live blob.
const ADD_REFERENCE_TO_LIVE_BLOB: &str = "
    UPDATE blobs SET ref_count = ref_count + 1
    WHERE checksum = ?1 AND ref_count > 0
      AND EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = ?1 AND state = 'stored')";

/// Records one copy; a copy already `stored` is not downgraded to `pending`, and a copy that
/// keeps its state keeps its `updated_at`.
const RECORD_COPY: &str = "
    INSERT INTO replicas (blob_checksum, shard, state, updated_at) VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (blob_checksum, shard) DO UPDATE
    SET state = excluded.state, updated_at = excluded.updated_at
    WHERE replicas.state <> excluded.state
      AND NOT (replicas.state = 'stored' AND excluded.state = 'pending')";

/// The blob goes once it has neither a reference nor a recorded copy.
const FORGET_BARE_BLOB: &str = "
    DELETE FROM blobs
    WHERE checksum = ?1 AND ref_count = 0
      AND NOT EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = ?1)";

/// Queues a task (`?4` is now); queueing one that exists makes it due now if it was due later
/// (its attempts and last error stay).
const QUEUE_TASK: &str = "
    INSERT INTO replication_tasks (blob_checksum, shard, kind, created_at, next_attempt_at)
    VALUES (?1, ?2, ?3, ?4, ?4)
    ON CONFLICT (blob_checksum, shard, kind) DO UPDATE
    SET next_attempt_at = excluded.next_attempt_at
    WHERE replication_tasks.next_attempt_at > excluded.next_attempt_at";

/// Queues a `copy` task for one copy, if it is `pending`.
const QUEUE_COPY_IF_PENDING: &str = "
    INSERT INTO replication_tasks (blob_checksum, shard, kind, created_at, next_attempt_at)
    SELECT blob_checksum, shard, 'copy', ?3, ?3
    FROM replicas WHERE blob_checksum = ?1 AND shard = ?2 AND state = 'pending'
    ON CONFLICT (blob_checksum, shard, kind) DO UPDATE
    SET next_attempt_at = excluded.next_attempt_at
    WHERE replication_tasks.next_attempt_at > excluded.next_attempt_at";

/// Queues a `delete` task for every copy of a blob.
const QUEUE_DELETE_FOR_EVERY_COPY: &str = "
    INSERT INTO replication_tasks (blob_checksum, shard, kind, created_at, next_attempt_at)
    SELECT blob_checksum, shard, 'delete', ?2, ?2
    FROM replicas WHERE blob_checksum = ?1
    ON CONFLICT (blob_checksum, shard, kind) DO UPDATE
    SET next_attempt_at = excluded.next_attempt_at
    WHERE replication_tasks.next_attempt_at > excluded.next_attempt_at";

/// Claims the due task that has waited longest (`?2` is now, `?3` the end of the lease).
const CLAIM_TASK: &str = "
    UPDATE replication_tasks SET claimed_by = ?1, claimed_until = ?3
    WHERE id = (
        SELECT id FROM replication_tasks
        WHERE next_attempt_at <= ?2 AND (claimed_until IS NULL OR claimed_until < ?2)
        ORDER BY next_attempt_at, id
        LIMIT 1)
    RETURNING id, kind, blob_checksum, shard, attempts, last_error";

/// `?4` is now, `?5` when the task is due again.
const FAIL_TASK: &str = "
    UPDATE replication_tasks
    SET attempts = attempts + 1, last_error = ?3, last_failed_at = ?4, next_attempt_at = ?5,
        claimed_by = NULL, claimed_until = NULL
    WHERE id = ?1 AND claimed_by = ?2";

/// Removes the caller's claimed copy task, which must be the copy the caller names.
const FINISH_CLAIMED_COPY_TASK: &str = "
    DELETE FROM replication_tasks
    WHERE id = ?1 AND claimed_by = ?2 AND kind = 'copy' AND blob_checksum = ?3 AND shard = ?4";

/// `?1` is now.
const QUEUE_STATS: &str = "
    SELECT COUNT(*) FILTER (WHERE kind = 'copy') AS copy_tasks,
           COUNT(*) FILTER (WHERE kind = 'delete') AS delete_tasks,
           ?1 - MIN(created_at) AS oldest_age
    FROM replication_tasks";

/// Per shard, the tasks that failed at least once, and the error of the latest failure.
const SHARD_FAILURES: &str = "
    SELECT t.shard, COUNT(*) AS failing_tasks, SUM(t.attempts) AS failed_attempts,
           (SELECT l.last_error FROM replication_tasks AS l
            WHERE l.shard = t.shard AND l.attempts > 0
            ORDER BY l.last_failed_at DESC NULLS LAST, l.id DESC
            LIMIT 1) AS last_error
    FROM replication_tasks AS t
    WHERE t.attempts > 0
    GROUP BY t.shard";

const BLOB_COPIES: &str = "
    SELECT b.checksum, b.size, b.ref_count, r.shard, r.state
    FROM blobs AS b
    LEFT JOIN replicas AS r ON r.blob_checksum = b.checksum
    WHERE b.checksum = ?1";

/// Every key sorts after the empty string, so `?1 = ''` reads the first page.
const BLOB_COPIES_PAGE: &str = "
    SELECT b.checksum, b.size, b.ref_count, r.shard, r.state
    FROM (SELECT checksum, size, ref_count FROM blobs
          WHERE checksum > ?1 ORDER BY checksum LIMIT ?2) AS b
    LEFT JOIN replicas AS r ON r.blob_checksum = b.checksum
    ORDER BY b.checksum";

/// Whether a copy is recorded and every shard of the JSON array `?3` (distinct, `?4` of them)
/// holds a `stored` copy of its blob.
const SURPLUS_COPY_IS_REMOVABLE: &str = "
    SELECT EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = ?1 AND shard = ?2)
       AND (SELECT COUNT(*) FROM replicas
            WHERE blob_checksum = ?1 AND state = 'stored'
              AND shard IN (SELECT value FROM json_each(?3))) = ?4";

const SHARD_USAGE: &str = "
    SELECT r.shard, r.state, COUNT(*) AS copies, COALESCE(SUM(b.size), 0) AS bytes
    FROM replicas AS r
    JOIN blobs AS b ON b.checksum = r.blob_checksum
    GROUP BY r.shard, r.state";

/// Referenced blobs with a `stored` copy outside the known shards (a JSON array) and none on them.
const COUNT_STRANDED_BLOBS: &str = "
    SELECT COUNT(*) FROM blobs AS b
    WHERE b.ref_count > 0
      AND EXISTS (SELECT 1 FROM replicas AS r
                  WHERE r.blob_checksum = b.checksum AND r.state = 'stored'
                    AND r.shard NOT IN (SELECT value FROM json_each(?1)))
      AND NOT EXISTS (SELECT 1 FROM replicas AS r
                      WHERE r.blob_checksum = b.checksum AND r.state = 'stored'
                        AND r.shard IN (SELECT value FROM json_each(?1)))";

const SAVE_JOB_CURSOR: &str = "
    INSERT INTO maintenance_jobs (name, cursor, updated_at) VALUES (?1, ?2, ?3)
    ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at";

/// Tasks can only be left on a blob without copies by a bug, but they must not keep the blob
/// row (their foreign key) alive: they go with it.
const FORGET_TASKS_OF_BARE_BLOB: &str = "
    DELETE FROM replication_tasks
    WHERE blob_checksum = ?1
      AND EXISTS (SELECT 1 FROM blobs WHERE checksum = ?1 AND ref_count = 0)
      AND NOT EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = ?1)";

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file and its directory, in WAL mode.
    pub async fn connect(url: &str) -> MetaResult<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(sql_error("reading the SQLite URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        create_parent_directory(options.get_filename()).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(sql_error("opening the SQLite database"))?;
        Ok(Self { pool })
    }

    async fn begin_write(&self, context: &'static str) -> MetaResult<Transaction<'static, Sqlite>> {
        self.pool.begin_with(BEGIN_WRITE).await.map_err(sql_error(context))
    }
}

async fn create_parent_directory(file: &Path) -> MetaResult<()> {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| MetadataError::from_sqlx("creating the SQLite database directory", sqlx::Error::Io(e))),
        _ => Ok(()),
    }
}

#[async_trait]
impl MetadataStore for SqliteStore {
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> MetaResult<()> {
        sqlx::migrate!("migrations/sqlite").run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> MetaResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(sql_error("pinging SQLite"))?;
        Ok(())
    }

    async fn insert_image_for_live_blob(&self, image: &NewImage) -> MetaResult<Option<ImageRecord>> {
        const CONTEXT: &str = "adding a reference to a live blob";
        let mut tx = self.begin_write(CONTEXT).await?;
        let added = sqlx::query(ADD_REFERENCE_TO_LIVE_BLOB)
            .bind(image.blob.as_str())
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?
            .rows_affected();
        if added == 0 {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(None);
        }
        insert_image(&mut tx, image).await?;
        let record = fetch_recorded(&mut tx, image.id).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(Some(record))
    }

    async fn lock_blob_for_upload(&self, blob: &BlobKey, size: u64) -> MetaResult<Box<dyn UploadGuard>> {
        const CONTEXT: &str = "locking a blob for an upload";
        let mut tx = self.begin_write(CONTEXT).await?;
        sqlx::query(
            "INSERT INTO blobs (checksum, size, ref_count, created_at) VALUES (?1, ?2, 0, ?3)
             ON CONFLICT (checksum) DO NOTHING",
        )
        .bind(blob.as_str())
        .bind(to_column::<_, i64>(size, CONTEXT)?)
        .bind(now_micros())
        .execute(&mut *tx)
        .await
        .map_err(sql_error(CONTEXT))?;
        Ok(Box::new(SqliteUploadGuard { tx, blob: blob.clone() }))
    }

    async fn find_image(&self, id: Uuid) -> MetaResult<Option<ImageRecord>> {
        fetch_image(&self.pool, id).await
    }

    async fn list_images(&self, limit: u32, after: Option<&ListPosition>) -> MetaResult<Vec<ImageRecord>> {
        const CONTEXT: &str = "listing images";
        let limit = i64::from(limit);
        let query = match after {
            None => sqlx::query_as::<_, ImageRow>(LIST_FIRST_PAGE).bind(limit),
            Some(position) => sqlx::query_as::<_, ImageRow>(LIST_PAGE_AFTER)
                .bind(limit)
                .bind(position.created_at.timestamp_micros())
                .bind(uuid_text(position.id)),
        };
        let rows = query.fetch_all(&self.pool).await.map_err(sql_error(CONTEXT))?;
        records_from_rows(rows)
    }

    async fn delete_image(&self, id: Uuid) -> MetaResult<Option<DeletedImage>> {
        const CONTEXT: &str = "deleting an image";
        let mut tx = self.begin_write(CONTEXT).await?;
        let checksum: Option<String> = sqlx::query_scalar("DELETE FROM images WHERE id = ?1 RETURNING blob_checksum")
            .bind(uuid_text(id))
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        let Some(checksum) = checksum else {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(None);
        };
        let blob = parse_blob_key(&checksum)?;
        let blob_unreferenced = drop_reference(&mut tx, &blob).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(Some(DeletedImage { blob, blob_unreferenced }))
    }

    async fn copies_awaiting_deletion(&self, limit: u32) -> MetaResult<Vec<CopyRef>> {
        const CONTEXT: &str = "listing copies awaiting deletion";
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT blob_checksum, shard FROM replicas WHERE state = 'deleting'
             ORDER BY updated_at, blob_checksum, shard LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(sql_error(CONTEXT))?;
        rows.into_iter().map(|(checksum, shard)| Ok(CopyRef { blob: parse_blob_key(&checksum)?, shard })).collect()
    }

    async fn lock_copy_for_deletion(&self, copy: &CopyRef) -> MetaResult<Option<Box<dyn CopyDeletionGuard>>> {
        const CONTEXT: &str = "locking a copy for deletion";
        let mut tx = self.begin_write(CONTEXT).await?;
        let ref_count = blob_ref_count(&mut tx, &copy.blob).await?;
        let deleting = ref_count == Some(0) && copy_is_deleting(&mut tx, copy).await?;
        if !deleting {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(None);
        }
        Ok(Some(Box::new(SqliteCopyDeletionGuard { tx, copy: copy.clone() })))
    }

    async fn set_replica_state(&self, copy: &CopyRef, state: ReplicaState) -> MetaResult<()> {
        sqlx::query(
            "UPDATE replicas SET state = ?3, updated_at = ?4
             WHERE blob_checksum = ?1 AND shard = ?2 AND state <> ?3",
        )
        .bind(copy.blob.as_str())
        .bind(&copy.shard)
        .bind(state.as_str())
        .bind(now_micros())
        .execute(&self.pool)
        .await
        .map_err(sql_error("setting the state of a copy"))?;
        Ok(())
    }

    async fn count_replicas_by_state(&self) -> MetaResult<ReplicaCounts> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT state, COUNT(*) FROM replicas GROUP BY state")
            .fetch_all(&self.pool)
            .await
            .map_err(sql_error("counting copies by state"))?;
        let mut counts = ReplicaCounts::default();
        for (state, count) in rows {
            let count = from_column(count, "replica count")?;
            match ReplicaState::parse(&state)? {
                ReplicaState::Pending => counts.pending = count,
                ReplicaState::Stored => counts.stored = count,
                ReplicaState::Missing => counts.missing = count,
                ReplicaState::Deleting => counts.deleting = count,
            }
        }
        Ok(counts)
    }

    async fn claim_task(&self, worker: &str, lease: Duration) -> MetaResult<Option<ReplicationTask>> {
        const CONTEXT: &str = "claiming a replication task";
        let now = now_micros();
        let claimed_until = now.saturating_add(duration_micros(lease, CONTEXT)?);
        let mut tx = self.begin_write(CONTEXT).await?;
        let row = sqlx::query_as::<_, TaskRow>(CLAIM_TASK)
            .bind(worker)
            .bind(now)
            .bind(claimed_until)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        row.map(TaskRow::into_task).transpose()
    }

    async fn extend_claim(&self, task: i64, worker: &str, lease: Duration) -> MetaResult<bool> {
        const CONTEXT: &str = "extending the claim on a replication task";
        let claimed_until = now_micros().saturating_add(duration_micros(lease, CONTEXT)?);
        let extended = sqlx::query("UPDATE replication_tasks SET claimed_until = ?3 WHERE id = ?1 AND claimed_by = ?2")
            .bind(task)
            .bind(worker)
            .bind(claimed_until)
            .execute(&self.pool)
            .await
            .map_err(sql_error(CONTEXT))?
            .rows_affected();
        Ok(extended == 1)
    }

    async fn complete_copy_task(&self, task: &ReplicationTask, worker: &str) -> MetaResult<bool> {
        const CONTEXT: &str = "completing a copy task";
        let mut tx = self.begin_write(CONTEXT).await?;
        let finished = sqlx::query(FINISH_CLAIMED_COPY_TASK)
            .bind(task.id)
            .bind(worker)
            .bind(task.copy.blob.as_str())
            .bind(&task.copy.shard)
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?
            .rows_affected();
        if finished == 0 {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(false);
        }
        let ref_count = blob_ref_count(&mut tx, &task.copy.blob).await?;
        record_written_copy(&mut tx, &task.copy, ref_count.is_some_and(|count| count > 0)).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(true)
    }

    async fn finish_task(&self, task: i64, worker: &str) -> MetaResult<bool> {
        let finished = sqlx::query("DELETE FROM replication_tasks WHERE id = ?1 AND claimed_by = ?2")
            .bind(task)
            .bind(worker)
            .execute(&self.pool)
            .await
            .map_err(sql_error("finishing a replication task"))?
            .rows_affected();
        Ok(finished == 1)
    }

    async fn fail_task(&self, task: i64, worker: &str, error: &str, retry_after: Duration) -> MetaResult<bool> {
        const CONTEXT: &str = "recording a failed replication task";
        let now = now_micros();
        let failed = sqlx::query(FAIL_TASK)
            .bind(task)
            .bind(worker)
            .bind(error)
            .bind(now)
            .bind(now.saturating_add(duration_micros(retry_after, CONTEXT)?))
            .execute(&self.pool)
            .await
            .map_err(sql_error(CONTEXT))?
            .rows_affected();
        Ok(failed == 1)
    }

    async fn release_claims(&self, worker: &str) -> MetaResult<u64> {
        let released =
            sqlx::query("UPDATE replication_tasks SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = ?1")
                .bind(worker)
                .execute(&self.pool)
                .await
                .map_err(sql_error("releasing the claims of a worker"))?;
        Ok(released.rows_affected())
    }

    async fn record_missing_copy(&self, copy: &CopyRef) -> MetaResult<()> {
        const CONTEXT: &str = "recording a missing copy";
        let mut tx = self.begin_write(CONTEXT).await?;
        let marked = sqlx::query(
            "UPDATE replicas SET state = 'missing', updated_at = ?3
             WHERE blob_checksum = ?1 AND shard = ?2 AND state = 'stored'",
        )
        .bind(copy.blob.as_str())
        .bind(&copy.shard)
        .bind(now_micros())
        .execute(&mut *tx)
        .await
        .map_err(sql_error(CONTEXT))?
        .rows_affected();
        if marked > 0 {
            queue_task(&mut tx, copy, TaskKind::Copy).await?;
        }
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(())
    }

    async fn queue_stats(&self) -> MetaResult<QueueStats> {
        const CONTEXT: &str = "reading the replication queue statistics";
        // One read transaction, so the counts and the failures describe the same moment.
        let mut tx = self.pool.begin().await.map_err(sql_error(CONTEXT))?;
        let (copy_tasks, delete_tasks, oldest_age): (i64, i64, Option<i64>) =
            sqlx::query_as(QUEUE_STATS).bind(now_micros()).fetch_one(&mut *tx).await.map_err(sql_error(CONTEXT))?;
        let failures = sqlx::query_as::<_, ShardFailuresRow>(SHARD_FAILURES)
            .fetch_all(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        tx.rollback().await.map_err(sql_error(CONTEXT))?;
        Ok(QueueStats {
            copy_tasks: from_column(copy_tasks, "copy task count")?,
            delete_tasks: from_column(delete_tasks, "delete task count")?,
            oldest_task_age: age_from_micros(oldest_age),
            failing: shard_failures_from_rows(failures)?,
        })
    }

    async fn find_blob_copies(&self, blob: &BlobKey) -> MetaResult<Option<BlobCopies>> {
        let rows = sqlx::query_as::<_, BlobCopyRow>(BLOB_COPIES)
            .bind(blob.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(sql_error("reading the copies of a blob"))?;
        Ok(blob_copies_from_rows(rows)?.into_iter().next())
    }

    async fn list_blob_copies(&self, after: Option<&BlobKey>, limit: u32) -> MetaResult<Vec<BlobCopies>> {
        let rows = sqlx::query_as::<_, BlobCopyRow>(BLOB_COPIES_PAGE)
            .bind(after.map_or("", BlobKey::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(sql_error("listing blobs with their copies"))?;
        blob_copies_from_rows(rows)
    }

    async fn record_stored_copy(&self, copy: &CopyRef) -> MetaResult<bool> {
        const CONTEXT: &str = "recording a stored copy";
        let mut tx = self.begin_write(CONTEXT).await?;
        let Some(ref_count) = blob_ref_count(&mut tx, &copy.blob).await? else {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(false);
        };
        let referenced = ref_count > 0;
        record_written_copy(&mut tx, copy, referenced).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(referenced)
    }

    async fn lock_surplus_copy(
        &self,
        copy: &CopyRef,
        keep: &[String],
    ) -> MetaResult<Option<Box<dyn CopyDeletionGuard>>> {
        const CONTEXT: &str = "locking a surplus copy";
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect::<BTreeSet<_>>().into_iter().collect();
        if keep.is_empty() || keep.contains(&copy.shard.as_str()) {
            return Ok(None);
        }
        let keep_json = json_array(&keep, CONTEXT)?;
        let mut tx = self.begin_write(CONTEXT).await?;
        let removable: bool = sqlx::query_scalar(SURPLUS_COPY_IS_REMOVABLE)
            .bind(copy.blob.as_str())
            .bind(&copy.shard)
            .bind(keep_json)
            .bind(to_column::<_, i64>(keep.len(), CONTEXT)?)
            .fetch_one(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        if !removable {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(None);
        }
        Ok(Some(Box::new(SqliteCopyDeletionGuard { tx, copy: copy.clone() })))
    }

    async fn shard_usage(&self) -> MetaResult<Vec<ShardUsage>> {
        let rows = sqlx::query_as::<_, ShardUsageRow>(SHARD_USAGE)
            .fetch_all(&self.pool)
            .await
            .map_err(sql_error("summing copies and bytes per shard"))?;
        shard_usage_from_rows(rows)
    }

    async fn count_stranded_blobs(&self, known_shards: &[String]) -> MetaResult<u64> {
        const CONTEXT: &str = "counting blobs stored only on unknown shards";
        let count: i64 = sqlx::query_scalar(COUNT_STRANDED_BLOBS)
            .bind(json_array(known_shards, CONTEXT)?)
            .fetch_one(&self.pool)
            .await
            .map_err(sql_error(CONTEXT))?;
        from_column(count, "stranded blob count")
    }

    async fn load_job_cursor(&self, job: &str) -> MetaResult<Option<BlobKey>> {
        let cursor: Option<Option<String>> = sqlx::query_scalar("SELECT cursor FROM maintenance_jobs WHERE name = ?1")
            .bind(job)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql_error("loading the position of a job"))?;
        cursor.flatten().map(|checksum| parse_blob_key(&checksum)).transpose()
    }

    async fn save_job_cursor(&self, job: &str, cursor: Option<&BlobKey>) -> MetaResult<()> {
        sqlx::query(SAVE_JOB_CURSOR)
            .bind(job)
            .bind(cursor.map(BlobKey::as_str))
            .bind(now_micros())
            .execute(&self.pool)
            .await
            .map_err(sql_error("saving the position of a job"))?;
        Ok(())
    }
}

/// Holds the write lock `lock_blob_for_upload` took; dropping it rolls back.
struct SqliteUploadGuard {
    tx: Transaction<'static, Sqlite>,
    blob: BlobKey,
}

#[async_trait]
impl UploadGuard for SqliteUploadGuard {
    async fn commit(self: Box<Self>, image: &NewImage, copies: &[Replica]) -> MetaResult<ImageRecord> {
        const CONTEXT: &str = "recording an upload";
        let Self { mut tx, blob } = *self;
        // A reference to another blob would leave this blob's count wrong: a caller bug.
        assert_eq!(image.blob, blob, "an upload guard commits an image of the blob it locked");
        forget_deleting_copies(&mut tx, &blob).await?;
        forget_tasks(&mut tx, &blob, TaskKind::Delete).await?;
        for copy in copies {
            record_copy(&mut tx, &blob, copy).await?;
            if copy.state == ReplicaState::Pending {
                queue_copy_if_pending(&mut tx, &blob, &copy.shard).await?;
            }
        }
        add_reference(&mut tx, &blob).await?;
        insert_image(&mut tx, image).await?;
        let record = fetch_recorded(&mut tx, image.id).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(record)
    }
}

/// Holds the write lock `lock_copy_for_deletion` or `lock_surplus_copy` took; dropping it
/// rolls back.
struct SqliteCopyDeletionGuard {
    tx: Transaction<'static, Sqlite>,
    copy: CopyRef,
}

#[async_trait]
impl CopyDeletionGuard for SqliteCopyDeletionGuard {
    async fn commit(self: Box<Self>) -> MetaResult<()> {
        const CONTEXT: &str = "forgetting a deleted copy";
        let Self { mut tx, copy } = *self;
        sqlx::query("DELETE FROM replicas WHERE blob_checksum = ?1 AND shard = ?2")
            .bind(copy.blob.as_str())
            .bind(&copy.shard)
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        sqlx::query("DELETE FROM replication_tasks WHERE blob_checksum = ?1 AND shard = ?2")
            .bind(copy.blob.as_str())
            .bind(&copy.shard)
            .execute(&mut *tx)
            .await
            .map_err(sql_error("forgetting the tasks of a deleted copy"))?;
        forget_bare_blob(&mut tx, &copy.blob).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(())
    }
}

/// The blob's reference count, or `None` if it is not recorded. Inside a write transaction,
/// nothing can change it before the transaction ends.
async fn blob_ref_count(conn: &mut SqliteConnection, blob: &BlobKey) -> MetaResult<Option<i64>> {
    sqlx::query_scalar("SELECT ref_count FROM blobs WHERE checksum = ?1")
        .bind(blob.as_str())
        .fetch_optional(conn)
        .await
        .map_err(sql_error("reading the reference count of a blob"))
}

async fn copy_is_deleting(conn: &mut SqliteConnection, copy: &CopyRef) -> MetaResult<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM replicas
                        WHERE blob_checksum = ?1 AND shard = ?2 AND state = 'deleting')",
    )
    .bind(copy.blob.as_str())
    .bind(&copy.shard)
    .fetch_one(conn)
    .await
    .map_err(sql_error("checking that a copy awaits deletion"))
}

/// Drops one reference; at zero every copy becomes `deleting`. Returns whether that was the
/// last reference.
async fn drop_reference(conn: &mut SqliteConnection, blob: &BlobKey) -> MetaResult<bool> {
    const CONTEXT: &str = "dropping a reference to a blob";
    let remaining: Option<i64> =
        sqlx::query_scalar("UPDATE blobs SET ref_count = ref_count - 1 WHERE checksum = ?1 RETURNING ref_count")
            .bind(blob.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(sql_error(CONTEXT))?;
    let remaining =
        remaining.ok_or_else(|| MetadataError::Corrupt(format!("an image refers to absent blob {blob}")))?;
    if remaining > 0 {
        return Ok(false);
    }
    sqlx::query("UPDATE replicas SET state = 'deleting', updated_at = ?2 WHERE blob_checksum = ?1")
        .bind(blob.as_str())
        .bind(now_micros())
        .execute(&mut *conn)
        .await
        .map_err(sql_error("marking the copies of an unreferenced blob for deletion"))?;
    // Copying is moot now; deleting is what the copies need.
    forget_tasks(conn, blob, TaskKind::Copy).await?;
    sqlx::query(QUEUE_DELETE_FOR_EVERY_COPY)
        .bind(blob.as_str())
        .bind(now_micros())
        .execute(&mut *conn)
        .await
        .map_err(sql_error("queueing the deletion of the copies of an unreferenced blob"))?;
    forget_bare_blob(conn, blob).await?;
    Ok(true)
}

async fn forget_bare_blob(conn: &mut SqliteConnection, blob: &BlobKey) -> MetaResult<()> {
    sqlx::query(FORGET_TASKS_OF_BARE_BLOB)
        .bind(blob.as_str())
        .execute(&mut *conn)
        .await
        .map_err(sql_error("forgetting the tasks of a blob without copies"))?;
    sqlx::query(FORGET_BARE_BLOB)
        .bind(blob.as_str())
        .execute(conn)
        .await
        .map_err(sql_error("forgetting a blob without copies"))?;
    Ok(())
}

/// Forgets copies an earlier deletion left behind; an upload that needs them lists them again.
async fn forget_deleting_copies(conn: &mut SqliteConnection, blob: &BlobKey) -> MetaResult<()> {
    sqlx::query("DELETE FROM replicas WHERE blob_checksum = ?1 AND state = 'deleting'")
        .bind(blob.as_str())
        .execute(conn)
        .await
        .map_err(sql_error("forgetting copies left by a deletion"))?;
    Ok(())
}

async fn record_copy(conn: &mut SqliteConnection, blob: &BlobKey, copy: &Replica) -> MetaResult<()> {
    sqlx::query(RECORD_COPY)
        .bind(blob.as_str())
        .bind(&copy.shard)
        .bind(copy.state.as_str())
        .bind(now_micros())
        .execute(conn)
        .await
        .map_err(sql_error("recording a copy"))?;
    Ok(())
}

/// Records a copy a worker or an operator tool has just written and verified: `stored` while
/// the blob is referenced, otherwise `deleting` with a `delete` task, so the new object is
/// removed like the blob's other copies. Either way the copy needs no `copy` task any more.
async fn record_written_copy(conn: &mut SqliteConnection, copy: &CopyRef, referenced: bool) -> MetaResult<()> {
    let state = if referenced { ReplicaState::Stored } else { ReplicaState::Deleting };
    record_copy(conn, &copy.blob, &Replica { shard: copy.shard.clone(), state }).await?;
    sqlx::query("DELETE FROM replication_tasks WHERE blob_checksum = ?1 AND shard = ?2 AND kind = 'copy'")
        .bind(copy.blob.as_str())
        .bind(&copy.shard)
        .execute(&mut *conn)
        .await
        .map_err(sql_error("forgetting the copy task of a stored copy"))?;
    if !referenced {
        queue_task(conn, copy, TaskKind::Delete).await?;
    }
    Ok(())
}

async fn queue_task(conn: &mut SqliteConnection, copy: &CopyRef, kind: TaskKind) -> MetaResult<()> {
    sqlx::query(QUEUE_TASK)
        .bind(copy.blob.as_str())
        .bind(&copy.shard)
        .bind(kind.as_str())
        .bind(now_micros())
        .execute(conn)
        .await
        .map_err(sql_error("queueing a replication task"))?;
    Ok(())
}

async fn queue_copy_if_pending(conn: &mut SqliteConnection, blob: &BlobKey, shard: &str) -> MetaResult<()> {
    sqlx::query(QUEUE_COPY_IF_PENDING)
        .bind(blob.as_str())
        .bind(shard)
        .bind(now_micros())
        .execute(conn)
        .await
        .map_err(sql_error("queueing the copy of a pending copy"))?;
    Ok(())
}

/// Forgets every task of one kind for a blob.
async fn forget_tasks(conn: &mut SqliteConnection, blob: &BlobKey, kind: TaskKind) -> MetaResult<()> {
    sqlx::query("DELETE FROM replication_tasks WHERE blob_checksum = ?1 AND kind = ?2")
        .bind(blob.as_str())
        .bind(kind.as_str())
        .execute(conn)
        .await
        .map_err(sql_error("forgetting moot replication tasks"))?;
    Ok(())
}

async fn add_reference(conn: &mut SqliteConnection, blob: &BlobKey) -> MetaResult<()> {
    let updated = sqlx::query("UPDATE blobs SET ref_count = ref_count + 1 WHERE checksum = ?1")
        .bind(blob.as_str())
        .execute(conn)
        .await
        .map_err(sql_error("adding a reference to a blob"))?
        .rows_affected();
    if updated == 1 { Ok(()) } else { Err(MetadataError::Corrupt(format!("locked blob {blob} has no row"))) }
}

async fn insert_image(conn: &mut SqliteConnection, image: &NewImage) -> MetaResult<()> {
    const CONTEXT: &str = "recording an image";
    sqlx::query(INSERT_IMAGE)
        .bind(uuid_text(image.id))
        .bind(&image.filename)
        .bind(&image.content_type)
        .bind(to_column::<_, i64>(image.file_size, CONTEXT)?)
        // Checked as for Postgres's INTEGER columns, so both backends accept the same images.
        .bind(to_column::<_, i32>(image.width, CONTEXT)?)
        .bind(to_column::<_, i32>(image.height, CONTEXT)?)
        .bind(image.blob.as_str())
        .bind(image.created_at.timestamp_micros())
        .execute(conn)
        .await
        .map_err(sql_error(CONTEXT))?;
    Ok(())
}

async fn fetch_image(executor: impl SqliteExecutor<'_>, id: Uuid) -> MetaResult<Option<ImageRecord>> {
    let rows = sqlx::query_as::<_, ImageRow>(FIND_IMAGE)
        .bind(uuid_text(id))
        .fetch_all(executor)
        .await
        .map_err(sql_error("reading an image"))?;
    Ok(records_from_rows(rows)?.into_iter().next())
}

/// Reads back an image this transaction has just recorded.
async fn fetch_recorded(conn: &mut SqliteConnection, id: Uuid) -> MetaResult<ImageRecord> {
    fetch_image(conn, id)
        .await?
        .ok_or_else(|| MetadataError::Corrupt(format!("image {id} is missing right after being recorded")))
}

/// One image joined with one copy of its blob, as `FIND_IMAGE` and the list queries return it.
/// Integers are read as i64: SQLite would silently truncate a wider value read as i32.
#[derive(sqlx::FromRow)]
struct ImageRow {
    id: String,
    filename: String,
    content_type: String,
    file_size: i64,
    width: i64,
    height: i64,
    blob_checksum: String,
    created_at: i64,
    shard: Option<String>,
    state: Option<String>,
}

impl ImageRow {
    fn replica(&self) -> MetaResult<Option<Replica>> {
        match (&self.shard, &self.state) {
            (Some(shard), Some(state)) => {
                Ok(Some(Replica { shard: shard.clone(), state: ReplicaState::parse(state)? }))
            }
            _ => Ok(None),
        }
    }

    /// The record without its copies; `id` is the row's id, already parsed.
    fn into_record(self, id: Uuid) -> MetaResult<ImageRecord> {
        Ok(ImageRecord {
            id,
            filename: self.filename,
            content_type: self.content_type,
            file_size: from_column(self.file_size, "file_size")?,
            width: from_column(self.width, "width")?,
            height: from_column(self.height, "height")?,
            blob: parse_blob_key(&self.blob_checksum)?,
            created_at: DateTime::from_timestamp_micros(self.created_at)
                .ok_or_else(|| MetadataError::Corrupt(format!("created_at {} is out of range", self.created_at)))?,
            replicas: Vec::new(),
        })
    }
}

/// Folds image-and-copy rows into records. The queries order rows by image, so the rows of
/// one image are adjacent.
fn records_from_rows(rows: Vec<ImageRow>) -> MetaResult<Vec<ImageRecord>> {
    let mut records: Vec<ImageRecord> = Vec::new();
    for row in rows {
        let replica = row.replica()?;
        let id = parse_uuid(&row.id)?;
        if records.last().is_none_or(|last| last.id != id) {
            records.push(row.into_record(id)?);
        }
        if let Some(record) = records.last_mut() {
            record.replicas.extend(replica);
        }
    }
    // Sorted here, as the Postgres store does, so both order shard names by bytes.
    for record in &mut records {
        record.replicas.sort_by(|a, b| a.shard.cmp(&b.shard));
    }
    Ok(records)
}

/// The stored form of a UUID: lowercase and hyphenated.
fn uuid_text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

fn parse_uuid(text: &str) -> MetaResult<Uuid> {
    Uuid::parse_str(text).map_err(|e| MetadataError::Corrupt(format!("image id {text:?}: {e}")))
}

/// The stored form of "now": microseconds since the epoch.
fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

/// A list of names as a JSON array, for `json_each`.
fn json_array(names: &[impl AsRef<str>], context: &'static str) -> MetaResult<String> {
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    serde_json::to_string(&names).map_err(|e| MetadataError::from_sqlx(context, sqlx::Error::Encode(Box::new(e))))
}
