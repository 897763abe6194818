//! Blobs and their copies ([`CopyStore`]), and the guards dedup and deletion take turns under.
//!
//! Every transaction that changes a blob's copies or tasks takes the blob's lock first
//! ([`lock_blob`]): on Postgres the row lock on `blobs.checksum`, on SQLite the database's
//! write lock its `BEGIN IMMEDIATE` already holds. Then copy rows, then task rows. The claim
//! and the statements that end one task touch task rows only, one statement each, so no two
//! transactions wait for each other in a cycle. (Inserting a task also takes a key-share lock
//! on its blob for the foreign key; the transaction already holds a stronger lock on that row.)

use std::collections::BTreeSet;

use async_trait::async_trait;
use sqlx::{Database, Transaction};

use super::D;
use super::images::{fetch_recorded, insert_image};
use super::queue::{
    forget_copy_task, forget_moot_delete_tasks, forget_tasks, forget_tasks_of_copy, queue_copy_if_pending,
    queue_delete_for_every_copy, queue_task,
};
use super::variants::record_variant;
use crate::blob::BlobKey;
use crate::metadata::rows::{
    BlobCopyRow, ShardUsageRow, blob_copies_from_rows, duration_micros, from_column, shard_usage_from_rows, sql_error,
    to_column,
};
use crate::metadata::sql::dialect::Dialect;
use crate::metadata::sql::{SqlStore, Statement};
use crate::metadata::{
    BlobCopies, CopyDeletionGuard, CopyRef, CopyStore, ImageRecord, MetaResult, MetadataError, MissingCopyGuard,
    NewImage, NewVariant, Replica, ReplicaCounts, ReplicaState, ShardUsage, TaskKind, UploadGuard, VariantRecorded,
};

type Db = <D as Dialect>::Db;
type Connection = <Db as Database>::Connection;

/// Creates the row of a blob not yet known, which is most uploads: the new row is locked by
/// its insertion, and a blob that had no row has no copy, no task and no deletion in doubt,
/// so the upload's commit need not look for any (three round trips fewer). Inserts nothing
/// when the row exists, or once a concurrent insertion of it has committed.
///
/// The row is created with the one reference the upload's commit adds (a round trip fewer):
/// nothing else sees the row before that commit, and a guard dropped without committing (a
/// copy gone, a refused write's cleanup) rolls it back with its reference.
static CREATE_BLOB_FOR_UPLOAD: Statement = Statement::new(
    "INSERT INTO blobs (checksum, size, ref_count, created_at) VALUES ($1, $2, 1, {now})
     ON CONFLICT (checksum) DO NOTHING",
);

/// Locks the row of a blob that exists, or creates it, in one statement. A plain
/// `SELECT … FOR UPDATE` would find no row if a deleter removed it after
/// [`CREATE_BLOB_FOR_UPLOAD`] found it; Postgres retries this upsert instead, so we always end
/// up holding the lock on a row that exists.
static LOCK_BLOB_FOR_UPLOAD: Statement = Statement::new(
    "INSERT INTO blobs (checksum, size, ref_count, created_at) VALUES ($1, $2, 0, {now})
     ON CONFLICT (checksum) DO UPDATE SET ref_count = blobs.ref_count",
);

static LOCK_BLOB: Statement = Statement::new("SELECT ref_count FROM blobs WHERE checksum = $1 {for_update}");

/// Locks the blobs `$1` (a list) in key order: Postgres sorts before it locks, so two
/// transactions that lock overlapping sets this way never hold one each of a pair.
static LOCK_BLOBS_IN_KEY_ORDER: Statement =
    Statement::new("SELECT checksum FROM blobs WHERE checksum {in:$1} ORDER BY checksum {for_update}");

static ADD_REFERENCE: Statement = Statement::new("UPDATE blobs SET ref_count = ref_count + 1 WHERE checksum = $1");

