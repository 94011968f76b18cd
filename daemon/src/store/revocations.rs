//! Revocations, the deny list of revoked serials, and which agents have acknowledged each
//! revocation. A revocation, its serials and its expected acknowledgements are written in
//! one transaction, so a crash leaves either all of it or none.

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::audit::IN_LIST_CHUNK;
use super::{Result, Store, StoreError};

fn ack_row(row: &AnyRow) -> Result<RevocationAckRecord> {
    Ok(RevocationAckRecord {
        agent_id: row.try_get("agent_id")?,
        acked_at: row.try_get("acked_at")?,
        detail: row.try_get("detail")?,
    })
}

/// One operator revocation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRecord {
    pub id: String,
    pub kind: String,
    pub target: String,
    pub reason: String,
    pub actor: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// JSON: what the revocation covered.
    pub detail: String,
}

/// A revoked serial and when its certificate expires (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerialRecord {
    pub serial: String,
    pub not_after: i64,
}

/// An agent a revocation was pushed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationAckRecord {
    pub agent_id: String,
    /// Unix milliseconds, when acknowledged.
    pub acked_at: Option<i64>,
    pub detail: String,
}

impl Store {
    /// Records a revocation with its deny-list serials and the agents that must
    /// acknowledge it, and deletes the entries it revokes, in one transaction. Returns the
    /// entries deleted (an entry another operator deleted meanwhile is skipped).
    pub async fn create_revocation(
        &self,
        revocation: &RevocationRecord,
        serials: &[RevokedSerialRecord],
        agents: &[String],
        entry_ids: &[String],
    ) -> Result<Vec<super::EntryRecord>> {
        let mut tx = self.begin_write().await?;
        let mut deleted = Vec::with_capacity(entry_ids.len());
        for chunk in entry_ids.chunks(IN_LIST_CHUNK) {
            deleted.extend(super::entries::delete_entries_in(&mut tx, chunk).await?);
        }
        sqlx::query(
            "INSERT INTO revocations (id, kind, target, reason, actor, created_at, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&revocation.id)
        .bind(&revocation.kind)
        .bind(&revocation.target)
        .bind(&revocation.reason)
        .bind(&revocation.actor)
        .bind(revocation.created_at)
        .bind(&revocation.detail)
        .execute(&mut *tx)
        .await?;
        for chunk in serials.chunks(IN_LIST_CHUNK) {
            let values = (0..chunk.len())
                .map(|i| format!("(${}, ${}, $1)", 2 * i + 2, 2 * i + 3))
                .collect::<Vec<_>>()
                .join(", ");
            // A serial revoked twice keeps its first revocation.
            let sql = format!(
                "INSERT INTO revoked_serials (serial, not_after, revocation_id) VALUES {values} \
                 ON CONFLICT (serial) DO NOTHING"
            );
            // Built from fixed text and numbered placeholders only.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&revocation.id);
            for serial in chunk {
                query = query.bind(&serial.serial).bind(serial.not_after);
            }
            query.execute(&mut *tx).await?;
        }
        for chunk in agents.chunks(IN_LIST_CHUNK) {
            let values = (0..chunk.len())
                .map(|i| format!("($1, ${}, '')", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO revocation_acks (revocation_id, agent_id, detail) VALUES {values}"
            );
            // Built from fixed text and numbered placeholders only.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&revocation.id);
            for agent in chunk {
                query = query.bind(agent);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    /// Whether `revocation` was pushed to `agent`, and its acknowledgement so far.
    pub async fn revocation_ack(
        &self,
        revocation: &str,
        agent: &str,
    ) -> Result<Option<RevocationAckRecord>> {
        let row = sqlx::query(
            "SELECT agent_id, acked_at, detail FROM revocation_acks \
             WHERE revocation_id = $1 AND agent_id = $2",
        )
        .bind(revocation)
        .bind(agent)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(ack_row).transpose()
    }

    pub async fn get_revocation(&self, id: &str) -> Result<RevocationRecord> {
        let row = sqlx::query(
            "SELECT id, kind, target, reason, actor, created_at, detail FROM revocations \
             WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "revocation",
            id: id.to_string(),
        })?;
        revocation_row(&row)
    }

    /// Newest first.
    pub async fn list_revocations(&self, limit: i64) -> Result<Vec<RevocationRecord>> {
        let rows = sqlx::query(
            "SELECT id, kind, target, reason, actor, created_at, detail FROM revocations \
             ORDER BY created_at DESC, id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(revocation_row).collect()
    }

    /// Revocations created at or after `since_ms`, oldest first.
    pub async fn revocations_since(&self, since_ms: i64) -> Result<Vec<RevocationRecord>> {
        let rows = sqlx::query(
            "SELECT id, kind, target, reason, actor, created_at, detail FROM revocations \
             WHERE created_at >= $1 ORDER BY created_at, id",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(revocation_row).collect()
    }

    pub async fn revocation_serials(&self, id: &str) -> Result<Vec<RevokedSerialRecord>> {
        let rows = sqlx::query(
            "SELECT serial, not_after FROM revoked_serials WHERE revocation_id = $1 \
             ORDER BY serial",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(serial_row).collect()
    }

    pub async fn revocation_acks(&self, id: &str) -> Result<Vec<RevocationAckRecord>> {
        let rows = sqlx::query(
            "SELECT agent_id, acked_at, detail FROM revocation_acks WHERE revocation_id = $1 \
             ORDER BY agent_id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(ack_row).collect()
    }

    /// The revocations pushed to `agent` that it has not acknowledged, oldest first.
    pub async fn pending_revocations(&self, agent: &str) -> Result<Vec<RevocationRecord>> {
        let rows = sqlx::query(
            "SELECT r.id, r.kind, r.target, r.reason, r.actor, r.created_at, r.detail \
             FROM revocations r JOIN revocation_acks a ON a.revocation_id = r.id \
             WHERE a.agent_id = $1 AND a.acked_at IS NULL ORDER BY r.created_at, r.id",
        )
        .bind(agent)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(revocation_row).collect()
    }

    /// Every revoked serial whose certificate has not expired by `now` (unix seconds).
    pub async fn deny_list(&self, now: i64) -> Result<Vec<RevokedSerialRecord>> {
        let rows = sqlx::query(
            "SELECT serial, not_after FROM revoked_serials WHERE not_after > $1 ORDER BY serial",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(serial_row).collect()
    }

    /// `agent`'s part of the deny list: the revoked serials that have not expired of the
    /// SVIDs signed for it (its workloads' and its own). An agent only ever holds SVIDs
    /// signed for it, so the rest would tell it about other agents' workloads and, in a
    /// large fleet, make every reconnect carry every revocation. Every deny-list line is
    /// taken from the register of issued SVIDs when it is revoked (`revoke svid` refuses a
    /// serial it has no record of), and both are pruned by the same notAfter at the same
    /// time, so a line that has not expired always has its record, which names its agent.
    ///
    /// The agent's serials are looked up in the deny list by its key, not the list read
    /// whole: under a millisecond with 100,000 lines and a million records, where reading
    /// every line took 155 ms. Both tables of the register (migration 0010) are read in one
    /// statement, so a record being moved between them is never missed.
    pub async fn deny_list_for(&self, agent: &str, now: i64) -> Result<Vec<RevokedSerialRecord>> {
        let rows = sqlx::query(
            "SELECT serial, not_after FROM revoked_serials WHERE not_after > $1 \
             AND serial IN (SELECT serial FROM issued_svids WHERE agent_id = $2 \
                 UNION SELECT serial FROM issued_svids_recent WHERE agent_id = $2) \
             ORDER BY serial",
        )
        .bind(now)
        .bind(agent)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(serial_row).collect()
    }

    /// Drops deny-list lines whose certificate expired before `before` (unix seconds).
    pub async fn prune_revoked_serials(&self, before: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM revoked_serials WHERE not_after < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

fn revocation_row(row: &AnyRow) -> Result<RevocationRecord> {
    Ok(RevocationRecord {
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        target: row.try_get("target")?,
        reason: row.try_get("reason")?,
        actor: row.try_get("actor")?,
        created_at: row.try_get("created_at")?,
        detail: row.try_get("detail")?,
    })
}

fn serial_row(row: &AnyRow) -> Result<RevokedSerialRecord> {
    Ok(RevokedSerialRecord {
        serial: row.try_get("serial")?,
        not_after: row.try_get("not_after")?,
    })
}
