//! The rotation engine: persisted jobs of four idempotent steps (store the pending
//! version, set it on the target, log in with it, promote it), resumed after a crash,
//! retried with backoff, never promoting an untested value; and the scheduler that
//! starts them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, Semaphore, broadcast};

use super::local::SealingKey;
use super::runtime::{EngineError, SecretRuntime};
use super::spec::{SecretSpec, Strategy};
use super::{Credential, SecretStoreError};
use crate::ca::manager::unix;
use crate::store::{JobRecord, SecretRecord, Store, StoreError};

/// The steps a job passes through, in order; each name is the state after that step.
pub const STEPS: [&str; 4] = ["pending_stored", "target_set", "tested", "promoted"];

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

pub struct RotationEngine {
    datastore: Store,
    key: Arc<SealingKey>,
    secrets: Mutex<HashMap<String, Arc<SecretRuntime>>>,
    in_flight: Mutex<HashSet<String>>,
    wake: Notify,
    slots: Arc<Semaphore>,
    promoted: broadcast::Sender<Promoted>,
    retry_base: Duration,
}

impl RotationEngine {
    /// Loads every secret (daemon.toml's replace their stored copies), resumes unfinished
    /// jobs, and starts the scheduler.
    pub async fn start(
        datastore: Store,
        key: Arc<SealingKey>,
        configured: &[SecretSpec],
    ) -> Result<Arc<Self>, EngineError> {
        let engine = Arc::new(Self {
            datastore: datastore.clone(),
            key,
            secrets: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            slots: Arc::new(Semaphore::new(32)),
            promoted: broadcast::channel(1024).0,
            retry_base: retry_base(),
        });
        for spec in configured {
            engine.save_spec(spec, "config").await?;
        }
        for record in datastore.list_secrets().await? {
            let spec = engine.open_spec(&record)?;
            let runtime = SecretRuntime::build(spec, &datastore, &engine.key).await?;
            engine
                .runtimes()
                .insert(record.name.clone(), Arc::new(runtime));
        }
        for job in datastore.unfinished_jobs().await? {
            tracing::info!(secret = %job.secret_name, job = %job.token, state = %job.state, "resuming an unfinished rotation");
            engine.spawn_job(job);
        }
        let scheduler = engine.clone();
        tokio::spawn(async move { scheduler.schedule_loop().await });
        Ok(engine)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Promoted> {
        self.promoted.subscribe()
    }

    fn runtimes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SecretRuntime>>> {
        self.secrets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runtime(&self, name: &str) -> Result<Arc<SecretRuntime>, EngineError> {
        self.runtimes()
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownSecret(name.to_string()))
    }

    async fn save_spec(&self, spec: &SecretSpec, source: &str) -> Result<(), EngineError> {
        spec.check()?;
        let json = serde_json::to_vec(spec).map_err(|e| EngineError::Internal(e.to_string()))?;
        let sealed = self
            .key
            .seal(&format!("mayfly-spec\0{}", spec.name), &json)
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let now = unix(SystemTime::now());
        let existing = self.datastore.get_secret(&spec.name).await.ok();
        self.datastore
            .upsert_secret(&SecretRecord {
                name: spec.name.clone(),
                spec_sealed: sealed,
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
        Ok(())
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
        self.save_spec(&spec, "api").await?;
        self.runtimes().insert(spec.name.clone(), Arc::new(runtime));
        self.wake.notify_one();
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> Result<(), EngineError> {
        self.runtime(name)?;
        self.datastore.delete_secret(name).await?;
        self.runtimes().remove(name);
        Ok(())
    }

    pub fn specs(&self) -> Vec<SecretSpec> {
        let mut specs: Vec<_> = self.runtimes().values().map(|r| r.spec.clone()).collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        specs
    }

    pub fn spec(&self, name: &str) -> Result<SecretSpec, EngineError> {
        Ok(self.runtime(name)?.spec.clone())
    }

    pub async fn record(&self, name: &str) -> Result<SecretRecord, EngineError> {
        Ok(self.datastore.get_secret(name).await?)
    }

    pub async fn jobs(&self, name: &str, limit: i64) -> Result<Vec<JobRecord>, EngineError> {
        Ok(self.datastore.jobs_for_secret(name, limit).await?)
    }

    pub async fn versions(&self, name: &str) -> Result<Vec<super::VersionInfo>, EngineError> {
        Ok(self.runtime(name)?.store.versions().await?)
    }

    /// The current value, for an operator (`mayflyd secret get`) or an agent push.
    pub async fn current(&self, name: &str) -> Result<Option<(String, Credential)>, EngineError> {
        Ok(self.runtime(name)?.store.get_current().await?)
    }

    /// Rotates now and waits for the outcome.
    pub async fn rotate_now(
        self: &Arc<Self>,
        name: &str,
        trigger: &str,
    ) -> Result<Outcome, EngineError> {
        let runtime = self.runtime(name)?;
        let job = self.new_job(&runtime, trigger).await?;
        let token = job.token.clone();
        let engine = self.clone();
        let handle = tokio::spawn(async move { engine.run_job(job).await });
        handle
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        Ok(Outcome {
            job: self.datastore.get_job(&token).await?,
        })
    }

    /// Persists a new job before anything else happens, so a crash leaves a record.
    async fn new_job(
        &self,
        runtime: &SecretRuntime,
        trigger: &str,
    ) -> Result<JobRecord, EngineError> {
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if !in_flight.insert(runtime.spec.name.clone()) {
                return Err(EngineError::Busy(runtime.spec.name.clone()));
            }
        }
        let username = match self.next_username(runtime).await {
            Ok(user) => user,
            Err(e) => {
                self.release(&runtime.spec.name);
                return Err(e);
            }
        };
        let now = unix(SystemTime::now());
        let job = JobRecord {
            token: new_token(),
            secret_name: runtime.spec.name.clone(),
            state: "created".into(),
            username,
            trigger_kind: trigger.to_string(),
            attempts: 0,
            last_error: String::new(),
            created_at: now,
            updated_at: now,
            finished_at: None,
        };
        if let Err(e) = self.datastore.insert_job(&job).await {
            self.release(&runtime.spec.name);
            return Err(e.into());
        }
        Ok(job)
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

    fn release(&self, name: &str) {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    fn spawn_job(self: &Arc<Self>, job: JobRecord) {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.secret_name.clone());
        let engine = self.clone();
        tokio::spawn(async move { engine.run_job(job).await });
    }

    /// Runs a job from whatever state it is in to promoted or failed.
    async fn run_job(self: Arc<Self>, mut job: JobRecord) {
        let _slot = self.slots.clone().acquire_owned().await;
        let name = job.secret_name.clone();
        let runtime = match self.runtime(&name) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(secret = %name, error = %e, "rotation for an unknown secret");
                self.release(&name);
                return;
            }
        };
        let max = i64::from(runtime.spec.max_attempts);
        let mut step_attempts = 0i64;
        while job.state != "promoted" && job.state != "failed" {
            match self.step(&runtime, &job).await {
                Ok(next) => {
                    job.state = next.to_string();
                    job.updated_at = unix(SystemTime::now());
                    job.last_error.clear();
                    step_attempts = 0;
                    if job.state == "promoted" {
                        job.finished_at = Some(job.updated_at);
                    }
                    if let Err(e) = self.datastore.update_job(&job).await {
                        tracing::error!(job = %job.token, error = %e, "could not record rotation progress");
                    }
                    tracing::info!(secret = %name, job = %job.token, state = %job.state, "rotation step done");
                    crash_point(&job.state);
                }
                Err(e) => {
                    job.attempts += 1;
                    step_attempts += 1;
                    job.last_error = e.to_string();
                    job.updated_at = unix(SystemTime::now());
                    if step_attempts >= max {
                        job.state = "failed".into();
                        job.finished_at = Some(job.updated_at);
                        tracing::error!(secret = %name, job = %job.token, error = %job.last_error, "rotation failed; the current version is untouched");
                    } else {
                        tracing::warn!(secret = %name, job = %job.token, attempt = step_attempts, error = %job.last_error, "rotation step failed; retrying");
                    }
                    if let Err(e) = self.datastore.update_job(&job).await {
                        tracing::error!(job = %job.token, error = %e, "could not record rotation failure");
                    }
                    if job.state != "failed" {
                        let delay = self.retry_base * 2u32.pow(step_attempts.min(6) as u32 - 1);
                        tokio::time::sleep(delay.min(Duration::from_secs(60))).await;
                    }
                }
            }
        }
        let outcome = if job.state == "promoted" {
            format!("promoted {}", job.token)
        } else {
            format!("failed: {}", job.last_error)
        };
        if let Err(e) = self
            .datastore
            .record_secret_outcome(&name, &outcome, unix(SystemTime::now()))
            .await
        {
            tracing::error!(secret = %name, error = %e, "could not record the rotation outcome");
        }
        self.release(&name);
        if job.state == "promoted" {
            let _ = self.promoted.send(Promoted {
                secret: name,
                version: job.token.clone(),
            });
        }
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

    /// Starts due rotations; sleeps until the next one or until a secret is added.
    async fn schedule_loop(self: Arc<Self>) {
        loop {
            let now = SystemTime::now();
            let mut next_wake: Option<SystemTime> = None;
            let runtimes: Vec<Arc<SecretRuntime>> = self.runtimes().values().cloned().collect();
            // One read of every schedule per wake, not one per secret.
            let records: HashMap<String, SecretRecord> = match self.datastore.list_secrets().await {
                Ok(list) => list.into_iter().map(|r| (r.name.clone(), r)).collect(),
                Err(e) => {
                    tracing::error!(error = %e, "could not read the rotation schedules");
                    HashMap::new()
                }
            };
            for runtime in runtimes {
                let name = runtime.spec.name.clone();
                let Some(record) = records.get(&name) else {
                    continue;
                };
                let due = match record.next_run_at {
                    Some(at) => at,
                    None => {
                        let last = record
                            .last_run_at
                            .map(|t| std::time::UNIX_EPOCH + Duration::from_secs(t as u64));
                        let Some(next) = runtime.schedule.next_run(last, now) else {
                            continue;
                        };
                        let at = unix_ms(next);
                        let _ = self.datastore.set_secret_schedule(&name, Some(at)).await;
                        at
                    }
                };
                let due_time = std::time::UNIX_EPOCH + Duration::from_millis(due.max(0) as u64);
                if due_time <= now {
                    let following = runtime.schedule.next_run(Some(now), now);
                    let _ = self
                        .datastore
                        .set_secret_schedule(&name, following.map(unix_ms))
                        .await;
                    match self.new_job(&runtime, "schedule").await {
                        Ok(job) => {
                            let engine = self.clone();
                            tokio::spawn(async move { engine.run_job(job).await });
                        }
                        Err(EngineError::Busy(_)) => {}
                        Err(e) => {
                            tracing::error!(secret = %name, error = %e, "could not start a scheduled rotation")
                        }
                    }
                    if let Some(f) = following {
                        next_wake = Some(next_wake.map_or(f, |w| w.min(f)));
                    }
                } else {
                    next_wake = Some(next_wake.map_or(due_time, |w| w.min(due_time)));
                }
            }
            let sleep = next_wake
                .and_then(|w| w.duration_since(SystemTime::now()).ok())
                .unwrap_or(Duration::from_secs(60))
                .min(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// Rotation tokens: 40 random hex characters (AWS and moto want 32–64).
fn new_token() -> String {
    let mut raw = [0u8; 20];
    rand::fill(&mut raw);
    hex::encode(raw)
}

/// Schedule times are kept in milliseconds so second-level cron fields work.
fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
