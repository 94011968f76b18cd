//! Just-in-time elevations and their reviews: one row per request, kept for good (an
//! expired or ended elevation stays listable), and one row per reviewer's verdict. Every
//! change of state is a conditional update on the state it leaves, so two daemons (or two
//! reviewers) racing on one elevation cannot both move it. Times are unix seconds.

use std::fmt;
use std::str::FromStr;

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Result, Store, StoreError};

/// Where an elevation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElevationState {
    /// Waiting for reviews.
    Pending,
    /// Granting its scope until `ends_at`.
    Active,
    /// Denied by its reviews.
    Rejected,
    /// Nobody decided before `pending_until`.
    Expired,
    /// Withdrawn by its requester while pending.
    Cancelled,
    /// Ended before its time: the task was done, or an operator ended it.
    Ended,
    /// Its TTL ran out.
    Elapsed,
}

impl ElevationState {
    pub const ALL: [ElevationState; 7] = [
        ElevationState::Pending,
        ElevationState::Active,
        ElevationState::Rejected,
        ElevationState::Expired,
        ElevationState::Cancelled,
        ElevationState::Ended,
        ElevationState::Elapsed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ElevationState::Pending => "pending",
            ElevationState::Active => "active",
            ElevationState::Rejected => "rejected",
            ElevationState::Expired => "expired",
            ElevationState::Cancelled => "cancelled",
            ElevationState::Ended => "ended",
            ElevationState::Elapsed => "elapsed",
        }
    }

    /// Whether nothing more happens to it.
    pub fn is_final(self) -> bool {
        !matches!(self, ElevationState::Pending | ElevationState::Active)
    }
}

impl fmt::Display for ElevationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ElevationState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        ElevationState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| StoreError::Corrupt {
                what: "elevation state",
                detail: s.to_string(),
            })
    }
}

/// One elevation request and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ElevationRecord {
    pub id: String,
    /// `uid:1000` for an operator, the SPIFFE ID for a workload.
    pub requester: String,
    /// The operator's user name; the agent's SPIFFE ID for a workload.
    pub requester_name: String,
    /// `operator`, `workload` or `ai_agent`.
    pub requester_kind: String,
    /// The agent that asked for a workload; "" for an operator.
    pub agent_id: String,
    pub scope_kind: String,
    pub scope_name: String,
    pub reason: String,
    pub ticket: String,
    /// Seconds.
    pub requested_ttl: i64,
    pub break_glass: bool,
    pub state: Option<ElevationState>,
    pub created_at: i64,
    pub pending_until: i64,
    pub activated_at: Option<i64>,
    pub ends_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub ended_by: String,
    pub end_reason: String,
    pub revocation_id: String,
    pub review_required: bool,
    pub reviewed_by: String,
    pub reviewed_at: Option<i64>,
    pub review_comment: String,
    pub policy_set: String,
    /// The temporary entry an active elevation of an entry created; "" until then (and
    /// for other scopes).
    pub granted_entry: String,
}

impl ElevationRecord {
    pub fn state(&self) -> ElevationState {
        self.state.unwrap_or(ElevationState::Pending)
    }
}

/// One reviewer's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElevationReview {
    pub elevation_id: String,
    pub reviewer_uid: u32,
    pub reviewer_name: String,
    /// `approve` or `deny`.
    pub verdict: String,
    pub comment: String,
    pub at: i64,
    pub policy_set: String,
}

const COLUMNS: &str = "id, requester, requester_name, requester_kind, agent_id, scope_kind, \
     scope_name, reason, ticket, requested_ttl, break_glass, state, created_at, pending_until, \
     activated_at, ends_at, ended_at, ended_by, end_reason, revocation_id, review_required, \
     reviewed_by, reviewed_at, review_comment, policy_set, granted_entry";

const REVIEW_COLUMNS: &str =
    "elevation_id, reviewer_uid, reviewer_name, verdict, comment, at, policy_set";

fn not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        kind: "elevation",
        id: id.to_string(),
    }
}

