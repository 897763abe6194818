//! The store as a whole ([`MetadataStore`]): its name, its migrations, whether they ran, and a
//! liveness check.

use async_trait::async_trait;

use super::D;
use crate::metadata::rows::sql_error;
use crate::metadata::sql::dialect::Dialect;
use crate::metadata::sql::{SqlStore, Statement};
use crate::metadata::{MetaResult, MetadataStore};

/// Creates the id unless it exists; concurrent first starts agree on the first one written.
static CREATE_STORE_ID: Statement = Statement::new(
    "INSERT INTO store_identity (singleton, id, created_at) VALUES (1, $1, {now})
     ON CONFLICT (singleton) DO NOTHING",
);

static STORE_ID: Statement = Statement::new("SELECT id FROM store_identity WHERE singleton = 1");

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

    async fn store_id(&self) -> MetaResult<String> {
        const CONTEXT: &str = "reading the store's id";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        sqlx::query(CREATE_STORE_ID.sql::<D>())
            .bind(uuid::Uuid::new_v4().hyphenated().to_string())
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        let id: String =
            sqlx::query_scalar(STORE_ID.sql::<D>()).fetch_one(&mut *tx).await.map_err(sql_error(CONTEXT))?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(id)
    }
}
