//! Throwaway PostgreSQL databases on the local server, one per test.

use anyhow::Context;
use sqlx::Connection;

/// The server tests use; scripts/test exports it.
pub fn server_url() -> String {
    std::env::var("MAYFLY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> anyhow::Result<Self> {
        let name = format!("mayfly_e2e_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", server_url()))
            .await
            .context("connecting to PostgreSQL (is it running on 127.0.0.1:5432?)")?;
        // The name is ours: a fixed prefix and a hex UUID.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        Ok(Self {
            url: format!("{}/{name}", server_url()),
            name,
        })
    }

    pub async fn drop_database(self) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", server_url())).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await?;
        Ok(())
    }
}
