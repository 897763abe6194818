//! Variants of images and their generation queue ([`VariantStore`]), and the steps that record,
//! queue and release variants inside other concerns' transactions (an upload's, a deletion's).
//!
//! Lock order. A transaction that touches an image's variants locks the image's row first,
//! then the blobs it references or releases, in key order ([`lock_blobs`]), then the owner's
//! row: a deletion (`images.rs`), a variant recorded over a live blob, a failure that releases
//! the variant it replaces. Before this order, recording took its blob first and deletion its
//! image first, and the two deadlocked on Postgres whenever they met on a blob two variants of
//! one image share (a small image's thumb and preview are the same bytes).
//!
//! One path keeps the other order: a variant whose bytes are new is recorded under its upload
//! guard, which locked the blob before the bytes were written (`copies.rs`). A deletion of the
//! same image needs that blob only if the image already refers to it without a stored copy;
//! in that corner Postgres breaks the cycle within its `deadlock_timeout` and the loser is
//! retried (the variant task) or answered 503 (the DELETE).

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Database, Executor};
use uuid::Uuid;

use super::D;
use super::copies::{drop_reference, lock_blobs};
use crate::blob::BlobKey;
use crate::metadata::rows::{duration_micros, from_column, parse_blob_key, sql_error, to_column};
use crate::metadata::sql::dialect::Dialect;
use crate::metadata::sql::{SqlStore, Statement};
use crate::metadata::{
    MetaResult, MetadataError, NewVariant, VariantRecord, VariantRecorded, VariantState, VariantStore, VariantTask,
};

type Db = <D as Dialect>::Db;
type Connection = <Db as Database>::Connection;

/// The name under which backfill keeps its position in `maintenance_jobs`.
const BACKFILL_JOB: &str = "variants-backfill";

macro_rules! variant_columns {
    () => {
        "image_id, name, fingerprint, state, blob_checksum, content_type, CAST(width AS BIGINT) AS width,
         CAST(height AS BIGINT) AS height, file_size, reason"
    };
}

static FIND_VARIANT: Statement =
    Statement::new(concat!("SELECT ", variant_columns!(), " FROM image_variants WHERE image_id = $1 AND name = $2"));

static VARIANTS_OF_IMAGE: Statement =
    Statement::new(concat!("SELECT ", variant_columns!(), " FROM image_variants WHERE image_id = $1 ORDER BY name"));

static LOCK_IMAGE: Statement = Statement::new("SELECT id FROM images WHERE id = $1 {for_update}");

static VARIANT_BLOB: Statement =
    Statement::new("SELECT blob_checksum FROM image_variants WHERE image_id = $1 AND name = $2");

static UPSERT_VARIANT: Statement = Statement::new(
    "INSERT INTO image_variants
         (image_id, name, fingerprint, state, blob_checksum, content_type, width, height, file_size, reason, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, {now})
     ON CONFLICT (image_id, name) DO UPDATE
     SET fingerprint = excluded.fingerprint, state = excluded.state, blob_checksum = excluded.blob_checksum,
         content_type = excluded.content_type, width = excluded.width, height = excluded.height,
         file_size = excluded.file_size, reason = excluded.reason, updated_at = excluded.updated_at",
);

static DELETE_VARIANTS_OF_IMAGE: Statement =
    Statement::new("DELETE FROM image_variants WHERE image_id = $1 RETURNING blob_checksum");

/// The same condition as the images' dedup path: referenced, with a stored copy.
static ADD_REFERENCE_TO_LIVE_BLOB: Statement = Statement::new(
    "UPDATE blobs SET ref_count = ref_count + 1
     WHERE checksum = $1 AND ref_count > 0
       AND EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = $1 AND state = 'stored')",
);

/// Queues the variants `$2` (a list of names) of image `$1`: one round trip for all of them.
/// (`WHERE true` is SQLite's: without it, `ON CONFLICT` would parse as a join's `ON`.)
static QUEUE_VARIANT_TASKS: Statement = Statement::new(
    "INSERT INTO variant_tasks (image_id, name, created_at, next_attempt_at)
     SELECT $1, names.name, {clock}, {clock} FROM {names:$2} WHERE true
     ON CONFLICT (image_id, name) DO UPDATE SET next_attempt_at = excluded.next_attempt_at
     WHERE variant_tasks.next_attempt_at > excluded.next_attempt_at",
);

/// As the replication queue's claim (`queue.rs`): `SKIP LOCKED` lets claimers pass each other.
static CLAIM_VARIANT_TASK: Statement = Statement::new(
    "UPDATE variant_tasks SET claimed_by = $1, claimed_until = {after_micros:$2}
     WHERE id = (
         SELECT id FROM variant_tasks
         WHERE next_attempt_at <= {now} AND (claimed_until IS NULL OR claimed_until < {now})
         ORDER BY next_attempt_at, id
         LIMIT 1
         {skip_locked})
     RETURNING id, image_id, name, CAST(attempts AS BIGINT) AS attempts",
);

