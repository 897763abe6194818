//! The replication queue ([`TaskQueue`]), and the steps that queue and forget tasks inside
//! other concerns' transactions.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::Database;

use super::D;
use super::copies::{lock_blob, record_written_copy};
use crate::blob::BlobKey;
use crate::metadata::rows::{
    ShardFailuresRow, TaskRow, age_from_micros, duration_micros, from_column, shard_failures_from_rows, sql_error,
};
use crate::metadata::sql::dialect::Dialect;
use crate::metadata::sql::{SqlStore, Statement};
use crate::metadata::{CopyRef, MetaResult, QueueStats, ReplicationTask, TaskKind, TaskQueue};
use crate::observability::request_id;

type Connection = <<D as Dialect>::Db as Database>::Connection;

/// Queueing a task that exists makes it due now if it was due later; its attempts and last
/// error stay. (There is at most one task per blob, shard and kind.)
macro_rules! or_make_due_now {
    () => {
        " ON CONFLICT (blob_checksum, shard, kind) DO UPDATE
          SET next_attempt_at = excluded.next_attempt_at
          WHERE replication_tasks.next_attempt_at > excluded.next_attempt_at"
    };
}

/// Queues a task. `{clock}`: an upload guard queues at the end of a transaction that was open
/// for the whole upload, and the task is due from now, not from its start. Every task records
/// the request it came from (`$N`: the request id in scope, see `observability/request_id.rs`).
static QUEUE_TASK: Statement = Statement::new(concat!(
    "INSERT INTO replication_tasks (blob_checksum, shard, kind, created_at, next_attempt_at, request_id)
     VALUES ($1, $2, $3, {clock}, {clock}, $4)",
    or_make_due_now!()
));

/// Queues a `copy` task for one copy, if it is `pending`.
static QUEUE_COPY_IF_PENDING: Statement = Statement::new(concat!(
    "INSERT INTO replication_tasks (blob_checksum, shard, kind, created_at, next_attempt_at, request_id)
     SELECT blob_checksum, shard, 'copy', {clock}, {clock}, $3
     FROM replicas WHERE blob_checksum = $1 AND shard = $2 AND state = 'pending'",
    or_make_due_now!()
));

/// Queues a `delete` task for every copy of a blob.
static QUEUE_DELETE_FOR_EVERY_COPY: Statement = Statement::new(concat!(
    "INSERT INTO replication_tasks (blob_checksum, shard, kind, created_at, next_attempt_at, request_id)
     SELECT blob_checksum, shard, 'delete', {clock}, {clock}, $2
     FROM replicas WHERE blob_checksum = $1",
    or_make_due_now!()
));

static FORGET_TASKS_OF_KIND: Statement =
    Statement::new("DELETE FROM replication_tasks WHERE blob_checksum = $1 AND kind = $2");

/// The `delete` tasks of a blob's copies that are no longer `deleting` (forgotten, or recorded
/// again by an upload).
static FORGET_MOOT_DELETE_TASKS: Statement = Statement::new(
    "DELETE FROM replication_tasks
     WHERE blob_checksum = $1 AND kind = 'delete'
       AND NOT EXISTS (SELECT 1 FROM replicas AS r
                       WHERE r.blob_checksum = $1 AND r.shard = replication_tasks.shard AND r.state = 'deleting')",
);

static FORGET_TASKS_OF_COPY: Statement =
    Statement::new("DELETE FROM replication_tasks WHERE blob_checksum = $1 AND shard = $2");

static FORGET_COPY_TASK: Statement =
    Statement::new("DELETE FROM replication_tasks WHERE blob_checksum = $1 AND shard = $2 AND kind = 'copy'");

/// Claims the due task that has waited longest. On Postgres, `SKIP LOCKED` lets claimers
/// pass each other instead of queueing on the same row, and `FOR UPDATE` makes Postgres
/// re-check the condition on the newest version of the row it locked, so a task another
/// worker has just claimed is passed over rather than claimed twice.
static CLAIM_TASK: Statement = Statement::new(
    "UPDATE replication_tasks SET claimed_by = $1, claimed_until = {after_micros:$2}
     WHERE id = (
         SELECT id FROM replication_tasks
         WHERE next_attempt_at <= {now} AND (claimed_until IS NULL OR claimed_until < {now})
         ORDER BY next_attempt_at, id
         LIMIT 1
         {skip_locked})
     RETURNING id, kind, blob_checksum, shard, CAST(attempts AS BIGINT) AS attempts, last_error, request_id",
);

/// Claims one copy's `copy` task unless another worker holds it. On Postgres a concurrent
/// claimer of the same row waits for this one and then re-checks the claim on the row's newest
/// version, so only one of them gets it.
static CLAIM_COPY_TASK: Statement = Statement::new(
    "UPDATE replication_tasks SET claimed_by = $1, claimed_until = {after_micros:$2}
     WHERE blob_checksum = $3 AND shard = $4 AND kind = 'copy'
       AND (claimed_until IS NULL OR claimed_until < {now})
     RETURNING id, kind, blob_checksum, shard, CAST(attempts AS BIGINT) AS attempts, last_error, request_id",
);

