//! TTL-bound credential definitions (sealed, like secrets) and their leases: one row per
//! credential issued, written before the backend is asked and kept after it is revoked,
//! so that `mayflyd lease list --all` shows what was handed out and when it ended.
//! Times are unix seconds.

use std::fmt;
use std::str::FromStr;

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Result, Store, StoreError};

/// A stored credential definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    pub name: String,
    /// The definition JSON, sealed with the local key.
    pub spec_sealed: Vec<u8>,
    pub source: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Where a lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Recorded; the backend may or may not have issued it yet (a crash here leaves a lease
    /// the sweeper revokes).
    Issuing,
    /// Issued and handed out; revoked at its expiry.
    Active,
    /// Gone at the backend.
    Revoked,
    /// Revoking it at the backend failed; the sweeper tries again.
    RevokeFailed,
}

impl LeaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Issuing => "issuing",
            LeaseState::Active => "active",
            LeaseState::Revoked => "revoked",
            LeaseState::RevokeFailed => "revoke_failed",
        }
    }
}

impl fmt::Display for LeaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LeaseState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "issuing" => Ok(LeaseState::Issuing),
            "active" => Ok(LeaseState::Active),
            "revoked" => Ok(LeaseState::Revoked),
            "revoke_failed" => Ok(LeaseState::RevokeFailed),
            other => Err(StoreError::Corrupt {
                what: "lease state",
                detail: other.to_string(),
            }),
        }
    }
}

/// One credential issued to one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialLease {
    pub id: String,
    pub credential: String,
    pub holder: String,
    pub agent_id: String,
    pub backend_id: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub state: LeaseState,
    pub revoked_at: Option<i64>,
    pub reason: String,
    /// The elevation it was issued under; "" for a standing grant.
    pub elevation_id: String,
}

/// Which leases to list.
#[derive(Debug, Clone, Default)]
pub struct LeaseFilter {
    pub holder: Option<String>,
    pub credential: Option<String>,
    /// Issued under this elevation.
    pub elevation_id: Option<String>,
    /// Revoked leases too.
    pub all: bool,
}

const LEASE_COLUMNS: &str = "id, credential, holder, agent_id, backend_id, issued_at, expires_at, state, revoked_at, reason, elevation_id";

impl Store {
    pub async fn upsert_credential(&self, record: &CredentialRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO credentials (name, spec_sealed, source, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (name) DO UPDATE SET spec_sealed = excluded.spec_sealed, \
             source = excluded.source, updated_at = excluded.updated_at",
        )
        .bind(&record.name)
        .bind(&record.spec_sealed)
        .bind(&record.source)
        .bind(record.created_at)
        .bind(record.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_credential(&self, name: &str) -> Result<CredentialRecord> {
        let row = sqlx::query(
            "SELECT name, spec_sealed, source, created_at, updated_at FROM credentials WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => credential_from_row(&row),
            None => Err(StoreError::NotFound {
                kind: "credential",
                id: name.to_string(),
            }),
        }
    }

    pub async fn list_credentials(&self) -> Result<Vec<CredentialRecord>> {
        let rows = sqlx::query(
            "SELECT name, spec_sealed, source, created_at, updated_at FROM credentials ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(credential_from_row).collect()
    }

    /// Deletes a definition; its leases stay on record (the caller revokes live ones first).
    pub async fn delete_credential(&self, name: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM credentials WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: "credential",
                id: name.to_string(),
            });
        }
        Ok(())
    }