static EXTEND_VARIANT_CLAIM: Statement =
    Statement::new("UPDATE variant_tasks SET claimed_until = {after_micros:$3} WHERE id = $1 AND claimed_by = $2");

static FINISH_VARIANT_TASK: Statement = Statement::new("DELETE FROM variant_tasks WHERE id = $1 AND claimed_by = $2");

static FAIL_VARIANT_TASK: Statement = Statement::new(
    "UPDATE variant_tasks
     SET attempts = attempts + 1, last_error = $3, next_attempt_at = {after_micros:$4},
         claimed_by = NULL, claimed_until = NULL
     WHERE id = $1 AND claimed_by = $2",
);

static RELEASE_VARIANT_CLAIMS: Statement =
    Statement::new("UPDATE variant_tasks SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = $1");

static VARIANT_QUEUE_DEPTH: Statement = Statement::new("SELECT COUNT(*) FROM variant_tasks");

static IMAGE_IDS_FIRST: Statement = Statement::new("SELECT id FROM images ORDER BY id LIMIT $1");

static IMAGE_IDS_AFTER: Statement = Statement::new("SELECT id FROM images WHERE id > $2 ORDER BY id LIMIT $1");

static COUNT_IMAGES: Statement = Statement::new("SELECT COUNT(*) FROM images");

static LOAD_CURSOR: Statement = Statement::new("SELECT cursor FROM maintenance_jobs WHERE name = $1");

static SAVE_CURSOR: Statement = Statement::new(
    "INSERT INTO maintenance_jobs (name, cursor, updated_at) VALUES ($1, $2, {now})
     ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
);

