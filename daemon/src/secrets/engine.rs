//! The rotation engine: persisted jobs of four idempotent steps (store the pending
//! version, set it on the target, log in with it, promote it), resumed after a crash,
//! retried with backoff, never promoting an untested value; and the scheduler that
//! starts them.
//!
//! Several daemons may share one datastore. The one holding the scheduler lease starts
//! scheduled rotations and picks up jobs whose daemon went away; each job is claimed by the
//! daemon running it, and the datastore admits one unfinished job per secret and one job
//! per schedule slot, so no two daemons ever rotate one secret at once.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, Semaphore, broadcast};

use mayfly_common::clock::Clock;

use super::local::SealingKey;
use super::runtime::{EngineError, SecretRuntime};
use super::spec::{SecretSpec, Strategy};
use super::{Credential, SecretStoreError};
use crate::audit::{Actor, Audit, Event};
use crate::metrics::{Metrics, RotationOutcome};
use crate::store::{JobRecord, ScheduledStart, SecretRecord, Store, StoreError};
use mayfly_common::clock::{unix, unix_ms};

/// The steps a job passes through, in order; each name is the state after that step.
pub const STEPS: [&str; 4] = ["pending_stored", "target_set", "tested", "promoted"];

/// The lease whose holder runs the scheduler.
pub const SCHEDULER_LEASE: &str = "rotation-scheduler";

/// Told to agents (and anyone else listening) when a new version becomes current.
#[derive(Debug, Clone)]
pub struct Promoted {
    pub secret: String,
    pub version: String,
}

/// What a finished rotation reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub job: JobRecord,
}

/// How this daemon takes part in sharing a datastore with others.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// The name this daemon holds leases and job claims under.
    pub holder: String,
    /// How long a lease or claim holds without renewal.
    pub ttl: Duration,
    /// How often they are renewed.
    pub renewal: Duration,
}

pub struct RotationEngine {
    datastore: Store,
    key: Arc<SealingKey>,
    /// Secrets as built from their stored definitions; the sealed definition tells when
    /// another daemon has changed one.
    secrets: Mutex<HashMap<String, Loaded>>,
    /// Tokens of the jobs this daemon is running now.
    running: Mutex<HashSet<String>>,
    wake: Notify,
    slots: Arc<Semaphore>,
    promoted: broadcast::Sender<Promoted>,
    retry_base: Duration,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    lease: LeaseSettings,
    /// Until when this daemon's scheduler lease holds, when it holds one.
    leader_until: Mutex<Option<SystemTime>>,
    stopping: AtomicBool,
    audit: Audit,
}

#[derive(Clone)]
struct Loaded {
    sealed: Vec<u8>,
    runtime: Arc<SecretRuntime>,
}

/// Removes a job from `running` however its task ends.
struct RunningJob<'a> {
    engine: &'a RotationEngine,
    token: String,
}

impl Drop for RunningJob<'_> {
    fn drop(&mut self) {
        lock(&self.engine.running).remove(&self.token);
    }
}

