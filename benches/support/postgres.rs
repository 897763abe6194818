//! Throwaway Postgres databases for the benches that start Chitram on Postgres: one per
//! server, on `CHITRAM_BENCH_POSTGRES_URL` (the machine's own Postgres by default), dropped at
//! the end.

use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The URL of the database the bench connects to for creating and dropping its own.
pub fn admin_url() -> String {
    std::env::var("CHITRAM_BENCH_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A new, empty database: its name and its URL.
pub async fn create_database() -> (String, String) {
    let admin = admin_url();
    let name = format!("chitram_bench_{}", uuid::Uuid::new_v4().simple());
    let mut connection = PgConnection::connect(&admin).await.expect("the bench's Postgres answers");
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut connection).await.unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    (name, url)
}

/// Drops a database `create_database` made, closing its connections.
pub async fn drop_database(name: &str) {
    let mut connection = PgConnection::connect(&admin_url()).await.unwrap();
    let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut connection)
        .await;
}