impl Store {
    pub async fn insert_elevation(&self, e: &ElevationRecord) -> Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO elevations ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
             $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26)"
        )))
        .bind(&e.id)
        .bind(&e.requester)
        .bind(&e.requester_name)
        .bind(&e.requester_kind)
        .bind(&e.agent_id)
        .bind(&e.scope_kind)
        .bind(&e.scope_name)
        .bind(&e.reason)
        .bind(&e.ticket)
        .bind(e.requested_ttl)
        .bind(i64::from(e.break_glass))
        .bind(e.state().as_str())
        .bind(e.created_at)
        .bind(e.pending_until)
        .bind(e.activated_at)
        .bind(e.ends_at)
        .bind(e.ended_at)
        .bind(&e.ended_by)
        .bind(&e.end_reason)
        .bind(&e.revocation_id)
        .bind(i64::from(e.review_required))
        .bind(&e.reviewed_by)
        .bind(e.reviewed_at)
        .bind(&e.review_comment)
        .bind(&e.policy_set)
        .bind(&e.granted_entry)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_elevation(&self, id: &str) -> Result<ElevationRecord> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM elevations WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => elevation_from_row(&row),
            None => Err(not_found(id)),
        }
    }

    /// Elevations, newest first; `state` narrows them, `requester` too.
    pub async fn list_elevations(
        &self,
        state: Option<ElevationState>,
        requester: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ElevationRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM elevations WHERE ($1 = '' OR state = $1) \
             AND ($2 = '' OR requester = $2) ORDER BY created_at DESC, id LIMIT $3"
        )))
        .bind(state.map(|s| s.as_str()).unwrap_or_default())
        .bind(requester.unwrap_or_default())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(elevation_from_row).collect()
    }

    /// The active elevation of `requester` on a scope that lasts longest, at `now`.
    pub async fn active_elevation(
        &self,
        requester: &str,
        scope_kind: &str,
        scope_name: &str,
        now: i64,
    ) -> Result<Option<ElevationRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM elevations WHERE requester = $1 AND scope_kind = $2 \
             AND scope_name = $3 AND state = 'active' AND ends_at > $4 \
             ORDER BY ends_at DESC LIMIT 1"
        )))
        .bind(requester)
        .bind(scope_kind)
        .bind(scope_name)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(elevation_from_row).transpose()
    }

    /// Elevations with something due at `now`: active past their end, pending past their
    /// deadline.
    pub async fn elevations_due(&self, now: i64, limit: i64) -> Result<Vec<ElevationRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM elevations WHERE (state = 'active' AND ends_at <= $1) \
             OR (state = 'pending' AND pending_until <= $1) ORDER BY created_at LIMIT $2"
        )))
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(elevation_from_row).collect()
    }

    /// Elevations that ended (or elapsed) before `before` and whose leases were never taken
    /// back: what a daemon that died between the two leaves, for the sweeper to finish.
    pub async fn elevations_untaken(
        &self,
        before: i64,
        limit: i64,
    ) -> Result<Vec<ElevationRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM elevations WHERE state IN ('ended', 'elapsed') \
             AND revocation_id = '' AND ended_at < $1 ORDER BY ended_at LIMIT $2"
        )))
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(elevation_from_row).collect()
    }

    /// Activates a pending elevation until `ends_at`; false if it is no longer pending.
    pub async fn activate_elevation(&self, id: &str, now: i64, ends_at: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE elevations SET state = 'active', activated_at = $1, ends_at = $2 \
             WHERE id = $3 AND state = 'pending'",
        )
        .bind(now)
        .bind(ends_at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Moves an elevation from `from` to a final state; false if it was not in `from`.
    pub async fn finish_elevation(
        &self,
        id: &str,
        from: ElevationState,
        to: ElevationState,
        now: i64,
        by: &str,
        reason: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE elevations SET state = $1, ended_at = $2, ended_by = $3, end_reason = $4 \
             WHERE id = $5 AND state = $6",
        )
        .bind(to.as_str())
        .bind(now)
        .bind(by)
        .bind(reason)
        .bind(id)
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the temporary entry an active elevation created; false if it is no longer
    /// active or has one already (the caller then deletes the entry it made).
    pub async fn set_elevation_entry(&self, id: &str, entry_id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE elevations SET granted_entry = $1 WHERE id = $2 AND state = 'active' \
             AND granted_entry = ''",
        )
        .bind(entry_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Active elevations of the given scope kinds: what agents are granted for them.
    pub async fn active_elevations(&self, kinds: &[&str]) -> Result<Vec<ElevationRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM elevations WHERE state = 'active' ORDER BY ends_at, id"
        )))
        .fetch_all(&self.pool)
        .await?;
        let mut active = Vec::with_capacity(rows.len());
        for row in &rows {
            let record = elevation_from_row(row)?;
            if kinds.contains(&record.scope_kind.as_str()) {
                active.push(record);
            }
        }
        Ok(active)
    }

    pub async fn set_elevation_revocation(&self, id: &str, revocation_id: &str) -> Result<()> {
        sqlx::query("UPDATE elevations SET revocation_id = $1 WHERE id = $2")
            .bind(revocation_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the after-the-fact review of a break-glass elevation; false if it needs
    /// none or has one.
    pub async fn review_break_glass(
        &self,
        id: &str,
        by: &str,
        now: i64,
        comment: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE elevations SET reviewed_by = $1, reviewed_at = $2, review_comment = $3 \
             WHERE id = $4 AND review_required = 1 AND reviewed_at IS NULL",
        )
        .bind(by)
        .bind(now)
        .bind(comment)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a verdict; `Conflict` when this reviewer gave one already.
    pub async fn insert_elevation_review(&self, r: &ElevationReview) -> Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO elevation_reviews ({REVIEW_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        )))
        .bind(&r.elevation_id)
        .bind(i64::from(r.reviewer_uid))
        .bind(&r.reviewer_name)
        .bind(&r.verdict)
        .bind(&r.comment)
        .bind(r.at)
        .bind(&r.policy_set)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            StoreError::conflict_or_database(e, "elevation review", || {
                format!(
                    "uid {} has reviewed elevation {} already",
                    r.reviewer_uid, r.elevation_id
                )
            })
        })?;
        Ok(())
    }

    pub async fn elevation_reviews(&self, id: &str) -> Result<Vec<ElevationReview>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {REVIEW_COLUMNS} FROM elevation_reviews WHERE elevation_id = $1 ORDER BY at, reviewer_uid"
        )))
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let uid: i64 = row.try_get("reviewer_uid")?;
                Ok(ElevationReview {
                    elevation_id: row.try_get("elevation_id")?,
                    reviewer_uid: u32::try_from(uid).map_err(|_| StoreError::Corrupt {
                        what: "reviewer uid",
                        detail: uid.to_string(),
                    })?,
                    reviewer_name: row.try_get("reviewer_name")?,
                    verdict: row.try_get("verdict")?,
                    comment: row.try_get("comment")?,
                    at: row.try_get("at")?,
                    policy_set: row.try_get("policy_set")?,
                })
            })
            .collect()
    }
}

