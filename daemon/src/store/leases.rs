//! Named leases, so that among several daemons sharing one datastore exactly one runs a
//! piece of work (the rotation scheduler). One statement takes, renews or takes over a
//! lease, the same SQL on SQLite and PostgreSQL. Times are unix milliseconds.

use sqlx::Row as _;

use super::{Result, Store};

/// Who holds a lease, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub holder: String,
    pub expires_at: i64,
}

impl Store {
    /// Takes or renews lease `name` for `holder` until `expires_at`. Succeeds when nobody
    /// holds it, when `holder` does, or when the holder's lease ran out before `now`;
    /// otherwise changes nothing and returns false. Atomic: of several daemons asking at
    /// once, one wins.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(expires_at)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease up at once (on shutdown), if `holder` still holds it, so another
    /// daemon need not wait for it to expire.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("UPDATE leases SET expires_at = 0 WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn get_lease(&self, name: &str) -> Result<Option<LeaseRecord>> {
        let row = sqlx::query("SELECT holder, expires_at FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(LeaseRecord {
                holder: row.try_get("holder")?,
                expires_at: row.try_get("expires_at")?,
            })
        })
        .transpose()
    }
}
