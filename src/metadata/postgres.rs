//! The Postgres metadata store: production, and several instances sharing one database.
//!
//! Dedup and deletion decide under a row lock on the blob (invariant 7): the upload lock, the
//! copy-deletion lock, the dedup increment and the image deletion all lock `blobs.checksum`
//! before they read what they decide on, so they take turns on the same blob.

use std::fmt::Display;
use std::num::TryFromIntError;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgExecutor, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{
    CopyDeletionGuard, CopyRef, DeletedImage, ImageRecord, ListPosition, MetaResult, MetadataError, MetadataStore,
    NewImage, Replica, ReplicaCounts, ReplicaState, UploadGuard,
};
use crate::blob::BlobKey;

/// Connections one instance opens at most; a guard holds one for the whole of an upload.
const MAX_CONNECTIONS: u32 = 10;

/// How long a query waits for a connection. A dead database makes every query wait this long
/// and then fail as unavailable, so it stays short enough for a client to get a quick 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// One image joined with one copy of its blob (none when the blob has no copy).
const FIND_IMAGE: &str = "
    SELECT i.id, i.filename, i.content_type, i.file_size, i.width, i.height,
           i.blob_checksum, i.created_at, r.shard, r.state
    FROM images AS i
    LEFT JOIN replicas AS r ON r.blob_checksum = i.blob_checksum
    WHERE i.id = $1";

const LIST_FIRST_PAGE: &str = "
    SELECT i.id, i.filename, i.content_type, i.file_size, i.width, i.height,
           i.blob_checksum, i.created_at, r.shard, r.state
    FROM (SELECT * FROM images ORDER BY created_at DESC, id DESC LIMIT $1) AS i
    LEFT JOIN replicas AS r ON r.blob_checksum = i.blob_checksum
    ORDER BY i.created_at DESC, i.id DESC";

const LIST_PAGE_AFTER: &str = "
    SELECT i.id, i.filename, i.content_type, i.file_size, i.width, i.height,
           i.blob_checksum, i.created_at, r.shard, r.state
    FROM (SELECT * FROM images
          WHERE (created_at, id) < ($2, $3)
          ORDER BY created_at DESC, id DESC LIMIT $1) AS i
    LEFT JOIN replicas AS r ON r.blob_checksum = i.blob_checksum
    ORDER BY i.created_at DESC, i.id DESC";

const INSERT_IMAGE: &str = "
    INSERT INTO images
        (id, filename, content_type, file_size, width, height, blob_checksum, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Adds a reference only to a live blob. Taking the row lock means a concurrent deletion of
/// the last reference either commits first (and this sees zero) or waits for this.
const ADD_REFERENCE_TO_LIVE_BLOB: &str = "
    UPDATE blobs SET ref_count = ref_count + 1
    WHERE checksum = $1 AND ref_count > 0
      AND EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = $1 AND state = 'stored')";

/// Creates the blob or locks the existing row in one statement. A plain `DO NOTHING` followed
/// by `SELECT ... FOR UPDATE` would find no row if a deleter removed it in between; Postgres
/// retries this upsert instead, so we always end up holding the lock on a row that exists.
const LOCK_BLOB_FOR_UPLOAD: &str = "
    INSERT INTO blobs (checksum, size, ref_count) VALUES ($1, $2, 0)
    ON CONFLICT (checksum) DO UPDATE SET ref_count = blobs.ref_count";

/// Records one copy; a copy already `stored` is not downgraded to `pending`, and a copy that
/// keeps its state keeps its `updated_at`.
const RECORD_COPY: &str = "
    INSERT INTO replicas (blob_checksum, shard, state, updated_at) VALUES ($1, $2, $3, now())
    ON CONFLICT (blob_checksum, shard) DO UPDATE
    SET state = excluded.state, updated_at = excluded.updated_at
    WHERE replicas.state <> excluded.state
      AND NOT (replicas.state = 'stored' AND excluded.state = 'pending')";

