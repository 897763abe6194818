//! The metadata store over SQL: one source, compiled once for Postgres and once for SQLite.
//!
//! The source is `store/*.rs`, one file per concern (images, copies, queue, jobs), each with
//! its statements, the steps transactions are built from, and the trait implementation.
//! `postgres.rs` and `sqlite.rs` each include those files as modules of their own and name
//! their dialect `D` there, so every statement and every query's control flow is written
//! once, and the compiler sees concrete sqlx types in each copy. Why not generic code over
//! `sqlx::Database`, and what differs between the dialects: `dialect.rs`.

pub(super) mod dialect;
pub(super) mod liveness;
// Loading `store/` once per dialect is the point (see above), not the slip this lint looks for.
#[allow(clippy::duplicate_mod)]
mod postgres;
mod singleton;
#[allow(clippy::duplicate_mod)]
mod sqlite;

use std::marker::PhantomData;
use std::sync::OnceLock;

use sqlx::Pool;

use super::MetaResult;
use dialect::Dialect;

/// The metadata store on one dialect's connection pool.
pub struct SqlStore<D: Dialect> {
    pool: Pool<D::Db>,
    dialect: PhantomData<D>,
}

impl<D: Dialect> SqlStore<D> {
    pub async fn connect(url: &str) -> MetaResult<Self> {
        Ok(Self { pool: D::connect(url).await?, dialect: PhantomData })
    }
}

/// One SQL statement, written once in the SQL both databases share, with the markers of
/// `dialect.rs` where they differ. Each compiled copy of the store has its own statics, so
/// each renders its statement once, for its own dialect, at first use.
pub struct Statement {
    template: &'static str,
    rendered: OnceLock<String>,
}

impl Statement {
    pub const fn new(template: &'static str) -> Self {
        Self { template, rendered: OnceLock::new() }
    }

    /// The statement in dialect `D`'s spelling.
    pub fn sql<D: Dialect>(&'static self) -> &'static str {
        self.rendered.get_or_init(|| D::render(self.template))
    }
}