static DROP_REFERENCE: Statement =
    Statement::new("UPDATE blobs SET ref_count = ref_count - 1 WHERE checksum = $1 RETURNING ref_count");

/// Records one copy; a copy already `stored` is not downgraded to `pending`, and a copy that
/// keeps its state keeps its `updated_at`.
static RECORD_COPY: Statement = Statement::new(
    "INSERT INTO replicas (blob_checksum, shard, state, updated_at) VALUES ($1, $2, $3, {now})
     ON CONFLICT (blob_checksum, shard) DO UPDATE
     SET state = excluded.state, updated_at = excluded.updated_at
     WHERE replicas.state <> excluded.state
       AND NOT (replicas.state = 'stored' AND excluded.state = 'pending')",
);

static MARK_EVERY_COPY_DELETING: Statement =
    Statement::new("UPDATE replicas SET state = 'deleting', updated_at = {now} WHERE blob_checksum = $1");

static MARK_STORED_COPY_MISSING: Statement = Statement::new(
    "UPDATE replicas SET state = 'missing', updated_at = {now}
     WHERE blob_checksum = $1 AND shard = $2 AND state = 'stored'",
);

static COPY_IS_DELETING: Statement = Statement::new(
    "SELECT EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = $1 AND shard = $2 AND state = 'deleting')",
);

static COPY_IS_STORED: Statement = Statement::new(
    "SELECT EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = $1 AND shard = $2 AND state = 'stored')",
);

static COPY_IS_MISSING: Statement = Statement::new(
    "SELECT EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = $1 AND shard = $2 AND state = 'missing')",
);

static SHARDS_IN_DOUBT: Statement =
    Statement::new("SELECT shard FROM replicas WHERE blob_checksum = $1 AND delete_in_doubt_until > {now}");

static DELETION_IN_DOUBT: Statement = Statement::new(
    "SELECT EXISTS (SELECT 1 FROM replicas
                    WHERE blob_checksum = $1 AND shard = $2 AND delete_in_doubt_until > {now})",
);

static LEAVE_DELETION_IN_DOUBT: Statement = Statement::new(
    "UPDATE replicas SET delete_in_doubt_until = {after_micros:$3} WHERE blob_checksum = $1 AND shard = $2",
);

static FORGET_COPY: Statement = Statement::new("DELETE FROM replicas WHERE blob_checksum = $1 AND shard = $2");

/// A `deleting` copy of a referenced blob whose fence has run out: the leftover of a deletion
/// in doubt that an upload of the same bytes did not reuse.
static FORGET_SETTLED_DELETING_COPY: Statement = Statement::new(
    "DELETE FROM replicas
     WHERE blob_checksum = $1 AND shard = $2 AND state = 'deleting'
       AND (delete_in_doubt_until IS NULL OR delete_in_doubt_until <= {now})",
);

/// Records an object no row recorded as a copy being deleted, fenced for `$3` microseconds.
static RECORD_FENCED_DELETION: Statement = Statement::new(
    "INSERT INTO replicas (blob_checksum, shard, state, updated_at, delete_in_doubt_until)
     VALUES ($1, $2, 'deleting', {now}, {after_micros:$3})
     ON CONFLICT (blob_checksum, shard) DO UPDATE SET delete_in_doubt_until = excluded.delete_in_doubt_until",
);

/// A blob row the upload guard created holds the reference its commit would have added.
static UNREFERENCE_NEW_BLOB: Statement = Statement::new("UPDATE blobs SET ref_count = 0 WHERE checksum = $1");

/// A copy whose deletion is in doubt keeps its row, and with it its fence, until the fence
/// expires.
static FORGET_DELETING_COPIES: Statement = Statement::new(
    "DELETE FROM replicas
     WHERE blob_checksum = $1 AND state = 'deleting'
       AND (delete_in_doubt_until IS NULL OR delete_in_doubt_until <= {now})",
);

