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

use tokio::sync::{Notify, Semaphore, broadcast, watch};

use mayfly_common::clock::Clock;

use super::local::SealingKey;
use super::runtime::{EngineError, SecretRuntime};
use super::spec::{SecretSpec, Strategy};
use super::{Credential, SecretStoreError};
use crate::audit::{Actor, Audit, Event};
use crate::metrics::{Metrics, RotationOutcome};
use crate::store::{JobRecord, ScheduledStart, SecretRecord, Store, StoreError};
use mayfly_common::clock::{unix, unix_ms};

mod definitions;
mod job;
mod scheduler;

/// The lease whose holder runs the scheduler.
pub const SCHEDULER_LEASE: &str = "rotation-scheduler";

/// Told to agents (and anyone else listening) when a new version becomes current. It
/// carries the value, read from the secret's store once per promotion: every sync stream
/// with a grant pushes this copy instead of reading the store again (one AWS or Vault call
/// per agent per rotation, otherwise).
#[derive(Debug)]
pub struct Promoted {
    pub secret: String,
    pub version: String,
    pub credential: Credential,
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
    /// The loaded definitions, sorted by name, republished whenever `secrets` changes.
    definitions: watch::Sender<crate::visibility::Definitions>,
    /// Tokens of the jobs this daemon is running now.
    running: Mutex<HashSet<String>>,
    wake: Notify,
    slots: Arc<Semaphore>,
    promoted: broadcast::Sender<Arc<Promoted>>,
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
            definitions: watch::channel(Vec::new().into()).0,
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

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Promoted>> {
        self.promoted.subscribe()
    }

    /// The loaded definitions as they change.
    pub fn definitions(&self) -> watch::Receiver<crate::visibility::Definitions> {
        self.definitions.subscribe()
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
fn crash_point(state: crate::store::JobState) {
    if std::env::var("MAYFLY_TEST_CRASH_AFTER").is_ok_and(|s| s == state.as_str()) {
        tracing::warn!(%state, "MAYFLY_TEST_CRASH_AFTER: killing the daemon now");
        crate::sys::kill_self();
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