#[async_trait]
impl VariantStore for SqlStore<D> {
    async fn find_variant(&self, image: Uuid, name: &str) -> MetaResult<Option<VariantRecord>> {
        let row = sqlx::query_as::<_, VariantRow>(FIND_VARIANT.sql::<D>())
            .bind(D::id(image))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql_error("reading a variant"))?;
        row.map(VariantRow::into_record).transpose()
    }

    async fn record_variant_for_live_blob(&self, variant: &NewVariant) -> MetaResult<VariantRecorded> {
        const CONTEXT: &str = "recording a variant over a live blob";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        if !lock_image(&mut tx, variant.image).await? {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(VariantRecorded::ImageGone);
        }
        let previous = variant_blob(&mut tx, variant.image, &variant.name).await?;
        lock_blobs(&mut tx, &[&variant.blob].into_iter().chain(&previous).collect::<Vec<_>>()).await?;
        let added = sqlx::query(ADD_REFERENCE_TO_LIVE_BLOB.sql::<D>())
            .bind(variant.blob.as_str())
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?
            .rows_affected();
        if added == 0 {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(VariantRecorded::BlobNotLive);
        }
        replace_variant(&mut tx, variant, previous).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(VariantRecorded::Recorded)
    }

    async fn record_variant_failure(
        &self,
        image: Uuid,
        name: &str,
        fingerprint: &str,
        reason: &str,
    ) -> MetaResult<VariantRecorded> {
        const CONTEXT: &str = "recording a failed variant";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        if !lock_image(&mut tx, image).await? {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(VariantRecorded::ImageGone);
        }
        let previous = variant_blob(&mut tx, image, name).await?;
        record_failure(&mut tx, image, name, fingerprint, reason).await?;
        if let Some(previous) = previous {
            drop_reference(&mut tx, &previous).await?;
        }
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(VariantRecorded::Recorded)
    }

    async fn claim_variant_task(&self, worker: &str, lease: Duration) -> MetaResult<Option<VariantTask>> {
        const CONTEXT: &str = "claiming a variant task";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let row: Option<(i64, <D as Dialect>::Id, String, i64)> = sqlx::query_as(CLAIM_VARIANT_TASK.sql::<D>())
            .bind(worker)
            .bind(duration_micros(lease, CONTEXT)?)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        row.map(|(id, image, name, attempts)| {
            Ok(VariantTask { id, image: D::parse_id(image)?, name, attempts: from_column(attempts, "attempts")? })
        })
        .transpose()
    }

    async fn extend_variant_claim(&self, task: i64, worker: &str, lease: Duration) -> MetaResult<bool> {
        const CONTEXT: &str = "extending the claim on a variant task";
        let done = sqlx::query(EXTEND_VARIANT_CLAIM.sql::<D>())
            .bind(task)
            .bind(worker)
            .bind(duration_micros(lease, CONTEXT)?)
            .execute(&self.pool)
            .await
            .map_err(sql_error(CONTEXT))?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish_variant_task(&self, task: i64, worker: &str) -> MetaResult<bool> {
        let done = sqlx::query(FINISH_VARIANT_TASK.sql::<D>())
            .bind(task)
            .bind(worker)
            .execute(&self.pool)
            .await
            .map_err(sql_error("finishing a variant task"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn fail_variant_task(&self, task: i64, worker: &str, error: &str, retry_after: Duration) -> MetaResult<bool> {
        const CONTEXT: &str = "recording a failed variant task";
        let done = sqlx::query(FAIL_VARIANT_TASK.sql::<D>())
            .bind(task)
            .bind(worker)
            .bind(error)
            .bind(duration_micros(retry_after, CONTEXT)?)
            .execute(&self.pool)
            .await
            .map_err(sql_error(CONTEXT))?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_variant_claims(&self, worker: &str) -> MetaResult<u64> {
        let done = sqlx::query(RELEASE_VARIANT_CLAIMS.sql::<D>())
            .bind(worker)
            .execute(&self.pool)
            .await
            .map_err(sql_error("releasing the variant claims of a worker"))?;
        Ok(done.rows_affected())
    }

    async fn variant_queue_depth(&self) -> MetaResult<u64> {
        let count: i64 = sqlx::query_scalar(VARIANT_QUEUE_DEPTH.sql::<D>())
            .fetch_one(&self.pool)
            .await
            .map_err(sql_error("counting variant tasks"))?;
        from_column(count, "variant task count")
    }

    async fn image_ids_after(&self, after: Option<Uuid>, limit: u32) -> MetaResult<Vec<Uuid>> {
        let limit = i64::from(limit);
        let query = match after {
            None => sqlx::query_scalar::<_, <D as Dialect>::Id>(IMAGE_IDS_FIRST.sql::<D>()).bind(limit),
            Some(after) => {
                sqlx::query_scalar::<_, <D as Dialect>::Id>(IMAGE_IDS_AFTER.sql::<D>()).bind(limit).bind(D::id(after))
            }
        };
        let ids = query.fetch_all(&self.pool).await.map_err(sql_error("listing image ids"))?;
        ids.into_iter().map(D::parse_id).collect()
    }

    async fn count_images(&self) -> MetaResult<u64> {
        let count: i64 = sqlx::query_scalar(COUNT_IMAGES.sql::<D>())
            .fetch_one(&self.pool)
            .await
            .map_err(sql_error("counting images"))?;
        from_column(count, "image count")
    }

    async fn load_backfill_cursor(&self) -> MetaResult<Option<Uuid>> {
        let cursor: Option<Option<String>> = sqlx::query_scalar(LOAD_CURSOR.sql::<D>())
            .bind(BACKFILL_JOB)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql_error("loading the position of the variants backfill"))?;
        cursor
            .flatten()
            .map(|id| Uuid::parse_str(&id).map_err(|e| MetadataError::Corrupt(format!("backfill cursor {id:?}: {e}"))))
            .transpose()
    }

    async fn save_backfill_cursor(&self, cursor: Option<Uuid>) -> MetaResult<()> {
        sqlx::query(SAVE_CURSOR.sql::<D>())
            .bind(BACKFILL_JOB)
            .bind(cursor.map(|id| id.hyphenated().to_string()))
            .execute(&self.pool)
            .await
            .map_err(sql_error("saving the position of the variants backfill"))?;
        Ok(())
    }
}

/// Queues one generation task per named variant of a new image (in the upload's transaction).
pub(super) async fn queue_variant_tasks(conn: &mut Connection, image: Uuid, names: &[String]) -> MetaResult<()> {
    const CONTEXT: &str = "queueing variant tasks";
    if names.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    sqlx::query(QUEUE_VARIANT_TASKS.sql::<D>())
        .bind(D::id(image))
        .bind(D::name_list(&names, CONTEXT)?)
        .execute(&mut *conn)
        .await
        .map_err(sql_error(CONTEXT))?;
    Ok(())
}

/// The recorded variants of an image, in name order.
pub(super) async fn fetch_variants<'c>(
    executor: impl Executor<'c, Database = Db>,
    image: Uuid,
) -> MetaResult<Vec<VariantRecord>> {
    let rows = sqlx::query_as::<_, VariantRow>(VARIANTS_OF_IMAGE.sql::<D>())
        .bind(D::id(image))
        .fetch_all(executor)
        .await
        .map_err(sql_error("reading the variants of an image"))?;
    rows.into_iter().map(VariantRow::into_record).collect()
}

/// Forgets every variant of an image that is being deleted, whose row the caller has locked,
/// and returns their blobs (one entry per variant, so a blob two variants share is there
/// twice): the caller locks them and drops a reference for each. A variant being recorded
/// meanwhile waits for the image's lock, and then finds the image gone.
pub(super) async fn forget_variants(conn: &mut Connection, image: Uuid) -> MetaResult<Vec<BlobKey>> {
    let blobs: Vec<Option<String>> = sqlx::query_scalar(DELETE_VARIANTS_OF_IMAGE.sql::<D>())
        .bind(D::id(image))
        .fetch_all(&mut *conn)
        .await
        .map_err(sql_error("forgetting the variants of a deleted image"))?;
    blobs.into_iter().flatten().map(|b| parse_blob_key(&b)).collect()
}

/// Records a ready variant under its upload guard, which holds the new blob's lock and has
/// added its reference (see the module documentation for why this path locks the blob
/// first), replacing and releasing an older one. `ImageGone` if the image no longer exists
/// (the caller rolls back).
pub(super) async fn record_variant(conn: &mut Connection, variant: &NewVariant) -> MetaResult<VariantRecorded> {
    if !lock_image(conn, variant.image).await? {
        return Ok(VariantRecorded::ImageGone);
    }
    let previous = variant_blob(conn, variant.image, &variant.name).await?;
    replace_variant(conn, variant, previous).await?;
    Ok(VariantRecorded::Recorded)
}

/// Writes a ready variant's row over the `previous` one (whose blob it releases), under the
/// image's lock, with the new blob's reference already added.
async fn replace_variant(conn: &mut Connection, variant: &NewVariant, previous: Option<BlobKey>) -> MetaResult<()> {
    const CONTEXT: &str = "recording a variant";
    sqlx::query(UPSERT_VARIANT.sql::<D>())
        .bind(D::id(variant.image))
        .bind(&variant.name)
        .bind(&variant.fingerprint)
        .bind(VariantState::Ready.as_str())
        .bind(Some(variant.blob.as_str()))
        .bind(&variant.content_type)
        .bind(to_column::<_, i32>(variant.width, CONTEXT)?)
        .bind(to_column::<_, i32>(variant.height, CONTEXT)?)
        .bind(to_column::<_, i64>(variant.file_size, CONTEXT)?)
        .bind(None::<String>)
        .execute(&mut *conn)
        .await
        .map_err(sql_error(CONTEXT))?;
    // The new reference is in place first, so the same blob made again never drops to zero.
    if let Some(previous) = previous {
        drop_reference(conn, &previous).await?;
    }
    Ok(())
}

async fn lock_image(conn: &mut Connection, image: Uuid) -> MetaResult<bool> {
    let found: Option<<D as Dialect>::Id> = sqlx::query_scalar(LOCK_IMAGE.sql::<D>())
        .bind(D::id(image))
        .fetch_optional(conn)
        .await
        .map_err(sql_error("locking an image"))?;
    Ok(found.is_some())
}

async fn variant_blob(conn: &mut Connection, image: Uuid, name: &str) -> MetaResult<Option<BlobKey>> {
    let blob: Option<Option<String>> = sqlx::query_scalar(VARIANT_BLOB.sql::<D>())
        .bind(D::id(image))
        .bind(name)
        .fetch_optional(conn)
        .await
        .map_err(sql_error("reading the blob of a variant"))?;
    blob.flatten().map(|b| parse_blob_key(&b)).transpose()
}

/// Writes a failed variant's row (it has no blob).
async fn record_failure(
    conn: &mut Connection,
    image: Uuid,
    name: &str,
    fingerprint: &str,
    reason: &str,
) -> MetaResult<()> {
    sqlx::query(UPSERT_VARIANT.sql::<D>())
        .bind(D::id(image))
        .bind(name)
        .bind(fingerprint)
        .bind(VariantState::Failed.as_str())
        .bind(None::<String>)
        .bind("")
        .bind(0_i32)
        .bind(0_i32)
        .bind(0_i64)
        .bind(Some(reason))
        .execute(conn)
        .await
        .map_err(sql_error("recording a failed variant"))?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct VariantRow {
    image_id: <D as Dialect>::Id,
    name: String,
    fingerprint: String,
    state: String,
    blob_checksum: Option<String>,
    content_type: String,
    width: i64,
    height: i64,
    file_size: i64,
    reason: Option<String>,
}

impl VariantRow {
    fn into_record(self) -> MetaResult<VariantRecord> {
        Ok(VariantRecord {
            image: D::parse_id(self.image_id)?,
            name: self.name,
            fingerprint: self.fingerprint,
            state: VariantState::parse(&self.state)?,
            blob: self.blob_checksum.as_deref().map(parse_blob_key).transpose()?,
            content_type: self.content_type,
            width: from_column(self.width, "width")?,
            height: from_column(self.height, "height")?,
            file_size: from_column(self.file_size, "file_size")?,
            reason: self.reason,
        })
    }
}
