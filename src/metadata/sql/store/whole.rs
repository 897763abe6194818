//! The store as a whole ([`MetadataStore`]): its name, its migrations, whether they ran, and a
//! liveness check.

use async_trait::async_trait;

use super::D;
use crate::metadata::rows::sql_error;
use crate::metadata::sql::dialect::Dialect;
use crate::metadata::sql::{SqlStore, Statement};
use crate::metadata::{MetaResult, MetadataStore};

/// The table every version of the schema has: the database is initialised when it exists.
const SCHEMA_TABLE: &str = "images";

static TABLE_EXISTS: Statement = Statement::new("SELECT {table_exists:$1}");

#[async_trait]
impl MetadataStore for SqlStore<D> {
    fn backend_name(&self) -> &'static str {
        D::NAME
    }

    async fn migrate(&self) -> MetaResult<()> {
        D::migrate(&self.pool).await
    }

    async fn is_initialised(&self) -> MetaResult<bool> {
        sqlx::query_scalar(TABLE_EXISTS.sql::<D>())
            .bind(SCHEMA_TABLE)
            .fetch_one(&self.pool)
            .await
            .map_err(sql_error("looking for the metadata tables"))
    }

    async fn ping(&self) -> MetaResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(sql_error("pinging the metadata database"))?;
        Ok(())
    }
}
