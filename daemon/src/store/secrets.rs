//! Secrets, their rotation jobs (with the claims that keep two daemons from running one
//! job, and the indexes that keep two jobs from running for one secret), and the versions of Mayfly's own encrypted store. Values
//! and definitions arrive here already sealed: the datastore never sees plaintext.

use std::fmt;
use std::str::FromStr;

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Result, Store, StoreError};

/// A stored secret definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRecord {
    pub name: String,
    /// The definition JSON, sealed with the local key.
    pub spec_sealed: Vec<u8>,
    pub source: String,
    pub next_run_at: Option<i64>,
    pub last_run_at: Option<i64>,
    pub last_outcome: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Where a rotation job stands: created, then one state per finished step (AWS's four
/// steps), or failed. Stored as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Created,
    /// The pending version is in the secret's store.
    PendingStored,
    /// The target system accepts the pending value.
    TargetSet,
    /// A login with the pending value worked.
    Tested,
    /// The pending version is current: the job is done.
    Promoted,
    /// Given up; the current version was never touched.
    Failed,
}

impl JobState {
    /// The text stored in the database and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Created => "created",
            JobState::PendingStored => "pending_stored",
            JobState::TargetSet => "target_set",
            JobState::Tested => "tested",
            JobState::Promoted => "promoted",
            JobState::Failed => "failed",
        }
    }

    /// Promoted or failed: nothing more will happen to the job.
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Promoted | JobState::Failed)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "created" => Ok(JobState::Created),
            "pending_stored" => Ok(JobState::PendingStored),
            "target_set" => Ok(JobState::TargetSet),
            "tested" => Ok(JobState::Tested),
            "promoted" => Ok(JobState::Promoted),
            "failed" => Ok(JobState::Failed),
            other => Err(StoreError::Corrupt {
                what: "rotation job state",
                detail: format!("{other:?} is not a rotation job state"),
            }),
        }
    }
}

/// What started a rotation job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerKind {
    /// Its schedule fell due.
    Schedule,
    /// An operator ran `mayflyd secret rotate`.
    Manual,
    /// A revocation of the secret replaces its value before revoking the old one.
    Revoke,
}

impl TriggerKind {
    /// The text stored in the database and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerKind::Schedule => "schedule",
            TriggerKind::Manual => "manual",
            TriggerKind::Revoke => "revoke",
        }
    }
}

impl fmt::Display for TriggerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TriggerKind {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "schedule" => Ok(TriggerKind::Schedule),
            "manual" => Ok(TriggerKind::Manual),
            "revoke" => Ok(TriggerKind::Revoke),
            other => Err(StoreError::Corrupt {
                what: "rotation trigger",
                detail: format!("{other:?} is not schedule, manual or revoke"),
            }),
        }
    }
}

/// A persisted rotation; its token becomes the new version's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub token: String,
    pub secret_name: String,
    pub state: JobState,
    pub username: String,
    pub trigger_kind: TriggerKind,
    pub attempts: i64,
    pub last_error: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    /// The schedule slot (unix ms) a scheduled job runs for; `None` for manual ones.
    pub scheduled_for: Option<i64>,
    /// The daemon running the job; `""` when none has claimed it.
    pub claimed_by: String,
    /// Until when (unix ms) the claim holds unless renewed.
    pub claim_expires_at: i64,
}

/// What came of starting a scheduled rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduledStart {
    /// The slot was ours and its job is recorded.
    Started,
    /// The slot was ours, but another rotation of the secret is unfinished; the slot is
    /// skipped and the schedule moved on.
    Busy,
    /// Another daemon already took this slot (or the schedule changed under us).
    Taken,
}

/// One version in Mayfly's own store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVersionRecord {
    pub version_id: String,
    pub stage: String,
    pub sealed: Vec<u8>,
    pub created_at: i64,
}

/// A job query with a fixed tail; a macro so the SQL stays a literal.
macro_rules! job_query {
    ($tail:literal) => {
        concat!(
            "SELECT token, secret_name, state, username, trigger_kind, attempts, last_error, \
             created_at, updated_at, finished_at, scheduled_for, claimed_by, claim_expires_at \
             FROM rotation_jobs ",
            $tail
        )
    };
}

