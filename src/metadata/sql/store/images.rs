//! Images ([`ImageStore`]): recording, reading, listing and deleting the rows clients see.

use async_trait::async_trait;
use sqlx::{Database, Executor};
use uuid::Uuid;

use super::D;
use super::copies::{drop_reference, drop_references, lock_blobs};
use super::variants::{fetch_variants, forget_variants, queue_variant_tasks};
use crate::blob::BlobKey;
use crate::metadata::rows::{from_column, parse_blob_key, sql_error, to_column};
use crate::metadata::sql::dialect::Dialect;
use crate::metadata::sql::{SqlStore, Statement};
use crate::metadata::{
    DeletedImage, ImageOwner, ImageRecord, ImageStore, ListPosition, MetaResult, MetadataError, NewImage, Replica,
    ReplicaState, Visibility,
};

type Db = <D as Dialect>::Db;
type Connection = <Db as Database>::Connection;

/// The columns of an image joined with one copy of its blob. Integers are read as BIGINT:
/// SQLite would silently truncate a wider value read as a 32-bit one.
macro_rules! image_columns {
    () => {
        "i.id, i.filename, i.content_type, i.file_size, CAST(i.width AS BIGINT) AS width,
         CAST(i.height AS BIGINT) AS height, i.blob_checksum, i.created_at, i.owner_id, i.visibility,
         r.shard, r.state"
    };
}

/// One image joined with each copy of its blob (none when the blob has no copy).
static FIND_IMAGE: Statement = Statement::new(concat!(
    "SELECT ",
    image_columns!(),
    " FROM images AS i
      LEFT JOIN replicas AS r ON r.blob_checksum = i.blob_checksum
      WHERE i.id = $1"
));

/// A page of the list, newest first: the images `$filter` selects (with `$1` the page size),
/// each joined with the copies of its blob.
macro_rules! list_page {
    ($filter:literal) => {
        concat!(
            "SELECT ",
            image_columns!(),
            " FROM (SELECT * FROM images ",
            $filter,
            " ORDER BY created_at DESC, id DESC LIMIT $1) AS i
              LEFT JOIN replicas AS r ON r.blob_checksum = i.blob_checksum
              ORDER BY i.created_at DESC, i.id DESC"
        )
    };
}

// Four statements rather than one with optional conditions: each uses its index
// (`images_newest_first`, `images_by_owner`) whatever plan the database caches.
static LIST_FIRST_PAGE: Statement = Statement::new(list_page!(""));
static LIST_PAGE_AFTER: Statement = Statement::new(list_page!("WHERE (created_at, id) < ($2, $3)"));
static LIST_OWNER_FIRST_PAGE: Statement = Statement::new(list_page!("WHERE owner_id = $2"));
static LIST_OWNER_PAGE_AFTER: Statement =
    Statement::new(list_page!("WHERE owner_id = $4 AND (created_at, id) < ($2, $3)"));

static INSERT_IMAGE: Statement = Statement::new(
    "INSERT INTO images (id, filename, content_type, file_size, width, height, blob_checksum, created_at, owner_id,
                         visibility)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
);

/// Adds an image to its owner's usage if that keeps them within their quota (their own, else
/// the default `$3`/`$4`; admins have none). The row lock this takes orders concurrent uploads
/// of one owner, so each sees the usage the previous one left.
static CHARGE_OWNER: Statement = Statement::new(
    "UPDATE users SET used_bytes = used_bytes + $2, used_images = used_images + 1
     WHERE id = $1 AND (role = 'admin'
        OR (used_bytes + $2 <= COALESCE(quota_bytes, $3) AND used_images + 1 <= COALESCE(quota_images, $4)))",
);

static REFUND_OWNER: Statement =
    Statement::new("UPDATE users SET used_bytes = used_bytes - $2, used_images = used_images - 1 WHERE id = $1");

static SET_VISIBILITY: Statement = Statement::new("UPDATE images SET visibility = $2 WHERE id = $1");

/// Adds a reference only to a live blob. On Postgres the row lock this takes means a
/// concurrent deletion of the last reference either commits first (and this sees zero) or
/// waits for this.
static ADD_REFERENCE_TO_LIVE_BLOB: Statement = Statement::new(
    "UPDATE blobs SET ref_count = ref_count + 1
     WHERE checksum = $1 AND ref_count > 0
       AND EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = $1 AND state = 'stored')",
);

/// Locks an image that is about to be deleted, and names its blob.
static LOCK_IMAGE_BLOB: Statement = Statement::new("SELECT blob_checksum FROM images WHERE id = $1 {for_update}");

static DELETE_IMAGE: Statement = Statement::new("DELETE FROM images WHERE id = $1 RETURNING owner_id, file_size");

