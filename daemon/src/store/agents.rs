//! Attested agents: their current SVID serial (checked on every stream), their status
//! (active, evicted, banned) and when they were last seen.

use std::fmt;
use std::str::FromStr;

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Result, Store, StoreError};

const KIND: &str = "agent";

/// Where an agent stands with the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentStatus {
    /// May stream and renew its SVID.
    Active,
    /// Cut off; may attest again with a new join token.
    Evicted,
    /// Cut off; may not attest again.
    Banned,
}

impl AgentStatus {
    /// The text stored in the database and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active => "active",
            AgentStatus::Evicted => "evicted",
            AgentStatus::Banned => "banned",
        }
    }
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AgentStatus {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "active" => Ok(AgentStatus::Active),
            "evicted" => Ok(AgentStatus::Evicted),
            "banned" => Ok(AgentStatus::Banned),
            other => Err(StoreError::Corrupt {
                what: "agent status",
                detail: format!("{other:?} is not active, evicted or banned"),
            }),
        }
    }
}

/// A stored agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub spiffe_id: String,
    /// Serial of the agent's current SVID, hex.
    pub serial: String,
    pub status: AgentStatus,
    pub attested_at: i64,
    pub svid_expires_at: i64,
    pub last_seen: i64,
    /// SHA-256 hex of the join token the agent last attested with.
    pub token_hash: String,
}

impl Store {
    /// Records a successful attestation: inserts a new agent, or overwrites an existing one
    /// and makes it active again (an evicted agent re-attesting). A banned agent is left
    /// untouched and the call fails with `AgentBanned`. `agent.status` is ignored: an agent
    /// that just attested is active by definition. The check and the write are one
    /// statement, so a ban cannot slip in between them.
    pub async fn upsert_attested_agent(&self, agent: &AgentRecord) -> Result<AgentRecord> {
        let row = sqlx::query(
            "INSERT INTO agents \
             (spiffe_id, serial, status, attested_at, svid_expires_at, last_seen, token_hash) \
             VALUES ($1, $2, 'active', $3, $4, $5, $6) \
             ON CONFLICT (spiffe_id) DO UPDATE SET \
             serial = excluded.serial, status = 'active', attested_at = excluded.attested_at, \
             svid_expires_at = excluded.svid_expires_at, last_seen = excluded.last_seen, \
             token_hash = excluded.token_hash \
             WHERE agents.status <> 'banned' \
             RETURNING spiffe_id, serial, status, attested_at, svid_expires_at, last_seen, \
             token_hash",
        )
        .bind(&agent.spiffe_id)
        .bind(&agent.serial)
        .bind(agent.attested_at)
        .bind(agent.svid_expires_at)
        .bind(agent.last_seen)
        .bind(&agent.token_hash)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => agent_from_row(&row),
            // The only way the upsert writes nothing is the banned guard.
            None => Err(StoreError::AgentBanned {
                spiffe_id: agent.spiffe_id.clone(),
            }),
        }
    }

    /// The agent with this SPIFFE ID, if it ever attested.
    pub async fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>> {
        let row = sqlx::query(
            "SELECT spiffe_id, serial, status, attested_at, svid_expires_at, last_seen, \
             token_hash FROM agents WHERE spiffe_id = $1",
        )
        .bind(spiffe_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    /// Every agent, ordered by SPIFFE ID.
    pub async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let rows = sqlx::query(
            "SELECT spiffe_id, serial, status, attested_at, svid_expires_at, last_seen, \
             token_hash FROM agents ORDER BY spiffe_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(agent_from_row).collect()
    }

    /// Sets the status (evict, ban, or lift a ban) and returns the updated agent.
    pub async fn set_agent_status(
        &self,
        spiffe_id: &str,
        status: AgentStatus,
    ) -> Result<AgentRecord> {
        let row = sqlx::query(
            "UPDATE agents SET status = $1 WHERE spiffe_id = $2 \
             RETURNING spiffe_id, serial, status, attested_at, svid_expires_at, last_seen, \
             token_hash",
        )
        .bind(status.as_str())
        .bind(spiffe_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => agent_from_row(&row),
            None => Err(not_found(spiffe_id)),
        }
    }

    /// Records the agent's renewed SVID. Only an active agent may renew: the status check is
    /// part of the UPDATE, so an eviction racing a renewal cannot be undone by it.
    pub async fn update_agent_svid(
        &self,
        spiffe_id: &str,
        serial: &str,
        expires_at: i64,
    ) -> Result<AgentRecord> {
        let row = sqlx::query(
            "UPDATE agents SET serial = $1, svid_expires_at = $2 \
             WHERE spiffe_id = $3 AND status = 'active' \
             RETURNING spiffe_id, serial, status, attested_at, svid_expires_at, last_seen, \
             token_hash",
        )
        .bind(serial)
        .bind(expires_at)
        .bind(spiffe_id)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            return agent_from_row(&row);
        }
        match self.get_agent(spiffe_id).await? {
            Some(agent) => Err(StoreError::AgentNotActive {
                spiffe_id: agent.spiffe_id,
                status: agent.status.to_string(),
            }),
            None => Err(not_found(spiffe_id)),
        }
    }

    /// Records that the agent was seen at `now`.
    pub async fn touch_agent(&self, spiffe_id: &str, now: i64) -> Result<()> {
        let done = sqlx::query("UPDATE agents SET last_seen = $1 WHERE spiffe_id = $2")
            .bind(now)
            .bind(spiffe_id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_found(spiffe_id));
        }
        Ok(())
    }
}

fn not_found(spiffe_id: &str) -> StoreError {
    StoreError::NotFound {
        kind: KIND,
        id: spiffe_id.to_owned(),
    }
}

fn agent_from_row(row: &AnyRow) -> Result<AgentRecord> {
    let status: String = row.try_get("status")?;
    Ok(AgentRecord {
        spiffe_id: row.try_get("spiffe_id")?,
        serial: row.try_get("serial")?,
        status: status.parse()?,
        attested_at: row.try_get("attested_at")?,
        svid_expires_at: row.try_get("svid_expires_at")?,
        last_seen: row.try_get("last_seen")?,
        token_hash: row.try_get("token_hash")?,
    })
}
