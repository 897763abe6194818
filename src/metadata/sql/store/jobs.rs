//! Where resumable maintenance jobs stopped ([`JobCursors`]).

use async_trait::async_trait;

use super::D;
use crate::blob::BlobKey;
use crate::metadata::rows::{parse_blob_key, sql_error};
use crate::metadata::sql::{SqlStore, Statement};
use crate::metadata::{JobCursors, MetaResult};

static LOAD_JOB_CURSOR: Statement = Statement::new("SELECT cursor FROM maintenance_jobs WHERE name = $1");

static SAVE_JOB_CURSOR: Statement = Statement::new(
    "INSERT INTO maintenance_jobs (name, cursor, updated_at) VALUES ($1, $2, {now})
     ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
);

#[async_trait]
impl JobCursors for SqlStore<D> {
    async fn load_job_cursor(&self, job: &str) -> MetaResult<Option<BlobKey>> {
        let cursor: Option<Option<String>> = sqlx::query_scalar(LOAD_JOB_CURSOR.sql::<D>())
            .bind(job)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql_error("loading the position of a job"))?;
        cursor.flatten().map(|checksum| parse_blob_key(&checksum)).transpose()
    }

    async fn save_job_cursor(&self, job: &str, cursor: Option<&BlobKey>) -> MetaResult<()> {
        sqlx::query(SAVE_JOB_CURSOR.sql::<D>())
            .bind(job)
            .bind(cursor.map(BlobKey::as_str))
            .execute(&self.pool)
            .await
            .map_err(sql_error("saving the position of a job"))?;
        Ok(())
    }
}
