//! The store as a whole ([`MetadataStore`]): its name, its migrations, and a liveness check.

use async_trait::async_trait;

use super::D;
use crate::metadata::rows::sql_error;
use crate::metadata::sql::SqlStore;
use crate::metadata::sql::dialect::Dialect;
use crate::metadata::{MetaResult, MetadataStore};

#[async_trait]
impl MetadataStore for SqlStore<D> {
    fn backend_name(&self) -> &'static str {
        D::NAME
    }

    async fn migrate(&self) -> MetaResult<()> {
        D::migrate(&self.pool).await
    }

    async fn ping(&self) -> MetaResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(sql_error("pinging the metadata database"))?;
        Ok(())
    }
}