impl RotationEngine {
    /// Loads every secret (daemon.toml's replace their stored copies), resumes the
    /// unfinished jobs this daemon had claimed, and starts the lease and the scheduler.
    /// Scheduled rotations run only while this daemon holds the scheduler lease.
    pub async fn start(
        datastore: Store,
        key: Arc<SealingKey>,
        configured: &[SecretSpec],
        lease: LeaseSettings,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        audit: Audit,
    ) -> Result<Arc<Self>, EngineError> {
        let engine = Arc::new(Self {
            datastore: datastore.clone(),
            key,
            secrets: Mutex::new(HashMap::new()),
            running: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            slots: Arc::new(Semaphore::new(32)),
            promoted: broadcast::channel(1024).0,
            retry_base: retry_base(),
            clock,
            metrics,
            lease,
            leader_until: Mutex::new(None),
            stopping: AtomicBool::new(false),
            audit,
        });
        for spec in configured {
            engine.save_spec(spec, "config").await?;
        }
        for record in datastore.list_secrets().await? {
            engine.load(&record).await?;
        }
        engine.resume(false).await;
        let leasing = engine.clone();
        tokio::spawn(async move { leasing.lease_loop().await });
        let scheduler = engine.clone();
        tokio::spawn(async move { scheduler.schedule_loop().await });
        Ok(engine)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Promoted> {
        self.promoted.subscribe()
    }

    /// Whether this daemon runs the scheduler now.
    pub fn is_leader(&self) -> bool {
        lock(&self.leader_until).is_some_and(|until| self.clock.now() < until)
    }

    /// Gives the scheduler lease up on shutdown, so another daemon takes over at once
    /// instead of after `lease_ttl`. Jobs still running keep their claims until they lapse.
    pub async fn step_down(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        *lock(&self.leader_until) = None;
        self.metrics.set_scheduler_leader(false);
        if let Err(e) = self
            .datastore
            .release_lease(SCHEDULER_LEASE, &self.lease.holder)
            .await
        {
            tracing::warn!(error = %e, "could not release the scheduler lease; it lapses by itself");
        }
    }

    fn loaded(&self, name: &str) -> Option<Arc<SecretRuntime>> {
        lock(&self.secrets).get(name).map(|l| l.runtime.clone())
    }

    /// The secret's runtime; one defined through another daemon is loaded from the store.
    async fn runtime(&self, name: &str) -> Result<Arc<SecretRuntime>, EngineError> {
        match self.loaded(name) {
            Some(runtime) => Ok(runtime),
            None => self.fresh_runtime(name).await,
        }
    }

    /// The runtime for the secret's stored definition, rebuilt if it has changed.
    async fn fresh_runtime(&self, name: &str) -> Result<Arc<SecretRuntime>, EngineError> {
        let record = self.datastore.get_secret(name).await?;
        self.load(&record).await
    }

    /// Builds (or keeps) the runtime for `record`.
    async fn load(&self, record: &SecretRecord) -> Result<Arc<SecretRuntime>, EngineError> {
        if let Some(loaded) = lock(&self.secrets).get(&record.name)
            && loaded.sealed == record.spec_sealed
        {
            return Ok(loaded.runtime.clone());
        }
        let spec = self.open_spec(record)?;
        let runtime = Arc::new(SecretRuntime::build(spec, &self.datastore, &self.key).await?);
        lock(&self.secrets).insert(
            record.name.clone(),
            Loaded {
                sealed: record.spec_sealed.clone(),
                runtime: runtime.clone(),
            },
        );
        Ok(runtime)
    }

    /// Brings the loaded secrets in line with the store: other daemons may have added,
    /// changed or deleted some.
    async fn refresh(&self, records: &HashMap<String, SecretRecord>) {
        for record in records.values() {
            if let Err(e) = self.load(record).await {
                tracing::error!(secret = %record.name, error = %e, "could not load a secret definition");
            }
        }
        lock(&self.secrets).retain(|name, _| records.contains_key(name));
    }

    /// Stores a definition; returns the sealed form that was stored.
    async fn save_spec(&self, spec: &SecretSpec, source: &str) -> Result<Vec<u8>, EngineError> {
        spec.check()?;
        let json = serde_json::to_vec(spec).map_err(|e| EngineError::Internal(e.to_string()))?;
        let sealed = self
            .key
            .seal(&format!("mayfly-spec\0{}", spec.name), &json)
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let now = unix(self.clock.now());
        let existing = self.datastore.get_secret(&spec.name).await.ok();
        self.datastore
            .upsert_secret(&SecretRecord {
                name: spec.name.clone(),
                spec_sealed: sealed.clone(),
                source: source.to_string(),
                next_run_at: None,
                last_run_at: existing.as_ref().and_then(|r| r.last_run_at),
                last_outcome: existing
                    .map(|r| r.last_outcome)
                    .unwrap_or_else(|| "never run".into()),
                created_at: now,
                updated_at: now,
            })
            .await?;
        Ok(sealed)
    }

    fn open_spec(&self, record: &SecretRecord) -> Result<SecretSpec, EngineError> {
        let json = self
            .key
            .open(
                &format!("mayfly-spec\0{}", record.name),
                &record.spec_sealed,
            )
            .map_err(|e| EngineError::Internal(format!("secret {}: {e}", record.name)))?;
        serde_json::from_slice(&json)
            .map_err(|e| EngineError::Internal(format!("secret {}: {e}", record.name)))
    }

    /// Adds (or replaces) a secret defined through the admin API.
    pub async fn create(&self, spec: SecretSpec) -> Result<(), EngineError> {
        if let Ok(existing) = self.datastore.get_secret(&spec.name).await
            && existing.source == "config"
        {
            return Err(EngineError::Conflict(format!(
                "secret {} is defined in daemon.toml; change it there",
                spec.name
            )));
        }
        let runtime = SecretRuntime::build(spec.clone(), &self.datastore, &self.key).await?;
        let sealed = self.save_spec(&spec, "api").await?;
        lock(&self.secrets).insert(
            spec.name.clone(),
            Loaded {
                sealed,
                runtime: Arc::new(runtime),
            },
        );
        self.wake.notify_one();
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> Result<(), EngineError> {
        self.runtime(name).await?;
        self.datastore.delete_secret(name).await?;
        lock(&self.secrets).remove(name);
        Ok(())
    }

    pub fn specs(&self) -> Vec<SecretSpec> {
        let mut specs: Vec<_> = lock(&self.secrets)
            .values()
            .map(|l| l.runtime.spec.clone())
            .collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        specs
    }

    pub async fn spec(&self, name: &str) -> Result<SecretSpec, EngineError> {
        Ok(self.runtime(name).await?.spec.clone())
    }

    pub async fn record(&self, name: &str) -> Result<SecretRecord, EngineError> {
        Ok(self.datastore.get_secret(name).await?)
    }

    pub async fn jobs(&self, name: &str, limit: i64) -> Result<Vec<JobRecord>, EngineError> {
        Ok(self.datastore.jobs_for_secret(name, limit).await?)
    }

    pub async fn versions(&self, name: &str) -> Result<Vec<super::VersionInfo>, EngineError> {
        Ok(self.runtime(name).await?.store.versions().await?)
    }

    /// The current value, for an operator (`mayflyd secret get`) or an agent push.
    pub async fn current(&self, name: &str) -> Result<Option<(String, Credential)>, EngineError> {
        Ok(self.runtime(name).await?.store.get_current().await?)
    }

    /// Rotates now and waits for the outcome. Any daemon may do this, leader or not: the
    /// datastore refuses a second unfinished rotation of a secret, whichever daemon runs
    /// the first.
    pub async fn rotate_now(
        self: &Arc<Self>,
        name: &str,
        trigger: &str,
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
    async fn new_job(
        &self,
        runtime: &SecretRuntime,
        trigger: &str,
        scheduled_for: Option<i64>,
    ) -> Result<JobRecord, EngineError> {
        let username = self.next_username(runtime).await?;
        let now = self.clock.now();
        Ok(JobRecord {
            token: new_token(),
            secret_name: runtime.spec.name.clone(),
            state: "created".into(),
            username,
            trigger_kind: trigger.to_string(),
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

    /// Alternating users: the new version goes to the user the current one does not use,
    /// so logins with the current value keep working throughout.
    async fn next_username(&self, runtime: &SecretRuntime) -> Result<String, EngineError> {
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
    fn track(&self, token: &str) -> bool {
        lock(&self.running).insert(token.to_string())
    }

    fn spawn_job(self: &Arc<Self>, job: JobRecord) {
        if !self.track(&job.token) {
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move { engine.run_job(job).await });
    }

    /// Starts the unfinished jobs this daemon may run and is not running: its own claims
    /// only (at start-up), or also those whose claim has lapsed (the leader, each renewal).
    async fn resume(self: &Arc<Self>, orphans_too: bool) {
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
    async fn claim(&self, token: &str) -> bool {
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
    async fn while_claimed<F: Future>(&self, token: &str, work: F) -> Option<F::Output> {
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
    async fn record_progress(&self, job: &JobRecord) -> bool {
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
    async fn run_job(self: Arc<Self>, mut job: JobRecord) {
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
        while job.state != "promoted" && job.state != "failed" {
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
                    job.state = next.to_string();
                    job.updated_at = unix(self.clock.now());
                    job.last_error.clear();
                    step_attempts = 0;
                    if job.state == "promoted" {
                        job.finished_at = Some(job.updated_at);
                    }
                    if !self.record_progress(&job).await {
                        return;
                    }
                    tracing::info!(secret = %name, job = %job.token, state = %job.state, "rotation step done");
                    self.audit_step(&job, crate::audit::OK, "");
                    crash_point(&job.state);
                }
                Err(e) => {
                    job.attempts += 1;
                    step_attempts += 1;
                    job.last_error = e.to_string();
                    job.updated_at = unix(self.clock.now());
                    if step_attempts >= max {
                        job.state = "failed".into();
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
                    if job.state != "failed" {
                        let delay = self.retry_base * 2u32.pow(step_attempts.min(6) as u32 - 1);
                        let backoff = tokio::time::sleep(delay.min(Duration::from_secs(60)));
                        if self.while_claimed(&job.token, backoff).await.is_none() {
                            return;
                        }
                    }
                }
            }
        }
        let (outcome, counted) = if job.state == "promoted" {
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
        if job.state == "promoted" {
            let _ = self.promoted.send(Promoted {
                secret: name,
                version: job.token.clone(),
            });
        }
    }

    /// One record per rotation step: the state reached (or `failed`), by whom it was set
    /// off. Never the value.
    fn audit_step(&self, job: &JobRecord, outcome: &str, why: &str) {
        let actor = if job.trigger_kind == "schedule" {
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
    async fn step(
        &self,
        runtime: &SecretRuntime,
        job: &JobRecord,
    ) -> Result<&'static str, EngineError> {
        match job.state.as_str() {
            "created" => {
                if runtime.store.get_version(&job.token).await?.is_none() {
                    let value = Credential {
                        username: job.username.clone(),
                        password: runtime.spec.generator.generate()?,
                    };
                    runtime.store.put_pending(&job.token, &value).await?;
                }
                Ok("pending_stored")
            }
            "pending_stored" => {
                let value = self.pending_value(runtime, job).await?;
                runtime.target.set(&value).await?;
                Ok("target_set")
            }
            "target_set" => {
                let value = self.pending_value(runtime, job).await?;
                runtime.target.test(&value).await?;
                Ok("tested")
            }
            "tested" => {
                runtime.store.promote(&job.token).await?;
                Ok("promoted")
            }
            other => Err(EngineError::Internal(format!(
                "job in unknown state {other}"
            ))),
        }
    }

    async fn pending_value(
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

    /// Takes, renews or loses the scheduler lease every `renewal`; the holder also picks
    /// up jobs whose daemon went away.
    async fn lease_loop(self: Arc<Self>) {
        let mut timer = tokio::time::interval(self.lease.renewal);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            timer.tick().await;
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            self.renew_lease().await;
        }
    }

    async fn renew_lease(self: &Arc<Self>) {
        let now = self.clock.now();
        let until = now + self.lease.ttl;
        let was_leader = self.is_leader();
        let holder = &self.lease.holder;
        match self
            .datastore
            .acquire_lease(SCHEDULER_LEASE, holder, unix_ms(now), unix_ms(until))
            .await
        {
            Ok(true) => {
                *lock(&self.leader_until) = Some(until);
                if !was_leader {
                    tracing::info!(holder = %holder, "holding the scheduler lease: this daemon runs scheduled rotations");
                }
                self.resume(true).await;
            }
            Ok(false) => {
                *lock(&self.leader_until) = None;
                if was_leader {
                    tracing::warn!(holder = %holder, "lost the scheduler lease to another daemon");
                }
            }
            Err(e) => {
                // Keep what we hold: it lapses by itself at `leader_until`.
                tracing::error!(error = %e, "could not renew the scheduler lease");
            }
        }
        self.metrics.set_scheduler_leader(self.is_leader());
        self.wake.notify_one();
    }

    /// Keeps the loaded secrets in step with the store and, while this daemon holds the
    /// scheduler lease, starts due rotations; sleeps until the next one, a renewal, or a
    /// secret being added here.
    async fn schedule_loop(self: Arc<Self>) {
        loop {
            let mut next_wake: Option<SystemTime> = None;
            // One read of every schedule per wake, not one per secret.
            let records: HashMap<String, SecretRecord> = match self.datastore.list_secrets().await {
                Ok(list) => {
                    let records = list.into_iter().map(|r| (r.name.clone(), r)).collect();
                    self.refresh(&records).await;
                    records
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not read the rotation schedules");
                    HashMap::new()
                }
            };
            let now = self.clock.now();
            if self.is_leader() {
                for record in records.values() {
                    if let Some(at) = self.schedule_one(record, now).await {
                        next_wake = Some(next_wake.map_or(at, |w| w.min(at)));
                    }
                }
            }
            let sleep = next_wake
                .and_then(|w| w.duration_since(self.clock.now()).ok())
                .unwrap_or(Duration::from_secs(60))
                .min(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Starts the secret's rotation if it is due; returns when it is due next.
    async fn schedule_one(
        self: &Arc<Self>,
        record: &SecretRecord,
        now: SystemTime,
    ) -> Option<SystemTime> {
        let name = &record.name;
        let runtime = self.loaded(name)?;
        let due = match record.next_run_at {
            Some(at) => at,
            None => {
                let last = record
                    .last_run_at
                    .map(|t| std::time::UNIX_EPOCH + Duration::from_secs(t as u64));
                let next = runtime.schedule.next_run(last, now)?;
                let at = unix_ms(next);
                if let Err(e) = self.datastore.set_secret_schedule(name, Some(at)).await {
                    tracing::error!(secret = %name, error = %e, "could not record the next rotation time");
                }
                at
            }
        };
        let due_time = std::time::UNIX_EPOCH + Duration::from_millis(due.max(0) as u64);
        if due_time > now {
            return Some(due_time);
        }
        let following = runtime.schedule.next_run(Some(now), now);
        let job = match self.new_job(&runtime, "schedule", Some(due)).await {
            Ok(job) => job,
            Err(e) => {
                tracing::error!(secret = %name, error = %e, "could not start a scheduled rotation");
                return following;
            }
        };
        match self
            .datastore
            .start_scheduled_job(&job, due, following.map(unix_ms))
            .await
        {
            Ok(ScheduledStart::Started) => self.spawn_job(job),
            Ok(ScheduledStart::Busy) => {
                tracing::info!(secret = %name, "skipping a scheduled rotation: another rotation of this secret is unfinished")
            }
            Ok(ScheduledStart::Taken) => {
                tracing::debug!(secret = %name, "this schedule slot was taken by another daemon")
            }
            Err(e) => {
                tracing::error!(secret = %name, error = %e, "could not start a scheduled rotation")
            }
        }
        following
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Rotation tokens: 40 random hex characters (AWS and moto want 32–64).
fn new_token() -> String {
    let mut raw = [0u8; 20];
    rand::fill(&mut raw);
    hex::encode(raw)
}

/// Delay before the first retry of a failed step; `MAYFLY_ROTATION_RETRY_MS` shortens it
/// for tests.
fn retry_base() -> Duration {
    std::env::var("MAYFLY_ROTATION_RETRY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(2))
}

/// Crash-safety tests set `MAYFLY_TEST_CRASH_AFTER=<state>` to have the daemon SIGKILL
/// itself right after a step is recorded, the harshest moment to die.
fn crash_point(state: &str) {
    if std::env::var("MAYFLY_TEST_CRASH_AFTER").is_ok_and(|s| s == state) {
        tracing::warn!(state, "MAYFLY_TEST_CRASH_AFTER: killing the daemon now");
        // SAFETY: sending SIGKILL to ourselves has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { kind: "secret", id } => EngineError::UnknownSecret(id),
            other => EngineError::Datastore(other.to_string()),
        }
    }
}
