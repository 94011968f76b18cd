//! The bundle sequence: a counter bumped whenever the trust bundle changes, so agents and
//! federated peers can tell a newer bundle from a stale one. One row, created by the
//! first migration.

use sqlx::Row as _;

use super::{Result, Store};

impl Store {
    /// Increments the sequence and returns the new value, atomically.
    pub async fn bump_bundle_sequence(&self) -> Result<i64> {
        let row = sqlx::query(
            "UPDATE bundle_sequence SET value = value + 1 WHERE id = 1 RETURNING value",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("value")?)
    }

    /// The current value; 0 before the first bump.
    pub async fn bundle_sequence(&self) -> Result<i64> {
        let row = sqlx::query("SELECT value FROM bundle_sequence WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }
}