static COUNT_DUE_TASKS: Statement = Statement::new(
    "SELECT COUNT(*) FROM (
         SELECT 1 FROM replication_tasks WHERE next_attempt_at <= {now} LIMIT $1) AS due",
);

static EXTEND_CLAIM: Statement =
    Statement::new("UPDATE replication_tasks SET claimed_until = {after_micros:$3} WHERE id = $1 AND claimed_by = $2");

static FAIL_TASK: Statement = Statement::new(
    "UPDATE replication_tasks
     SET attempts = attempts + 1, last_error = $3, last_failed_at = {now},
         next_attempt_at = {after_micros:$4}, claimed_by = NULL, claimed_until = NULL
     WHERE id = $1 AND claimed_by = $2",
);

/// Removes the caller's claimed copy task, which must be the copy the caller names.
static FINISH_CLAIMED_COPY_TASK: Statement = Statement::new(
    "DELETE FROM replication_tasks
     WHERE id = $1 AND claimed_by = $2 AND kind = 'copy' AND blob_checksum = $3 AND shard = $4",
);

static FINISH_TASK: Statement = Statement::new("DELETE FROM replication_tasks WHERE id = $1 AND claimed_by = $2");

static RELEASE_CLAIMS: Statement =
    Statement::new("UPDATE replication_tasks SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = $1");

static QUEUE_STATS: Statement = Statement::new(
    "SELECT COUNT(*) FILTER (WHERE kind = 'copy') AS copy_tasks,
            COUNT(*) FILTER (WHERE kind = 'delete') AS delete_tasks,
            {micros_since:MIN(created_at)} AS oldest_age
     FROM replication_tasks",
);

/// Per shard, the tasks that failed at least once, and the error of the latest failure
/// (SQLite's clock counts milliseconds: failures within the same one are ordered by task id).
static SHARD_FAILURES: Statement = Statement::new(
    "SELECT t.shard, COUNT(*) AS failing_tasks, CAST(SUM(t.attempts) AS BIGINT) AS failed_attempts,
            (SELECT l.last_error FROM replication_tasks AS l
             WHERE l.shard = t.shard AND l.attempts > 0
             ORDER BY l.last_failed_at DESC NULLS LAST, l.id DESC
             LIMIT 1) AS last_error
     FROM replication_tasks AS t
     WHERE t.attempts > 0
     GROUP BY t.shard",
);

#[async_trait]
impl TaskQueue for SqlStore<D> {
    async fn claim_task(&self, worker: &str, lease: Duration) -> MetaResult<Option<ReplicationTask>> {
        const CONTEXT: &str = "claiming a replication task";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let row = sqlx::query_as::<_, TaskRow>(CLAIM_TASK.sql::<D>())
            .bind(worker)
            .bind(duration_micros(lease, CONTEXT)?)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        row.map(TaskRow::into_task).transpose()
    }

    async fn claim_copy_task(
        &self,
        copy: &CopyRef,
        worker: &str,
        lease: Duration,
    ) -> MetaResult<Option<ReplicationTask>> {
        const CONTEXT: &str = "claiming the copy task of one copy";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let row = sqlx::query_as::<_, TaskRow>(CLAIM_COPY_TASK.sql::<D>())
            .bind(worker)
            .bind(duration_micros(lease, CONTEXT)?)
            .bind(copy.blob.as_str())
            .bind(&copy.shard)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        row.map(TaskRow::into_task).transpose()
    }

    async fn count_due_tasks(&self, cap: u64) -> MetaResult<u64> {
        const CONTEXT: &str = "counting the due replication tasks";
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        let (due,): (i64,) = sqlx::query_as(COUNT_DUE_TASKS.sql::<D>())
            .bind(cap)
            .fetch_one(&self.pool)
            .await
            .map_err(sql_error(CONTEXT))?;
        from_column(due, "due task count")
    }

    async fn extend_claim(&self, task: i64, worker: &str, lease: Duration) -> MetaResult<bool> {
        const CONTEXT: &str = "extending the claim on a replication task";
        let extended = sqlx::query(EXTEND_CLAIM.sql::<D>())
            .bind(task)
            .bind(worker)
            .bind(duration_micros(lease, CONTEXT)?)
            .execute(&self.pool)
            .await
            .map_err(sql_error(CONTEXT))?
            .rows_affected();
        Ok(extended == 1)
    }

    async fn complete_copy_task(&self, task: &ReplicationTask, worker: &str) -> MetaResult<bool> {
        const CONTEXT: &str = "completing a copy task";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let ref_count = lock_blob(&mut tx, &task.copy.blob).await?;
        let finished = sqlx::query(FINISH_CLAIMED_COPY_TASK.sql::<D>())
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
        record_written_copy(&mut tx, &task.copy, ref_count.is_some_and(|count| count > 0)).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(true)
    }