/// The blob goes once it has neither a reference nor a recorded copy.
const FORGET_BARE_BLOB: &str = "
    DELETE FROM blobs
    WHERE checksum = $1 AND ref_count = 0
      AND NOT EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = $1)";

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Opens a pool and one connection, so a wrong URL or a dead server shows at start-up.
    pub async fn connect(url: &str) -> MetaResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await
            .map_err(sql_error("connecting to Postgres"))?;
        Ok(Self { pool })
    }

    async fn begin(&self, context: &'static str) -> MetaResult<Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(sql_error(context))
    }
}

#[async_trait]
impl MetadataStore for PostgresStore {
    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> MetaResult<()> {
        sqlx::migrate!("migrations/postgres").run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> MetaResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(sql_error("pinging Postgres"))?;
        Ok(())
    }

    async fn insert_image_for_live_blob(&self, image: &NewImage) -> MetaResult<Option<ImageRecord>> {
        const CONTEXT: &str = "adding a reference to a live blob";
        let mut tx = self.begin(CONTEXT).await?;
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
        let mut tx = self.begin(CONTEXT).await?;
        sqlx::query(LOCK_BLOB_FOR_UPLOAD)
            .bind(blob.as_str())
            .bind(to_column::<_, i64>(size, CONTEXT)?)
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        Ok(Box::new(PgUploadGuard { tx, blob: blob.clone() }))
    }

    async fn find_image(&self, id: Uuid) -> MetaResult<Option<ImageRecord>> {
        fetch_image(&self.pool, id).await
    }

    async fn list_images(&self, limit: u32, after: Option<&ListPosition>) -> MetaResult<Vec<ImageRecord>> {
        const CONTEXT: &str = "listing images";
        let limit = i64::from(limit);
        let query = match after {
            None => sqlx::query_as::<_, ImageRow>(LIST_FIRST_PAGE).bind(limit),
            Some(position) => {
                sqlx::query_as::<_, ImageRow>(LIST_PAGE_AFTER).bind(limit).bind(position.created_at).bind(position.id)
            }
        };
        let rows = query.fetch_all(&self.pool).await.map_err(sql_error(CONTEXT))?;
        records_from_rows(rows)
    }

    async fn delete_image(&self, id: Uuid) -> MetaResult<Option<DeletedImage>> {
        const CONTEXT: &str = "deleting an image";
        let mut tx = self.begin(CONTEXT).await?;
        let checksum: Option<String> = sqlx::query_scalar("DELETE FROM images WHERE id = $1 RETURNING blob_checksum")
            .bind(id)
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
             ORDER BY updated_at, blob_checksum, shard LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(sql_error(CONTEXT))?;
        rows.into_iter().map(|(checksum, shard)| Ok(CopyRef { blob: parse_blob_key(&checksum)?, shard })).collect()
    }