/// Whether [`ADD_REFERENCE_TO_LIVE_BLOB`] would find the blob, read without a transaction.
/// Most uploads are new bytes: on a miss this one round trip spares a BEGIN, the UPDATE and a
/// ROLLBACK (and on SQLite, taking the write lock). The answer may be stale either way, which
/// is safe: a hit is confirmed by the UPDATE, and a miss sends the upload down the path that
/// stores its bytes and records them under the blob's lock, as when the blob turns live just
/// after the UPDATE found nothing.
static BLOB_IS_LIVE: Statement = Statement::new(
    "SELECT EXISTS (SELECT 1 FROM blobs WHERE checksum = $1 AND ref_count > 0
       AND EXISTS (SELECT 1 FROM replicas WHERE blob_checksum = $1 AND state = 'stored'))",
);

#[async_trait]
impl ImageStore for SqlStore<D> {
    async fn insert_image_for_live_blob(&self, image: &NewImage) -> MetaResult<Option<ImageRecord>> {
        const CONTEXT: &str = "adding a reference to a live blob";
        if !self.blob_is_live(&image.blob).await? {
            return Ok(None);
        }
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let added = sqlx::query(ADD_REFERENCE_TO_LIVE_BLOB.sql::<D>())
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

    async fn blob_is_live(&self, blob: &BlobKey) -> MetaResult<bool> {
        sqlx::query_scalar(BLOB_IS_LIVE.sql::<D>())
            .bind(blob.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(sql_error("checking whether a blob is live"))
    }

    async fn find_image(&self, id: Uuid) -> MetaResult<Option<ImageRecord>> {
        // Two queries on two pooled connections at once: a download waits for one round trip.
        let (record, variants) = tokio::try_join!(fetch_image(&self.pool, id), fetch_variants(&self.pool, id))?;
        Ok(record.map(|record| ImageRecord { variants, ..record }))
    }

    async fn list_images(
        &self,
        limit: u32,
        after: Option<&ListPosition>,
        owner: Option<Uuid>,
    ) -> MetaResult<Vec<ImageRecord>> {
        let limit = i64::from(limit);
        let page = |statement: &'static Statement| sqlx::query_as::<_, ImageRow>(statement.sql::<D>()).bind(limit);
        let query = match (after, owner) {
            (None, None) => page(&LIST_FIRST_PAGE),
            (None, Some(owner)) => page(&LIST_OWNER_FIRST_PAGE).bind(D::id(owner)),
            (Some(position), None) => {
                page(&LIST_PAGE_AFTER).bind(D::time(position.created_at)).bind(D::id(position.id))
            }
            (Some(position), Some(owner)) => page(&LIST_OWNER_PAGE_AFTER)
                .bind(D::time(position.created_at))
                .bind(D::id(position.id))
                .bind(D::id(owner)),
        };
        let rows = query.fetch_all(&self.pool).await.map_err(sql_error("listing images"))?;
        let mut records = records_from_rows(rows)?;
        // One indexed lookup per image of the page (at most 100).
        for record in &mut records {
            record.variants = fetch_variants(&self.pool, record.id).await?;
        }
        Ok(records)
    }

    async fn set_visibility(&self, id: Uuid, visibility: Visibility) -> MetaResult<Option<ImageRecord>> {
        const CONTEXT: &str = "changing an image's visibility";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let changed = sqlx::query(SET_VISIBILITY.sql::<D>())
            .bind(D::id(id))
            .bind(visibility.as_str())
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?
            .rows_affected();
        if changed == 0 {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(None);
        }
        let record = fetch_recorded(&mut tx, id).await?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(Some(record))
    }

    /// Takes its locks in the order `variants.rs` gives: the image, then every blob it releases
    /// in key order, then its owner. (Refunding the owner before dropping the image's blob
    /// deadlocked with an upload of the same bytes by the same owner, which takes the blob,
    /// then the owner.)
    async fn delete_image(&self, id: Uuid) -> MetaResult<Option<DeletedImage>> {
        const CONTEXT: &str = "deleting an image";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let Some(blob) = lock_image_for_deletion(&mut tx, id).await? else {
            tx.rollback().await.map_err(sql_error(CONTEXT))?;
            return Ok(None);
        };
        // Variant rows first: they refer to the image row.
        let variant_blobs = forget_variants(&mut tx, id).await?;
        lock_blobs(&mut tx, &variant_blobs.iter().chain([&blob]).collect::<Vec<_>>()).await?;
        let unreferenced_variant_blobs = drop_references(&mut tx, variant_blobs).await?;
        // The image row goes before its blob's reference: an unreferenced blob without copies
        // loses its row, which the image's refers to.
        let (owner, file_size): (Option<<D as Dialect>::Id>, i64) = sqlx::query_as(DELETE_IMAGE.sql::<D>())
            .bind(D::id(id))
            .fetch_one(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        let blob_unreferenced = drop_reference(&mut tx, &blob).await?;
        if let Some(owner) = owner {
            sqlx::query(REFUND_OWNER.sql::<D>())
                .bind(owner)
                .bind(file_size)
                .execute(&mut *tx)
                .await
                .map_err(sql_error(CONTEXT))?;
        }
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(Some(DeletedImage { blob, blob_unreferenced, unreferenced_variant_blobs }))
    }
}

/// Locks an image's row for its deletion and names its blob; `None` if there is no such image.
async fn lock_image_for_deletion(conn: &mut Connection, id: Uuid) -> MetaResult<Option<BlobKey>> {
    let blob: Option<String> = sqlx::query_scalar(LOCK_IMAGE_BLOB.sql::<D>())
        .bind(D::id(id))
        .fetch_optional(conn)
        .await
        .map_err(sql_error("locking an image for its deletion"))?;
    blob.map(|blob| parse_blob_key(&blob)).transpose()
}

/// Records an image row, charges it to its owner (failing with `QuotaExceeded` when it does
/// not fit) and queues its variants' generation; its blob's reference is the caller's to add.
pub(super) async fn insert_image(conn: &mut Connection, image: &NewImage) -> MetaResult<()> {
    const CONTEXT: &str = "recording an image";
    if let Some(owner) = &image.owner {
        charge_owner(conn, owner, image.file_size).await?;
    }
    sqlx::query(INSERT_IMAGE.sql::<D>())
        .bind(D::id(image.id))
        .bind(&image.filename)
        .bind(&image.content_type)
        .bind(to_column::<_, i64>(image.file_size, CONTEXT)?)
        // Checked against Postgres's INTEGER on both, so both accept the same images.
        .bind(to_column::<_, i32>(image.width, CONTEXT)?)
        .bind(to_column::<_, i32>(image.height, CONTEXT)?)
        .bind(image.blob.as_str())
        .bind(D::time(image.created_at))
        .bind(image.owner.map(|owner| D::id(owner.user)))
        .bind(image.visibility.as_str())
        .execute(&mut *conn)
        .await
        .map_err(sql_error(CONTEXT))?;
    queue_variant_tasks(conn, image.id, &image.variants).await
}

async fn charge_owner(conn: &mut Connection, owner: &ImageOwner, file_size: u64) -> MetaResult<()> {
    const CONTEXT: &str = "charging an image to its owner's quota";
    // An unlimited default is the largest limit a column holds.
    let limit = |limit: Option<u64>| limit.map_or(i64::MAX, |limit| i64::try_from(limit).unwrap_or(i64::MAX));
    let charged = sqlx::query(CHARGE_OWNER.sql::<D>())
        .bind(D::id(owner.user))
        .bind(to_column::<_, i64>(file_size, CONTEXT)?)
        .bind(limit(owner.default_quota.bytes))
        .bind(limit(owner.default_quota.images))
        .execute(conn)
        .await
        .map_err(sql_error(CONTEXT))?
        .rows_affected();
    if charged == 0 {
        return Err(MetadataError::QuotaExceeded);
    }
    Ok(())
}

async fn fetch_image<'c>(executor: impl Executor<'c, Database = Db>, id: Uuid) -> MetaResult<Option<ImageRecord>> {
    let rows = sqlx::query_as::<_, ImageRow>(FIND_IMAGE.sql::<D>())
        .bind(D::id(id))
        .fetch_all(executor)
        .await
        .map_err(sql_error("reading an image"))?;
    Ok(records_from_rows(rows)?.into_iter().next())
}

/// Reads back an image this transaction has just recorded.
pub(super) async fn fetch_recorded(conn: &mut Connection, id: Uuid) -> MetaResult<ImageRecord> {
    fetch_image(conn, id)
        .await?
        .ok_or_else(|| MetadataError::Corrupt(format!("image {id} is missing right after being recorded")))
}

/// One image joined with one copy of its blob, as `FIND_IMAGE` and the list queries return it.
#[derive(sqlx::FromRow)]
struct ImageRow {
    id: <D as Dialect>::Id,
    filename: String,
    content_type: String,
    file_size: i64,
    width: i64,
    height: i64,
    blob_checksum: String,
    created_at: <D as Dialect>::Time,
    owner_id: Option<<D as Dialect>::Id>,
    visibility: String,
    shard: Option<String>,
    state: Option<String>,
}

/// Folds image-and-copy rows into records. The queries order rows by image, so the rows of
/// one image are adjacent.
fn records_from_rows(rows: Vec<ImageRow>) -> MetaResult<Vec<ImageRecord>> {
    let mut records: Vec<ImageRecord> = Vec::new();
    for row in rows {
        let replica = match (row.shard, row.state) {
            (Some(shard), Some(state)) => Some(Replica { shard, state: ReplicaState::parse(&state)? }),
            _ => None,
        };
        let id = D::parse_id(row.id)?;
        if records.last().is_none_or(|last| last.id != id) {
            records.push(ImageRecord {
                id,
                filename: row.filename,
                content_type: row.content_type,
                file_size: from_column(row.file_size, "file_size")?,
                width: from_column(row.width, "width")?,
                height: from_column(row.height, "height")?,
                blob: parse_blob_key(&row.blob_checksum)?,
                created_at: D::parse_time(row.created_at)?,
                replicas: Vec::new(),
                owner: row.owner_id.map(D::parse_id).transpose()?,
                visibility: Visibility::parse(&row.visibility)
                    .ok_or_else(|| MetadataError::Corrupt(format!("unknown visibility {:?}", row.visibility)))?,
                variants: Vec::new(),
            });
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