impl Store {
    /// Inserts or replaces a secret definition, keeping its run history.
    pub async fn upsert_secret(&self, record: &SecretRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO secrets (name, spec_sealed, source, next_run_at, last_run_at, last_outcome, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (name) DO UPDATE SET spec_sealed = excluded.spec_sealed, source = excluded.source, \
             next_run_at = excluded.next_run_at, updated_at = excluded.updated_at",
        )
        .bind(&record.name)
        .bind(&record.spec_sealed)
        .bind(&record.source)
        .bind(record.next_run_at)
        .bind(record.last_run_at)
        .bind(&record.last_outcome)
        .bind(record.created_at)
        .bind(record.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_secret(&self, name: &str) -> Result<SecretRecord> {
        let row = sqlx::query(
            "SELECT name, spec_sealed, source, next_run_at, last_run_at, last_outcome, created_at, updated_at \
             FROM secrets WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => secret_from_row(&row),
            None => Err(StoreError::NotFound {
                kind: "secret",
                id: name.to_string(),
            }),
        }
    }

    pub async fn list_secrets(&self) -> Result<Vec<SecretRecord>> {
        let rows = sqlx::query(
            "SELECT name, spec_sealed, source, next_run_at, last_run_at, last_outcome, created_at, updated_at \
             FROM secrets ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(secret_from_row).collect()
    }

    /// Deletes a secret with its jobs and local versions.
    pub async fn delete_secret(&self, name: &str) -> Result<SecretRecord> {
        let record = self.get_secret(name).await?;
        let mut tx = self.begin_write().await?;
        for sql in [
            "DELETE FROM rotation_jobs WHERE secret_name = $1",
            "DELETE FROM local_secret_versions WHERE secret_name = $1",
            "DELETE FROM secrets WHERE name = $1",
        ] {
            sqlx::query(sql).bind(name).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(record)
    }

    pub async fn set_secret_schedule(&self, name: &str, next_run_at: Option<i64>) -> Result<()> {
        sqlx::query("UPDATE secrets SET next_run_at = $1 WHERE name = $2")
            .bind(next_run_at)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn record_secret_outcome(&self, name: &str, outcome: &str, at: i64) -> Result<()> {
        sqlx::query("UPDATE secrets SET last_outcome = $1, last_run_at = $2 WHERE name = $3")
            .bind(outcome)
            .bind(at)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ----- rotation jobs -----

    /// Records a new job, unless the secret already has an unfinished one (or, for a
    /// scheduled job, its slot already has a job): then nothing changes and the answer is
    /// false. The datastore decides, so this holds across daemons.
    pub async fn insert_job(&self, job: &JobRecord) -> Result<bool> {
        let done = insert_job_query(job).execute(&self.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Starts the scheduled job for slot `due` in one transaction: moves the secret's
    /// schedule from `due` to `following` (only if it still says `due`, so of several
    /// daemons one takes the slot) and records `job` unless another rotation of the
    /// secret is unfinished.
    pub async fn start_scheduled_job(
        &self,
        job: &JobRecord,
        due: i64,
        following: Option<i64>,
    ) -> Result<ScheduledStart> {
        let mut tx = self.begin_write().await?;
        let moved =
            sqlx::query("UPDATE secrets SET next_run_at = $1 WHERE name = $2 AND next_run_at = $3")
                .bind(following)
                .bind(&job.secret_name)
                .bind(due)
                .execute(&mut *tx)
                .await?;
        if moved.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(ScheduledStart::Taken);
        }
        let inserted = insert_job_query(job).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(if inserted.rows_affected() == 1 {
            ScheduledStart::Started
        } else {
            ScheduledStart::Busy
        })
    }

    /// Claims (or renews the claim on) an unfinished job for `holder` until `expires_at`:
    /// succeeds when `holder` holds it already or the previous claim ran out before `now`.
    pub async fn claim_job(
        &self,
        token: &str,
        holder: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE rotation_jobs SET claimed_by = $1, claim_expires_at = $2 \
             WHERE token = $3 AND state <> 'promoted' AND state <> 'failed' \
             AND (claimed_by = $1 OR claim_expires_at < $4)",
        )
        .bind(holder)
        .bind(expires_at)
        .bind(token)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a job's progress, if `holder` still holds its claim; false when another
    /// daemon has taken the job over (nothing is written then).
    pub async fn update_job(&self, job: &JobRecord, holder: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE rotation_jobs SET state = $1, attempts = $2, last_error = $3, updated_at = $4, finished_at = $5 \
             WHERE token = $6 AND claimed_by = $7",
        )
        .bind(job.state.as_str())
        .bind(job.attempts)
        .bind(&job.last_error)
        .bind(job.updated_at)
        .bind(job.finished_at)
        .bind(&job.token)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn get_job(&self, token: &str) -> Result<JobRecord> {
        let row = sqlx::query(job_query!("WHERE token = $1"))
            .bind(token)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => job_from_row(&row),
            None => Err(StoreError::NotFound {
                kind: "rotation job",
                id: token.to_string(),
            }),
        }
    }

    /// Unfinished jobs that `holder` may run: its own (a restarted daemon finishing what
    /// it started) and those whose claim ran out before `now` (a lost daemon's).
    pub async fn resumable_jobs(&self, holder: &str, now: i64) -> Result<Vec<JobRecord>> {
        let rows = sqlx::query(job_query!(
            "WHERE state <> 'promoted' AND state <> 'failed' AND (claimed_by = $1 OR claim_expires_at < $2) \
             ORDER BY created_at, token"
        ))
        .bind(holder)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// A secret's jobs, newest first.
    pub async fn jobs_for_secret(&self, name: &str, limit: i64) -> Result<Vec<JobRecord>> {
        let rows = sqlx::query(job_query!(
            "WHERE secret_name = $1 ORDER BY created_at DESC, token DESC LIMIT $2"
        ))
        .bind(name)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    // ----- Mayfly's own store -----

    /// Inserts a version unless one with this id exists (first write wins).
    pub async fn insert_local_version(
        &self,
        secret: &str,
        version: &LocalVersionRecord,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO local_secret_versions (secret_name, version_id, stage, sealed, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (secret_name, version_id) DO NOTHING",
        )
        .bind(secret)
        .bind(&version.version_id)
        .bind(&version.stage)
        .bind(&version.sealed)
        .bind(version.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn local_versions(&self, secret: &str) -> Result<Vec<LocalVersionRecord>> {
        let rows = sqlx::query(
            "SELECT version_id, stage, sealed, created_at FROM local_secret_versions \
             WHERE secret_name = $1 ORDER BY created_at DESC, version_id DESC",
        )
        .bind(secret)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(LocalVersionRecord {
                    version_id: row.try_get("version_id")?,
                    stage: row.try_get("stage")?,
                    sealed: row.try_get("sealed")?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Makes `version` current in one transaction: current -> previous, previous -> aged
    /// out, and nothing left pending. A no-op once done.
    pub async fn promote_local_version(&self, secret: &str, version: &str) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let stage: Option<String> = sqlx::query(
            "SELECT stage FROM local_secret_versions WHERE secret_name = $1 AND version_id = $2",
        )
        .bind(secret)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| row.try_get("stage"))
        .transpose()?;
        match stage.as_deref() {
            None => {
                return Err(StoreError::NotFound {
                    kind: "secret version",
                    id: version.to_string(),
                });
            }
            Some("current") => {}
            Some(_) => {
                for (sql, bind_version) in [
                    (
                        "UPDATE local_secret_versions SET stage = '' WHERE secret_name = $1 AND stage = 'previous'",
                        false,
                    ),
                    (
                        "UPDATE local_secret_versions SET stage = 'previous' WHERE secret_name = $1 AND stage = 'current'",
                        false,
                    ),
                    (
                        "UPDATE local_secret_versions SET stage = 'current' WHERE secret_name = $1 AND version_id = $2",
                        true,
                    ),
                ] {
                    let query = sqlx::query(sql).bind(secret);
                    let query = if bind_version {
                        query.bind(version)
                    } else {
                        query
                    };
                    query.execute(&mut *tx).await?;
                }
            }
        }
        sqlx::query(
            "UPDATE local_secret_versions SET stage = '' WHERE secret_name = $1 AND stage = 'pending'",
        )
        .bind(secret)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// `ON CONFLICT DO NOTHING` without a target covers the partial unique indexes on
/// unfinished jobs and schedule slots, on both backends.
fn insert_job_query(job: &JobRecord) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments> {
    sqlx::query(
        "INSERT INTO rotation_jobs (token, secret_name, state, username, trigger_kind, attempts, last_error, \
         created_at, updated_at, finished_at, scheduled_for, claimed_by, claim_expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT DO NOTHING",
    )
    .bind(&job.token)
    .bind(&job.secret_name)
    .bind(job.state.as_str())
    .bind(&job.username)
    .bind(job.trigger_kind.as_str())
    .bind(job.attempts)
    .bind(&job.last_error)
    .bind(job.created_at)
    .bind(job.updated_at)
    .bind(job.finished_at)
    .bind(job.scheduled_for)
    .bind(&job.claimed_by)
    .bind(job.claim_expires_at)
}

fn secret_from_row(row: &AnyRow) -> Result<SecretRecord> {
    Ok(SecretRecord {
        name: row.try_get("name")?,
        spec_sealed: row.try_get("spec_sealed")?,
        source: row.try_get("source")?,
        next_run_at: row.try_get("next_run_at")?,
        last_run_at: row.try_get("last_run_at")?,
        last_outcome: row.try_get("last_outcome")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn job_from_row(row: &AnyRow) -> Result<JobRecord> {
    Ok(JobRecord {
        token: row.try_get("token")?,
        secret_name: row.try_get("secret_name")?,
        state: row.try_get::<String, _>("state")?.parse()?,
        username: row.try_get("username")?,
        trigger_kind: row.try_get::<String, _>("trigger_kind")?.parse()?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
        scheduled_for: row.try_get("scheduled_for")?,
        claimed_by: row.try_get("claimed_by")?,
        claim_expires_at: row.try_get("claim_expires_at")?,
    })
}