    async fn lock_copy_for_deletion(&self, copy: &CopyRef) -> MetaResult<Option<Box<dyn CopyDeletionGuard>>> {
        const CONTEXT: &str = "locking a copy for deletion";
        let mut tx = self.begin(CONTEXT).await?;
        let ref_count: Option<i64> = sqlx::query_scalar("SELECT ref_count FROM blobs WHERE checksum = $1 FOR UPDATE")
            .bind(copy.blob.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        let deleting = ref_count == Some(0) && copy_is_deleting(&mut tx, copy).await?;
        if !deleting {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(None);
        }
        Ok(Some(Box::new(PgCopyDeletionGuard { tx, copy: copy.clone() })))
    }

    async fn set_replica_state(&self, copy: &CopyRef, state: ReplicaState) -> MetaResult<()> {
        sqlx::query(
            "UPDATE replicas SET state = $3, updated_at = now()
             WHERE blob_checksum = $1 AND shard = $2 AND state <> $3",
        )
        .bind(copy.blob.as_str())
        .bind(&copy.shard)
        .bind(state.as_str())
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
}

/// Holds the lock `LOCK_BLOB_FOR_UPLOAD` took; dropping it rolls back.
struct PgUploadGuard {
    tx: Transaction<'static, Postgres>,
    blob: BlobKey,
}

#[async_trait]
impl UploadGuard for PgUploadGuard {
    async fn commit(self: Box<Self>, image: &NewImage, copies: &[Replica]) -> MetaResult<ImageRecord> {
        const CONTEXT: &str = "recording an upload";
        let Self { mut tx, blob } = *self;
        // A reference to another blob would leave this blob's count wrong: a caller bug.
        assert_eq!(image.blob, blob, "an upload guard commits an image of the blob it locked");
        forget_deleting_copies(&mut tx, &blob).await?;
        for copy in copies {
            record_copy(&mut tx, &blob, copy).await?;
        }
        add_reference(&mut tx, &blob).await?;
        insert_image(&mut tx, image).await?;
        let record = fetch_recorded(&mut tx, image.id).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(record)
    }
}

/// Holds the lock `lock_copy_for_deletion` took; dropping it rolls back.
struct PgCopyDeletionGuard {
    tx: Transaction<'static, Postgres>,
    copy: CopyRef,
}

#[async_trait]
impl CopyDeletionGuard for PgCopyDeletionGuard {
    async fn commit(self: Box<Self>) -> MetaResult<()> {
        const CONTEXT: &str = "forgetting a deleted copy";
        let Self { mut tx, copy } = *self;
        sqlx::query("DELETE FROM replicas WHERE blob_checksum = $1 AND shard = $2")
            .bind(copy.blob.as_str())
            .bind(&copy.shard)
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        forget_bare_blob(&mut tx, &copy.blob).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(())
    }
}

async fn copy_is_deleting(conn: &mut PgConnection, copy: &CopyRef) -> MetaResult<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM replicas
                        WHERE blob_checksum = $1 AND shard = $2 AND state = 'deleting')",
    )
    .bind(copy.blob.as_str())
    .bind(&copy.shard)
    .fetch_one(conn)
    .await
    .map_err(sql_error("checking that a copy awaits deletion"))
}