    async fn finish_task(&self, task: i64, worker: &str) -> MetaResult<bool> {
        let finished = sqlx::query(FINISH_TASK.sql::<D>())
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
        let failed = sqlx::query(FAIL_TASK.sql::<D>())
            .bind(task)
            .bind(worker)
            .bind(error)
            .bind(duration_micros(retry_after, CONTEXT)?)
            .execute(&self.pool)
            .await
            .map_err(sql_error(CONTEXT))?
            .rows_affected();
        Ok(failed == 1)
    }

    async fn release_claims(&self, worker: &str) -> MetaResult<u64> {
        let released = sqlx::query(RELEASE_CLAIMS.sql::<D>())
            .bind(worker)
            .execute(&self.pool)
            .await
            .map_err(sql_error("releasing the claims of a worker"))?;
        Ok(released.rows_affected())
    }

    async fn queue_stats(&self) -> MetaResult<QueueStats> {
        const CONTEXT: &str = "reading the replication queue statistics";
        // One transaction, so that on SQLite the counts and the failures describe one moment.
        let mut tx = self.pool.begin().await.map_err(sql_error(CONTEXT))?;
        let (copy_tasks, delete_tasks, oldest_age): (i64, i64, Option<i64>) =
            sqlx::query_as(QUEUE_STATS.sql::<D>()).fetch_one(&mut *tx).await.map_err(sql_error(CONTEXT))?;
        let failures = sqlx::query_as::<_, ShardFailuresRow>(SHARD_FAILURES.sql::<D>())
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
}

pub(super) async fn queue_task(conn: &mut Connection, copy: &CopyRef, kind: TaskKind) -> MetaResult<()> {
    sqlx::query(QUEUE_TASK.sql::<D>())
        .bind(copy.blob.as_str())
        .bind(&copy.shard)
        .bind(kind.as_str())
        .bind(request_id::current())
        .execute(conn)
        .await
        .map_err(sql_error("queueing a replication task"))?;
    Ok(())
}

pub(super) async fn queue_copy_if_pending(conn: &mut Connection, blob: &BlobKey, shard: &str) -> MetaResult<()> {
    sqlx::query(QUEUE_COPY_IF_PENDING.sql::<D>())
        .bind(blob.as_str())
        .bind(shard)
        .bind(request_id::current())
        .execute(conn)
        .await
        .map_err(sql_error("queueing the copy of a pending copy"))?;
    Ok(())
}

pub(super) async fn queue_delete_for_every_copy(conn: &mut Connection, blob: &BlobKey) -> MetaResult<()> {
    sqlx::query(QUEUE_DELETE_FOR_EVERY_COPY.sql::<D>())
        .bind(blob.as_str())
        .bind(request_id::current())
        .execute(conn)
        .await
        .map_err(sql_error("queueing the deletion of the copies of an unreferenced blob"))?;
    Ok(())
}

/// Forgets every task of one kind for a blob.
pub(super) async fn forget_tasks(conn: &mut Connection, blob: &BlobKey, kind: TaskKind) -> MetaResult<()> {
    sqlx::query(FORGET_TASKS_OF_KIND.sql::<D>())
        .bind(blob.as_str())
        .bind(kind.as_str())
        .execute(conn)
        .await
        .map_err(sql_error("forgetting moot replication tasks"))?;
    Ok(())
}

/// Forgets the `delete` tasks of a blob's copies that are not `deleting` any more.
pub(super) async fn forget_moot_delete_tasks(conn: &mut Connection, blob: &BlobKey) -> MetaResult<()> {
    sqlx::query(FORGET_MOOT_DELETE_TASKS.sql::<D>())
        .bind(blob.as_str())
        .execute(conn)
        .await
        .map_err(sql_error("forgetting the delete tasks of copies no longer deleting"))?;
    Ok(())
}

/// Forgets every task for one copy.
pub(super) async fn forget_tasks_of_copy(conn: &mut Connection, copy: &CopyRef) -> MetaResult<()> {
    forget_copy_tasks(conn, &FORGET_TASKS_OF_COPY, copy, "forgetting the tasks of a deleted copy").await
}

/// Forgets the `copy` task of a copy that needs none any more.
pub(super) async fn forget_copy_task(conn: &mut Connection, copy: &CopyRef) -> MetaResult<()> {
    forget_copy_tasks(conn, &FORGET_COPY_TASK, copy, "forgetting the copy task of a stored copy").await
}

async fn forget_copy_tasks(
    conn: &mut Connection,
    statement: &'static Statement,
    copy: &CopyRef,
    context: &'static str,
) -> MetaResult<()> {
    sqlx::query(statement.sql::<D>())
        .bind(copy.blob.as_str())
        .bind(&copy.shard)
        .execute(conn)
        .await
        .map_err(sql_error(context))?;
    Ok(())
}