fn elevation_from_row(row: &AnyRow) -> Result<ElevationRecord> {
    let state: String = row.try_get("state")?;
    let break_glass: i64 = row.try_get("break_glass")?;
    let review_required: i64 = row.try_get("review_required")?;
    Ok(ElevationRecord {
        id: row.try_get("id")?,
        requester: row.try_get("requester")?,
        requester_name: row.try_get("requester_name")?,
        requester_kind: row.try_get("requester_kind")?,
        agent_id: row.try_get("agent_id")?,
        scope_kind: row.try_get("scope_kind")?,
        scope_name: row.try_get("scope_name")?,
        reason: row.try_get("reason")?,
        ticket: row.try_get("ticket")?,
        requested_ttl: row.try_get("requested_ttl")?,
        break_glass: break_glass != 0,
        state: Some(state.parse()?),
        created_at: row.try_get("created_at")?,
        pending_until: row.try_get("pending_until")?,
        activated_at: row.try_get("activated_at")?,
        ends_at: row.try_get("ends_at")?,
        ended_at: row.try_get("ended_at")?,
        ended_by: row.try_get("ended_by")?,
        end_reason: row.try_get("end_reason")?,
        revocation_id: row.try_get("revocation_id")?,
        review_required: review_required != 0,
        reviewed_by: row.try_get("reviewed_by")?,
        reviewed_at: row.try_get("reviewed_at")?,
        review_comment: row.try_get("review_comment")?,
        policy_set: row.try_get("policy_set")?,
        granted_entry: row.try_get("granted_entry")?,
    })
}