/// Drops one reference under the blob's row lock; at zero every copy becomes `deleting`.
/// Returns whether that was the last reference.
async fn drop_reference(conn: &mut PgConnection, blob: &BlobKey) -> MetaResult<bool> {
    const CONTEXT: &str = "dropping a reference to a blob";
    let remaining: Option<i64> =
        sqlx::query_scalar("UPDATE blobs SET ref_count = ref_count - 1 WHERE checksum = $1 RETURNING ref_count")
            .bind(blob.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(sql_error(CONTEXT))?;
    let remaining =
        remaining.ok_or_else(|| MetadataError::Corrupt(format!("an image refers to absent blob {blob}")))?;
    if remaining > 0 {
        return Ok(false);
    }
    sqlx::query("UPDATE replicas SET state = 'deleting', updated_at = now() WHERE blob_checksum = $1")
        .bind(blob.as_str())
        .execute(&mut *conn)
        .await
        .map_err(sql_error("marking the copies of an unreferenced blob for deletion"))?;
    forget_bare_blob(conn, blob).await?;
    Ok(true)
}

async fn forget_bare_blob(conn: &mut PgConnection, blob: &BlobKey) -> MetaResult<()> {
    sqlx::query(FORGET_BARE_BLOB)
        .bind(blob.as_str())
        .execute(conn)
        .await
        .map_err(sql_error("forgetting a blob without copies"))?;
    Ok(())
}

/// Forgets copies an earlier deletion left behind; an upload that needs them lists them again.
async fn forget_deleting_copies(conn: &mut PgConnection, blob: &BlobKey) -> MetaResult<()> {
    sqlx::query("DELETE FROM replicas WHERE blob_checksum = $1 AND state = 'deleting'")
        .bind(blob.as_str())
        .execute(conn)
        .await
        .map_err(sql_error("forgetting copies left by a deletion"))?;
    Ok(())
}

async fn record_copy(conn: &mut PgConnection, blob: &BlobKey, copy: &Replica) -> MetaResult<()> {
    sqlx::query(RECORD_COPY)
        .bind(blob.as_str())
        .bind(&copy.shard)
        .bind(copy.state.as_str())
        .execute(conn)
        .await
        .map_err(sql_error("recording a copy"))?;
    Ok(())
}

async fn add_reference(conn: &mut PgConnection, blob: &BlobKey) -> MetaResult<()> {
    let updated = sqlx::query("UPDATE blobs SET ref_count = ref_count + 1 WHERE checksum = $1")
        .bind(blob.as_str())
        .execute(conn)
        .await
        .map_err(sql_error("adding a reference to a blob"))?
        .rows_affected();
    if updated == 1 { Ok(()) } else { Err(MetadataError::Corrupt(format!("locked blob {blob} has no row"))) }
}

async fn insert_image(conn: &mut PgConnection, image: &NewImage) -> MetaResult<()> {
    const CONTEXT: &str = "recording an image";
    sqlx::query(INSERT_IMAGE)
        .bind(image.id)
        .bind(&image.filename)
        .bind(&image.content_type)
        .bind(to_column::<_, i64>(image.file_size, CONTEXT)?)
        .bind(to_column::<_, i32>(image.width, CONTEXT)?)
        .bind(to_column::<_, i32>(image.height, CONTEXT)?)
        .bind(image.blob.as_str())
        .bind(image.created_at)
        .execute(conn)
        .await
        .map_err(sql_error(CONTEXT))?;
    Ok(())
}

async fn fetch_image(executor: impl PgExecutor<'_>, id: Uuid) -> MetaResult<Option<ImageRecord>> {
    let rows = sqlx::query_as::<_, ImageRow>(FIND_IMAGE)
        .bind(id)
        .fetch_all(executor)
        .await
        .map_err(sql_error("reading an image"))?;
    Ok(records_from_rows(rows)?.into_iter().next())
}

/// Reads back an image this transaction has just recorded.
async fn fetch_recorded(conn: &mut PgConnection, id: Uuid) -> MetaResult<ImageRecord> {
    fetch_image(conn, id)
        .await?
        .ok_or_else(|| MetadataError::Corrupt(format!("image {id} is missing right after being recorded")))
}

/// One image joined with one copy of its blob, as `FIND_IMAGE` and the list queries return it.
#[derive(sqlx::FromRow)]
struct ImageRow {
    id: Uuid,
    filename: String,
    content_type: String,
    file_size: i64,
    width: i32,
    height: i32,
    blob_checksum: String,
    created_at: DateTime<Utc>,
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

    fn into_record(self) -> MetaResult<ImageRecord> {
        Ok(ImageRecord {
            id: self.id,
            filename: self.filename,
            content_type: self.content_type,
            file_size: from_column(self.file_size, "file_size")?,
            width: from_column(self.width, "width")?,
            height: from_column(self.height, "height")?,
            blob: parse_blob_key(&self.blob_checksum)?,
            created_at: self.created_at,
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
        if records.last().is_none_or(|last| last.id != row.id) {
            records.push(row.into_record()?);
        }
        if let Some(record) = records.last_mut() {
            record.replicas.extend(replica);
        }
    }
    // Sorted here, not in SQL: a Postgres collation may order text differently from bytes.
    for record in &mut records {
        record.replicas.sort_by(|a, b| a.shard.cmp(&b.shard));
    }
    Ok(records)
}

fn parse_blob_key(checksum: &str) -> MetaResult<BlobKey> {
    BlobKey::parse(checksum).map_err(|e| MetadataError::Corrupt(e.to_string()))
}

/// Converts a value for a signed column; one past the column's range is refused as a query error.
fn to_column<S, T>(value: S, context: &'static str) -> MetaResult<T>
where
    T: TryFrom<S, Error = TryFromIntError>,
{
    T::try_from(value).map_err(|e| MetadataError::from_sqlx(context, sqlx::Error::Encode(Box::new(e))))
}

/// Converts a column back; a value out of range means the row is malformed.
fn from_column<S, T>(value: S, column: &str) -> MetaResult<T>
where
    S: Copy + Display,
    T: TryFrom<S>,
{
    T::try_from(value).map_err(|_| MetadataError::Corrupt(format!("{column} {value} is out of range")))
}

/// Sorts a driver error, saying what was being done.
fn sql_error(context: &'static str) -> impl FnOnce(sqlx::Error) -> MetadataError {
    move |source| MetadataError::from_sqlx(context, source)
}
