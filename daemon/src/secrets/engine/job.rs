//! The rotation job state machine: a persisted job of four idempotent steps, claimed by
//! one daemon at a time, resumed after a crash, retried with backoff, audited step by step.

use super::*;
use crate::store::{JobState, TriggerKind};

impl RotationEngine {
    /// Rotates now and waits for the outcome. Any daemon may do this, leader or not: the
    /// datastore refuses a second unfinished rotation of a secret, whichever daemon runs
    /// the first.
    pub async fn rotate_now(
        self: &Arc<Self>,
        name: &str,
        trigger: TriggerKind,
    ) -> Result<Outcome, EngineError> {
        let runtime = self.fresh_runtime(name).await?;
        let job = self.new_job(&runtime, trigger, None).await?;
        if !self.datastore.insert_job(&job).await? {
            return Err(EngineError::Busy(name.to_string()));
        }
        let token = job.token.clone();
        if !self.track(&token) {
            return Err(EngineError::Internal(format!(
                "job {token} is already running"
            )));
        }
        let engine = self.clone();
        let handle = tokio::spawn(async move { engine.run_job(job).await });
        handle
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        Ok(Outcome {
            job: self.datastore.get_job(&token).await?,
        })
    }

    /// A new job, claimed by this daemon; recording it is the caller's.
    pub(super) async fn new_job(
        &self,
        runtime: &SecretRuntime,
        trigger: TriggerKind,
        scheduled_for: Option<i64>,
    ) -> Result<JobRecord, EngineError> {
        self.adopt_unmanaged(runtime, true).await?;
        let username = self.next_username(runtime).await?;
        let now = self.clock.now();
        Ok(JobRecord {
            token: new_token(),
            secret_name: runtime.spec.name.clone(),
            state: JobState::Created,
            username,
            trigger_kind: trigger,
            attempts: 0,
            last_error: String::new(),
            created_at: unix(now),
            updated_at: unix(now),
            finished_at: None,
            scheduled_for,
            claimed_by: self.lease.holder.clone(),
            claim_expires_at: unix_ms(now + self.lease.ttl),
        })
    }

    /// Brings a secret that exists outside Mayfly under it: a Vault KV secret without
    /// Mayfly's markers gets its newest value recorded as current; an AWS secret's
    /// AWSCURRENT (or any store's current version) that no rotation of Mayfly's wrote is
    /// taken as it is. Either way the audit trail says `secret.adopt`, naming the version,
    /// and the rotation then proceeds from that value.
    /// `foreign_current`: also record a current version no rotation of Mayfly's wrote (once
    /// per job, when it is created).
    pub(super) async fn adopt_unmanaged(
        &self,
        runtime: &SecretRuntime,
        foreign_current: bool,
    ) -> Result<(), EngineError> {
        let name = &runtime.spec.name;
        let (token, detail) = match runtime.store.get_current().await? {
            Some((token, _)) => {
                let ours = token.starts_with("initial-")
                    || token.starts_with("adopted-")
                    || self.datastore.get_job(&token).await.is_ok();
                if ours || !foreign_current {
                    return Ok(());
                }
                (
                    token.clone(),
                    format!("current version {token}, written outside Mayfly"),
                )
            }
            None => match runtime.store.adopt().await? {
                Some(adopted) => (adopted.token, adopted.detail),
                None => return Ok(()),
            },
        };
        tracing::info!(secret = %name, version = %token, %detail, "adopted a value written outside Mayfly as the current version");
        self.audit.note(
            Event::new(&crate::audit::Actor::Daemon, "secret.adopt", name)
                .scope(format!("version {token}"))
                .reason(detail),
        );
        Ok(())
    }

    /// Alternating users: the new version goes to the user the current one does not use,
    /// so logins with the current value keep working throughout.
    pub(super) async fn next_username(
        &self,
        runtime: &SecretRuntime,
    ) -> Result<String, EngineError> {
        let users = &runtime.spec.users;
        match runtime.spec.strategy {
            Strategy::SingleUser => Ok(users.first().cloned().unwrap_or_default()),
            Strategy::AlternatingUsers => {
                let current = runtime.store.get_current().await?;
                Ok(match current {
                    Some((_, cred)) if cred.username == users[0] => users[1].clone(),
                    _ => users[0].clone(),
                })
            }
        }
    }

    /// Marks a job as running here; false if it already is.
    pub(super) fn track(&self, token: &str) -> bool {
        lock(&self.running).insert(token.to_string())
    }

    pub(super) fn spawn_job(self: &Arc<Self>, job: JobRecord) {
        if !self.track(&job.token) {
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move { engine.run_job(job).await });
    }