/// Tasks can only be left on a blob without copies by a bug, but they must not keep the blob
/// row (their foreign key) alive: they go with it.
static FORGET_TASKS_OF_BARE_BLOB: Statement = Statement::new(
    "DELETE FROM replication_tasks
     WHERE blob_checksum = $1
       AND EXISTS (SELECT 1 FROM blobs WHERE checksum = $1 AND ref_count = 0)
       AND NOT EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = $1)",
);

/// The blob goes once it has neither a reference nor a recorded copy.
static FORGET_BARE_BLOB: Statement = Statement::new(
    "DELETE FROM blobs
     WHERE checksum = $1 AND ref_count = 0
       AND NOT EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = $1)",
);

static BLOB_COPIES: Statement = Statement::new(
    "SELECT b.checksum, b.size, b.ref_count, r.shard, r.state
     FROM blobs AS b
     LEFT JOIN replicas AS r ON r.blob_checksum = b.checksum
     WHERE b.checksum = $1",
);

/// Every key sorts after the empty string, so `$1 = ''` reads the first page.
static BLOB_COPIES_PAGE: Statement = Statement::new(
    "SELECT b.checksum, b.size, b.ref_count, r.shard, r.state
     FROM (SELECT checksum, size, ref_count FROM blobs
           WHERE checksum > $1 ORDER BY checksum LIMIT $2) AS b
     LEFT JOIN replicas AS r ON r.blob_checksum = b.checksum
     ORDER BY b.checksum",
);

/// Whether a copy is recorded and every shard of `$3` (distinct, `$4` of them) holds a
/// `stored` copy of its blob.
static SURPLUS_COPY_IS_REMOVABLE: Statement = Statement::new(
    "SELECT EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = $1 AND shard = $2)
        AND (SELECT COUNT(*) FROM replicas
             WHERE blob_checksum = $1 AND state = 'stored' AND shard {in:$3}) = $4",
);

static COUNT_BY_STATE: Statement = Statement::new("SELECT state, COUNT(*) FROM replicas GROUP BY state");

/// Served by the `replicas_by_state` index (state, then age): each lookup stops at the first
/// row it finds.
static ANY_COPY_OVERDUE: Statement = Statement::new(
    "SELECT EXISTS (SELECT 1 FROM replicas WHERE state = 'missing')
         OR EXISTS (SELECT 1 FROM replicas WHERE state = 'pending' AND updated_at <= {before_micros:$1})",
);

static SHARD_USAGE: Statement = Statement::new(
    "SELECT r.shard, r.state, COUNT(*) AS copies, CAST(COALESCE(SUM(b.size), 0) AS BIGINT) AS bytes
     FROM replicas AS r
     JOIN blobs AS b ON b.checksum = r.blob_checksum
     GROUP BY r.shard, r.state",
);

/// Referenced blobs with a `stored` copy outside the known shards and none on them.
static COUNT_STRANDED_BLOBS: Statement = Statement::new(
    "SELECT COUNT(*) FROM blobs AS b
     WHERE b.ref_count > 0
       AND EXISTS (SELECT 1 FROM replicas AS r
                   WHERE r.blob_checksum = b.checksum AND r.state = 'stored' AND r.shard {not_in:$1})
       AND NOT EXISTS (SELECT 1 FROM replicas AS r
                       WHERE r.blob_checksum = b.checksum AND r.state = 'stored' AND r.shard {in:$1})",
);