    pub async fn insert_lease(&self, lease: &CredentialLease) -> Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO credential_leases ({LEASE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        )))
        .bind(&lease.id)
        .bind(&lease.credential)
        .bind(&lease.holder)
        .bind(&lease.agent_id)
        .bind(&lease.backend_id)
        .bind(lease.issued_at)
        .bind(lease.expires_at)
        .bind(lease.state.as_str())
        .bind(lease.revoked_at)
        .bind(&lease.reason)
        .bind(&lease.elevation_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves a lease to `state`. A revoked lease stays revoked: a late `active` (an issue
    /// that finished after an operator's revocation) changes nothing and returns false.
    pub async fn set_lease_state(
        &self,
        id: &str,
        state: LeaseState,
        revoked_at: Option<i64>,
        reason: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE credential_leases SET state = $1, revoked_at = $2, reason = $3 \
             WHERE id = $4 AND state <> 'revoked'",
        )
        .bind(state.as_str())
        .bind(revoked_at)
        .bind(reason)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks every lease of `ids` revoked at `revoked_at` with `reason`, in one statement
    /// (a revoked lease stays as it was).
    pub async fn set_leases_revoked(
        &self,
        ids: &[String],
        revoked_at: i64,
        reason: &str,
    ) -> Result<()> {
        // Chunks keep the statement under SQLite's parameter limit.
        for chunk in ids.chunks(500) {
            let placeholders: Vec<String> =
                (0..chunk.len()).map(|i| format!("${}", i + 3)).collect();
            let sql = format!(
                "UPDATE credential_leases SET state = 'revoked', revoked_at = $1, reason = $2 \
                 WHERE state <> 'revoked' AND id IN ({})",
                placeholders.join(", ")
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(revoked_at)
                .bind(reason);
            for id in chunk {
                query = query.bind(id);
            }
            query.execute(&self.pool).await?;
        }
        Ok(())
    }

    /// An issued lease: what the backend calls it and when it really ends. A lease an
    /// operator revoked meanwhile stays revoked (returns false).
    pub async fn activate_lease(
        &self,
        id: &str,
        backend_id: &str,
        expires_at: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE credential_leases SET state = 'active', backend_id = $1, expires_at = $2 \
             WHERE id = $3 AND state = 'issuing'",
        )
        .bind(backend_id)
        .bind(expires_at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Moves a live lease's expiry to `expires_at`; false if it is no longer live at `now`
    /// (revoked, or expired and due for the sweeper).
    pub async fn extend_lease(&self, id: &str, expires_at: i64, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE credential_leases SET expires_at = $1 \
             WHERE id = $2 AND state = 'active' AND expires_at > $3",
        )
        .bind(expires_at)
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn get_credential_lease(&self, id: &str) -> Result<CredentialLease> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {LEASE_COLUMNS} FROM credential_leases WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => lease_from_row(&row),
            None => Err(StoreError::NotFound {
                kind: "lease",
                id: id.to_string(),
            }),
        }
    }

    pub async fn list_credential_leases(
        &self,
        filter: &LeaseFilter,
    ) -> Result<Vec<CredentialLease>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {LEASE_COLUMNS} FROM credential_leases \
             WHERE ($1 = '' OR holder = $1) AND ($2 = '' OR credential = $2) \
             AND ($3 = 1 OR state <> 'revoked') AND ($4 = '' OR elevation_id = $4) \
             ORDER BY issued_at, id"
        )))
        .bind(filter.holder.clone().unwrap_or_default())
        .bind(filter.credential.clone().unwrap_or_default())
        .bind(i64::from(filter.all))
        .bind(filter.elevation_id.clone().unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(lease_from_row).collect()
    }

    /// Leases the sweeper must revoke at `now`: expired and not yet revoked, those whose
    /// revocation failed, and those stuck issuing since before `stale_issuing` (their
    /// daemon died between recording and issuing).
    pub async fn leases_due(
        &self,
        now: i64,
        stale_issuing: i64,
        limit: i64,
    ) -> Result<Vec<CredentialLease>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {LEASE_COLUMNS} FROM credential_leases \
             WHERE (state IN ('active', 'issuing') AND expires_at <= $1) \
             OR state = 'revoke_failed' \
             OR (state = 'issuing' AND issued_at < $2) \
             ORDER BY expires_at LIMIT $3"
        )))
        .bind(now)
        .bind(stale_issuing)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(lease_from_row).collect()
    }

    /// How many leases of `credential` are not revoked.
    pub async fn live_lease_count(&self, credential: &str) -> Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM credential_leases WHERE credential = $1 AND state <> 'revoked'",
        )
        .bind(credential)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }
}

fn credential_from_row(row: &AnyRow) -> Result<CredentialRecord> {
    Ok(CredentialRecord {
        name: row.try_get("name")?,
        spec_sealed: row.try_get("spec_sealed")?,
        source: row.try_get("source")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn lease_from_row(row: &AnyRow) -> Result<CredentialLease> {
    let state: String = row.try_get("state")?;
    Ok(CredentialLease {
        id: row.try_get("id")?,
        credential: row.try_get("credential")?,
        holder: row.try_get("holder")?,
        agent_id: row.try_get("agent_id")?,
        backend_id: row.try_get("backend_id")?,
        issued_at: row.try_get("issued_at")?,
        expires_at: row.try_get("expires_at")?,
        state: state.parse()?,
        revoked_at: row.try_get("revoked_at")?,
        reason: row.try_get("reason")?,
        elevation_id: row.try_get("elevation_id")?,
    })
}