    /// Starts the unfinished jobs this daemon may run and is not running: its own claims
    /// only (at start-up), or also those whose claim has lapsed (the leader, each renewal).
    pub(super) async fn resume(self: &Arc<Self>, orphans_too: bool) {
        let now = unix_ms(self.clock.now());
        let jobs = match self.datastore.resumable_jobs(&self.lease.holder, now).await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::error!(error = %e, "could not read unfinished rotations");
                return;
            }
        };
        for job in jobs {
            if !orphans_too && job.claimed_by != self.lease.holder {
                continue;
            }
            if lock(&self.running).contains(&job.token) {
                continue;
            }
            tracing::info!(secret = %job.secret_name, job = %job.token, state = %job.state, previous_holder = %job.claimed_by, "resuming an unfinished rotation");
            self.spawn_job(job);
        }
    }

    /// Claims (or renews the claim on) a job for this daemon.
    pub(super) async fn claim(&self, token: &str) -> bool {
        let now = self.clock.now();
        match self
            .datastore
            .claim_job(
                token,
                &self.lease.holder,
                unix_ms(now),
                unix_ms(now + self.lease.ttl),
            )
            .await
        {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(job = %token, "another daemon runs this rotation now; leaving it to that one");
                false
            }
            Err(e) => {
                tracing::error!(job = %token, error = %e, "could not renew the claim on a rotation; leaving it for whichever daemon claims it next");
                false
            }
        }
    }

    /// Runs `work` while renewing the job's claim; `None` when the claim was lost (the
    /// work is dropped then: every step is idempotent, and another daemon redoes it).
    pub(super) async fn while_claimed<F: Future>(&self, token: &str, work: F) -> Option<F::Output> {
        tokio::pin!(work);
        let mut renew = tokio::time::interval(self.lease.renewal);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        loop {
            tokio::select! {
                output = &mut work => return Some(output),
                _ = renew.tick() => {
                    if !self.claim(token).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Records progress; false when another daemon has taken the job over.
    pub(super) async fn record_progress(&self, job: &JobRecord) -> bool {
        match self.datastore.update_job(job, &self.lease.holder).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(job = %job.token, "another daemon took this rotation over; stopping here");
                false
            }
            Err(e) => {
                tracing::error!(job = %job.token, error = %e, "could not record rotation progress");
                true
            }
        }
    }

    /// Runs a job from whatever state it is in to promoted or failed, as long as this
    /// daemon holds its claim. The caller has `track`ed it.
    pub(super) async fn run_job(self: Arc<Self>, mut job: JobRecord) {
        let _running = RunningJob {
            engine: &self,
            token: job.token.clone(),
        };
        let _slot = self.slots.clone().acquire_owned().await;
        let name = job.secret_name.clone();
        let runtime = match self.runtime(&name).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(secret = %name, job = %job.token, error = %e, "rotation for a secret that cannot be loaded");
                return;
            }
        };
        let max = i64::from(runtime.spec.max_attempts);
        let mut step_attempts = 0i64;
        while !job.state.is_finished() {
            if !self.claim(&job.token).await {
                return;
            }
            let Some(result) = self
                .while_claimed(&job.token, self.step(&runtime, &job))
                .await
            else {
                return;
            };
            match result {
                Ok(next) => {
                    job.state = next;
                    job.updated_at = unix(self.clock.now());
                    job.last_error.clear();
                    step_attempts = 0;
                    if job.state == JobState::Promoted {
                        job.finished_at = Some(job.updated_at);
                    }
                    if !self.record_progress(&job).await {
                        return;
                    }
                    tracing::info!(secret = %name, job = %job.token, state = %job.state, "rotation step done");
                    self.audit_step(&job, crate::audit::OK, "");
                    crash_point(job.state);
                }
                Err(e) => {
                    job.attempts += 1;
                    step_attempts += 1;
                    job.last_error = e.to_string();
                    job.updated_at = unix(self.clock.now());
                    if step_attempts >= max {
                        job.state = JobState::Failed;
                        job.finished_at = Some(job.updated_at);
                        tracing::error!(secret = %name, job = %job.token, error = %job.last_error, "rotation failed; the current version is untouched");
                        self.audit_step(&job, crate::audit::FAILED, &job.last_error);
                    } else {
                        self.metrics.step_retried();
                        tracing::warn!(secret = %name, job = %job.token, attempt = step_attempts, error = %job.last_error, "rotation step failed; retrying");
                    }
                    if !self.record_progress(&job).await {
                        return;
                    }
                    if job.state != JobState::Failed {
                        let delay = self.retry_base * 2u32.pow(step_attempts.min(6) as u32 - 1);
                        let backoff = tokio::time::sleep(delay.min(Duration::from_secs(60)));
                        if self.while_claimed(&job.token, backoff).await.is_none() {
                            return;
                        }
                    }
                }
            }
        }
        let (outcome, counted) = if job.state == JobState::Promoted {
            (format!("promoted {}", job.token), RotationOutcome::Promoted)
        } else {
            (
                format!("failed: {}", job.last_error),
                RotationOutcome::Failed,
            )
        };
        self.metrics.rotation_finished(&name, counted);
        if let Err(e) = self
            .datastore
            .record_secret_outcome(&name, &outcome, unix(self.clock.now()))
            .await
        {
            tracing::error!(secret = %name, error = %e, "could not record the rotation outcome");
        }
        if job.state == JobState::Promoted {
            self.announce(&name).await;
            // The other daemons on the datastore tell their agents.
            self.datastore
                .announce(&crate::cluster::Notice::Secret { name: name.clone() })
                .await;
        }
    }

    /// Takes up what another daemon on the datastore did to secret `name`: a definition
    /// added, changed or deleted there is loaded (or dropped) here, so the agents here
    /// see its grants at once; a version promoted there is pushed by the sync streams here
    /// to the agents it is granted to.
    pub async fn take_promotion(&self, name: &str) {
        match self.datastore.get_secret(name).await {
            Ok(record) => {
                if let Err(e) = self.load(&record).await {
                    tracing::error!(secret = %name, error = %e, "could not load a secret definition made on another daemon");
                }
            }
            Err(crate::store::StoreError::NotFound { .. }) => self.drop_loaded(name),
            Err(e) => {
                tracing::error!(secret = %name, error = %e, "could not read a secret another daemon changed");
            }
        }
        // Its schedule may be this daemon's to run.
        self.wake.notify_one();
        self.announce(name).await;
    }

    /// Tells the sync streams of a promoted version, with its value read once for all.
    async fn announce(&self, name: &str) {
        match self.promoted(name).await {
            Ok(Some(value)) => {
                let _ = self.promoted.send(value);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(secret = %name, error = %e, "could not read a promoted version to push it to agents");
            }
        }
    }

    /// One record per rotation step: the state reached (or `failed`), by whom it was set
    /// off. Never the value.
    pub(super) fn audit_step(&self, job: &JobRecord, outcome: &str, why: &str) {
        let actor = if job.trigger_kind == TriggerKind::Schedule {
            Actor::Scheduler
        } else {
            Actor::Daemon
        };
        self.audit.note(
            Event::new(&actor, &format!("rotation.{}", job.state), &job.secret_name)
                .scope(format!(
                    "job {} user {} trigger {}",
                    job.token, job.username, job.trigger_kind
                ))
                .outcome(outcome)
                .reason(why),
        );
    }

    /// One idempotent step from `job.state`; returns the next state.
    pub(super) async fn step(
        &self,
        runtime: &SecretRuntime,
        job: &JobRecord,
    ) -> Result<JobState, EngineError> {
        match job.state {
            JobState::Created => {
                if runtime.store.get_version(&job.token).await?.is_none() {
                    // A job resumed after a crash may not have marked an adopted value.
                    self.adopt_unmanaged(runtime, false).await?;
                    let value = Credential {
                        username: job.username.clone(),
                        password: runtime.spec.generator.generate()?,
                    };
                    runtime.store.put_pending(&job.token, &value).await?;
                }
                Ok(JobState::PendingStored)
            }
            JobState::PendingStored => {
                let value = self.pending_value(runtime, job).await?;
                runtime.target.set(&value).await?;
                Ok(JobState::TargetSet)
            }
            JobState::TargetSet => {
                let value = self.pending_value(runtime, job).await?;
                runtime.target.test(&value).await?;
                Ok(JobState::Tested)
            }
            JobState::Tested => {
                runtime.store.promote(&job.token).await?;
                Ok(JobState::Promoted)
            }
            finished @ (JobState::Promoted | JobState::Failed) => Err(EngineError::Internal(
                format!("job already {finished}: no step left"),
            )),
        }
    }

    pub(super) async fn pending_value(
        &self,
        runtime: &SecretRuntime,
        job: &JobRecord,
    ) -> Result<Credential, EngineError> {
        runtime
            .store
            .get_version(&job.token)
            .await?
            .ok_or_else(|| EngineError::Store(SecretStoreError::VersionNotFound(job.token.clone())))
    }
}