#[async_trait]
impl CopyStore for SqlStore<D> {
    async fn lock_blob_for_upload(&self, blob: &BlobKey, size: u64) -> MetaResult<Box<dyn UploadGuard>> {
        const CONTEXT: &str = "locking a blob for an upload";
        let size = to_column::<_, i64>(size, CONTEXT)?;
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let created = sqlx::query(CREATE_BLOB_FOR_UPLOAD.sql::<D>())
            .bind(blob.as_str())
            .bind(size)
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?
            .rows_affected()
            == 1;
        if created {
            return Ok(Box::new(SqlUploadGuard { tx, blob: blob.clone(), in_doubt: Vec::new(), new_blob: true }));
        }
        sqlx::query(LOCK_BLOB_FOR_UPLOAD.sql::<D>())
            .bind(blob.as_str())
            .bind(size)
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        let in_doubt: Vec<String> = sqlx::query_scalar(SHARDS_IN_DOUBT.sql::<D>())
            .bind(blob.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        Ok(Box::new(SqlUploadGuard { tx, blob: blob.clone(), in_doubt, new_blob: false }))
    }

    async fn lock_copy_for_deletion(&self, copy: &CopyRef) -> MetaResult<Option<Box<dyn CopyDeletionGuard>>> {
        const CONTEXT: &str = "locking a copy for deletion";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let ref_count = lock_blob(&mut tx, &copy.blob).await?;
        let deleting = ref_count.is_some() && copy_has_state(&mut tx, copy, &COPY_IS_DELETING).await?;
        if deleting && ref_count == Some(0) {
            return Ok(Some(Box::new(SqlCopyDeletionGuard { tx, copy: copy.clone() })));
        }
        if deleting {
            // Referenced again since: an upload reused the copies it could and left this one,
            // fenced at the time. Forgotten once settled; an object a late DELETE did not
            // remove is an orphan for scrub (deleting it here could race with a rebalance
            // writing the shard's new copy, which records it only afterwards).
            let forgotten = sqlx::query(FORGET_SETTLED_DELETING_COPY.sql::<D>())
                .bind(copy.blob.as_str())
                .bind(&copy.shard)
                .execute(&mut *tx)
                .await
                .map_err(sql_error(CONTEXT))?
                .rows_affected();
            if forgotten == 1 {
                forget_tasks_of_copy(&mut tx, copy).await?;
                tx.commit().await.map_err(sql_error(CONTEXT))?;
                return Ok(None);
            }
        }
        tx.rollback().await.map_err(sql_error(CONTEXT))?;
        Ok(None)
    }

    async fn record_missing_copy(&self, copy: &CopyRef) -> MetaResult<()> {
        match self.lock_stored_copy(copy).await? {
            Some(guard) => guard.confirm_missing().await,
            None => Ok(()),
        }
    }

    async fn lock_stored_copy(&self, copy: &CopyRef) -> MetaResult<Option<Box<dyn MissingCopyGuard>>> {
        let locked = self.lock_copy_in_state(copy, &COPY_IS_STORED, "locking a suspect copy").await?;
        Ok(locked.map(|tx| Box::new(SqlMissingCopyGuard { tx, copy: copy.clone() }) as Box<dyn MissingCopyGuard>))
    }

    async fn record_stored_copy(&self, copy: &CopyRef) -> MetaResult<bool> {
        const CONTEXT: &str = "recording a stored copy";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let Some(ref_count) = lock_blob(&mut tx, &copy.blob).await? else {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(false);
        };
        let recorded = record_written_copy(&mut tx, copy, ref_count > 0).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(recorded == ReplicaState::Stored)
    }

    async fn restore_missing_copy(&self, copy: &CopyRef) -> MetaResult<bool> {
        const CONTEXT: &str = "restoring a copy marked missing";
        let Some(mut tx) = self.lock_copy_in_state(copy, &COPY_IS_MISSING, CONTEXT).await? else {
            return Ok(false);
        };
        // Missing copies belong to referenced blobs: a deletion marks every copy `deleting`.
        let recorded = record_written_copy(&mut tx, copy, true).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(recorded == ReplicaState::Stored)
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
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let removable = lock_blob(&mut tx, &copy.blob).await?.is_some()
            && sqlx::query_scalar(SURPLUS_COPY_IS_REMOVABLE.sql::<D>())
                .bind(copy.blob.as_str())
                .bind(&copy.shard)
                .bind(D::name_list(&keep, CONTEXT)?)
                .bind(to_column::<_, i64>(keep.len(), CONTEXT)?)
                .fetch_one(&mut *tx)
                .await
                .map_err(sql_error(CONTEXT))?;
        if !removable {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(None);
        }
        Ok(Some(Box::new(SqlCopyDeletionGuard { tx, copy: copy.clone() })))
    }

    async fn find_blob_copies(&self, blob: &BlobKey) -> MetaResult<Option<BlobCopies>> {
        let rows = sqlx::query_as::<_, BlobCopyRow>(BLOB_COPIES.sql::<D>())
            .bind(blob.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(sql_error("reading the copies of a blob"))?;
        Ok(blob_copies_from_rows(rows)?.into_iter().next())
    }

    async fn list_blob_copies(&self, after: Option<&BlobKey>, limit: u32) -> MetaResult<Vec<BlobCopies>> {
        let rows = sqlx::query_as::<_, BlobCopyRow>(BLOB_COPIES_PAGE.sql::<D>())
            .bind(after.map_or("", BlobKey::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(sql_error("listing blobs with their copies"))?;
        blob_copies_from_rows(rows)
    }

    async fn count_replicas_by_state(&self) -> MetaResult<ReplicaCounts> {
        let rows: Vec<(String, i64)> = sqlx::query_as(COUNT_BY_STATE.sql::<D>())
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

    async fn any_copy_overdue(&self, pending_grace: std::time::Duration) -> MetaResult<bool> {
        const CONTEXT: &str = "looking for copies below the replication factor";
        sqlx::query_scalar(ANY_COPY_OVERDUE.sql::<D>())
            .bind(duration_micros(pending_grace, CONTEXT)?)
            .fetch_one(&self.pool)
            .await
            .map_err(sql_error(CONTEXT))
    }

    async fn shard_usage(&self) -> MetaResult<Vec<ShardUsage>> {
        let rows = sqlx::query_as::<_, ShardUsageRow>(SHARD_USAGE.sql::<D>())
            .fetch_all(&self.pool)
            .await
            .map_err(sql_error("summing copies and bytes per shard"))?;
        shard_usage_from_rows(rows)
    }

    async fn deletion_in_doubt(&self, copy: &CopyRef) -> MetaResult<bool> {
        sqlx::query_scalar(DELETION_IN_DOUBT.sql::<D>())
            .bind(copy.blob.as_str())
            .bind(&copy.shard)
            .fetch_one(&self.pool)
            .await
            .map_err(sql_error("checking for a deletion in doubt"))
    }

    async fn count_stranded_blobs(&self, known_shards: &[String]) -> MetaResult<u64> {
        const CONTEXT: &str = "counting blobs stored only on unknown shards";
        let known: Vec<&str> = known_shards.iter().map(String::as_str).collect();
        let count: i64 = sqlx::query_scalar(COUNT_STRANDED_BLOBS.sql::<D>())
            .bind(D::name_list(&known, CONTEXT)?)
            .fetch_one(&self.pool)
            .await
            .map_err(sql_error(CONTEXT))?;
        from_column(count, "stranded blob count")
    }
}

/// Holds the lock `lock_blob_for_upload` took; dropping it rolls back.
struct SqlUploadGuard {
    tx: Transaction<'static, Db>,
    blob: BlobKey,
    in_doubt: Vec<String>,
    /// The lock created the blob's row: nothing was recorded of it before.
    new_blob: bool,
}

#[async_trait]
impl UploadGuard for SqlUploadGuard {
    fn shards_in_doubt(&self) -> &[String] {
        &self.in_doubt
    }

    async fn commit(self: Box<Self>, image: &NewImage, copies: &[Replica]) -> MetaResult<ImageRecord> {
        let Self { mut tx, blob, new_blob, .. } = *self;
        // A reference to another blob would leave this blob's count wrong: a caller bug.
        assert_eq!(image.blob, blob, "an upload guard commits an image of the blob it locked");
        record_copies_and_reference(&mut tx, &blob, copies, new_blob).await?;
        insert_image(&mut tx, image).await?;
        // A row this transaction created has no copies but those just recorded.
        let record = if new_blob { image.as_recorded(copies) } else { fetch_recorded(&mut tx, image.id).await? };
        tx.commit().await.map_err(sql_error("recording an upload"))?;
        Ok(record)
    }

    async fn commit_variant(self: Box<Self>, variant: &NewVariant, copies: &[Replica]) -> MetaResult<VariantRecorded> {
        let Self { mut tx, blob, new_blob, .. } = *self;
        assert_eq!(variant.blob, blob, "an upload guard commits a variant of the blob it locked");
        record_copies_and_reference(&mut tx, &blob, copies, new_blob).await?;
        let recorded = record_variant(&mut tx, variant).await?;
        if recorded == VariantRecorded::Recorded {
            tx.commit().await.map_err(sql_error("recording a variant"))?;
        } else {
            tx.rollback().await.map_err(sql_error("recording a variant"))?;
        }
        Ok(recorded)
    }

    async fn fence_unrecorded_deletion(self: Box<Self>, shard: &str, doubt: std::time::Duration) -> MetaResult<()> {
        const CONTEXT: &str = "fencing an unrecorded object whose deletion is in doubt";
        let Self { mut tx, blob, new_blob, .. } = *self;
        if new_blob {
            run(&mut tx, &UNREFERENCE_NEW_BLOB, &blob, CONTEXT).await?;
        }
        let copy = CopyRef { blob, shard: shard.to_owned() };
        fence(&mut tx, &RECORD_FENCED_DELETION, &copy, doubt, CONTEXT).await?;
        queue_task(&mut tx, &copy, TaskKind::Delete).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(())
    }
}

/// The part of an upload's commit that concerns the blob: copies, their tasks, a reference.
/// A blob whose row the upload created (`new_blob`) has no copies left by a deletion to forget,
/// and has its reference already.
async fn record_copies_and_reference(
    conn: &mut Connection,
    blob: &BlobKey,
    copies: &[Replica],
    new_blob: bool,
) -> MetaResult<()> {
    if !new_blob {
        run(conn, &FORGET_DELETING_COPIES, blob, "forgetting copies left by a deletion").await?;
    }
    for copy in copies {
        record_copy(conn, blob, copy).await?;
        if copy.state == ReplicaState::Pending {
            queue_copy_if_pending(conn, blob, &copy.shard).await?;
        }
    }
    if new_blob {
        return Ok(()); // Created with its reference (`CREATE_BLOB_FOR_UPLOAD`).
    }
    // A copy still `deleting` (fenced, and not listed) keeps its task, which forgets it once
    // the fence has run out (`lock_copy_for_deletion`).
    forget_moot_delete_tasks(conn, blob).await?;
    let added = run(conn, &ADD_REFERENCE, blob, "adding a reference to a blob").await?;
    if added != 1 {
        return Err(MetadataError::Corrupt(format!("locked blob {blob} has no row")));
    }
    Ok(())
}

/// Holds the lock `lock_stored_copy` took; dropping it rolls back.
struct SqlMissingCopyGuard {
    tx: Transaction<'static, Db>,
    copy: CopyRef,
}

#[async_trait]
impl MissingCopyGuard for SqlMissingCopyGuard {
    async fn confirm_missing(self: Box<Self>) -> MetaResult<()> {
        const CONTEXT: &str = "recording a missing copy";
        let Self { mut tx, copy } = *self;
        sqlx::query(MARK_STORED_COPY_MISSING.sql::<D>())
            .bind(copy.blob.as_str())
            .bind(&copy.shard)
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        queue_task(&mut tx, &copy, TaskKind::Copy).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(())
    }
}

/// Holds the lock `lock_copy_for_deletion` or `lock_surplus_copy` took; dropping it rolls back.
struct SqlCopyDeletionGuard {
    tx: Transaction<'static, Db>,
    copy: CopyRef,
}

#[async_trait]
impl CopyDeletionGuard for SqlCopyDeletionGuard {
    async fn commit(self: Box<Self>) -> MetaResult<()> {
        const CONTEXT: &str = "forgetting a deleted copy";
        let Self { mut tx, copy } = *self;
        sqlx::query(FORGET_COPY.sql::<D>())
            .bind(copy.blob.as_str())
            .bind(&copy.shard)
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        forget_tasks_of_copy(&mut tx, &copy).await?;
        forget_bare_blob(&mut tx, &copy.blob).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(())
    }

    async fn leave_in_doubt(self: Box<Self>, doubt: std::time::Duration) -> MetaResult<()> {
        const CONTEXT: &str = "fencing a copy whose deletion is in doubt";
        let Self { mut tx, copy } = *self;
        fence(&mut tx, &LEAVE_DELETION_IN_DOUBT, &copy, doubt, CONTEXT).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(())
    }
}

/// Takes the blob's lock, which every transaction that changes the blob's copies or tasks
/// takes first. Returns the blob's reference count, or `None` if it is not recorded.
pub(super) async fn lock_blob(conn: &mut Connection, blob: &BlobKey) -> MetaResult<Option<i64>> {
    sqlx::query_scalar(LOCK_BLOB.sql::<D>())
        .bind(blob.as_str())
        .fetch_optional(conn)
        .await
        .map_err(sql_error("locking a blob"))
}

/// Takes the locks of several blobs in one round trip, in key order: the order of every
/// transaction that locks more than one blob (`variants.rs` gives the whole order).
pub(super) async fn lock_blobs(conn: &mut Connection, blobs: &[&BlobKey]) -> MetaResult<()> {
    const CONTEXT: &str = "locking blobs";
    let keys: Vec<&str> = blobs.iter().map(|blob| blob.as_str()).collect();
    sqlx::query(LOCK_BLOBS_IN_KEY_ORDER.sql::<D>())
        .bind(D::name_list(&keys, CONTEXT)?)
        .fetch_all(conn)
        .await
        .map_err(sql_error(CONTEXT))?;
    Ok(())
}

/// Drops one reference under the blob's lock; at zero every copy becomes `deleting`, with a
/// `delete` task each. Returns whether that was the last reference.
pub(super) async fn drop_reference(conn: &mut Connection, blob: &BlobKey) -> MetaResult<bool> {
    let remaining: Option<i64> = sqlx::query_scalar(DROP_REFERENCE.sql::<D>())
        .bind(blob.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(sql_error("dropping a reference to a blob"))?;
    let remaining =
        remaining.ok_or_else(|| MetadataError::Corrupt(format!("an image refers to absent blob {blob}")))?;
    if remaining > 0 {
        return Ok(false);
    }
    run(conn, &MARK_EVERY_COPY_DELETING, blob, "marking the copies of an unreferenced blob for deletion").await?;
    // Copying is moot now; deleting is what the copies need.
    forget_tasks(conn, blob, TaskKind::Copy).await?;
    queue_delete_for_every_copy(conn, blob).await?;
    forget_bare_blob(conn, blob).await?;
    Ok(true)
}

/// Drops one reference for each of `blobs` (a blob listed twice loses two), in key order, under
/// locks the caller holds. Returns the blobs that lost their last reference.
pub(super) async fn drop_references(conn: &mut Connection, mut blobs: Vec<BlobKey>) -> MetaResult<Vec<BlobKey>> {
    blobs.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut unreferenced = Vec::new();
    for blob in blobs {
        if drop_reference(conn, &blob).await? {
            unreferenced.push(blob);
        }
    }
    Ok(unreferenced)
}

/// Records a copy a worker or an operator tool has just written and verified: `stored` while
/// the blob is referenced, otherwise `deleting` with a `delete` task, so the new object is
/// removed like the blob's other copies. Either way the copy needs no `copy` task any more.
///
/// Writers check for a deletion in doubt on the shard before they write, but a fence may have
/// been set since (a rebalance's surplus DELETE that timed out): then the copy is recorded
/// `missing`, its repair queued, since the late DELETE may yet remove it; the repair waits for
/// the fence, then verifies the bytes or writes them again. Returns the state recorded.
pub(super) async fn record_written_copy(
    conn: &mut Connection,
    copy: &CopyRef,
    referenced: bool,
) -> MetaResult<ReplicaState> {
    let state = if !referenced {
        ReplicaState::Deleting
    } else if copy_has_state(conn, copy, &DELETION_IN_DOUBT).await? {
        ReplicaState::Missing
    } else {
        ReplicaState::Stored
    };
    record_copy(conn, &copy.blob, &Replica { shard: copy.shard.clone(), state }).await?;
    forget_copy_task(conn, copy).await?;
    match state {
        ReplicaState::Deleting => queue_task(conn, copy, TaskKind::Delete).await?,
        ReplicaState::Missing => queue_task(conn, copy, TaskKind::Copy).await?,
        _ => {}
    }
    Ok(state)
}

async fn record_copy(conn: &mut Connection, blob: &BlobKey, copy: &Replica) -> MetaResult<()> {
    sqlx::query(RECORD_COPY.sql::<D>())
        .bind(blob.as_str())
        .bind(&copy.shard)
        .bind(copy.state.as_str())
        .execute(conn)
        .await
        .map_err(sql_error("recording a copy"))?;
    Ok(())
}

impl SqlStore<D> {
    /// A write transaction holding the blob's lock, if the copy is recorded in the state
    /// `statement` asks about; `None` (rolled back) if it is not, or the blob is not recorded.
    async fn lock_copy_in_state(
        &self,
        copy: &CopyRef,
        statement: &'static Statement,
        context: &'static str,
    ) -> MetaResult<Option<Transaction<'static, Db>>> {
        let mut tx = D::begin_write(&self.pool, context).await?;
        if lock_blob(&mut tx, &copy.blob).await?.is_some() && copy_has_state(&mut tx, copy, statement).await? {
            return Ok(Some(tx));
        }
        tx.rollback().await.map_err(sql_error(context))?;
        Ok(None)
    }
}

/// Whether the copy is recorded in the state `statement` asks about.
async fn copy_has_state(conn: &mut Connection, copy: &CopyRef, statement: &'static Statement) -> MetaResult<bool> {
    sqlx::query_scalar(statement.sql::<D>())
        .bind(copy.blob.as_str())
        .bind(&copy.shard)
        .fetch_one(conn)
        .await
        .map_err(sql_error("checking the state of a copy"))
}

async fn forget_bare_blob(conn: &mut Connection, blob: &BlobKey) -> MetaResult<()> {
    run(conn, &FORGET_TASKS_OF_BARE_BLOB, blob, "forgetting the tasks of a blob without copies").await?;
    run(conn, &FORGET_BARE_BLOB, blob, "forgetting a blob without copies").await?;
    Ok(())
}

/// Runs a statement that fences a copy (`$1` its blob, `$2` its shard) for `doubt` (`$3`).
async fn fence(
    conn: &mut Connection,
    statement: &'static Statement,
    copy: &CopyRef,
    doubt: std::time::Duration,
    context: &'static str,
) -> MetaResult<()> {
    sqlx::query(statement.sql::<D>())
        .bind(copy.blob.as_str())
        .bind(&copy.shard)
        .bind(duration_micros(doubt, context)?)
        .execute(conn)
        .await
        .map_err(sql_error(context))?;
    Ok(())
}

/// Runs a statement whose one parameter is a blob key; returns the rows it changed.
async fn run(
    conn: &mut Connection,
    statement: &'static Statement,
    blob: &BlobKey,
    context: &'static str,
) -> MetaResult<u64> {
    let done = sqlx::query(statement.sql::<D>()).bind(blob.as_str()).execute(conn).await.map_err(sql_error(context))?;
    Ok(done.rows_affected())
}
