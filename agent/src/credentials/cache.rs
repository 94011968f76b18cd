//! The agent's credential cache: one lease per (SPIFFE ID, credential, TTL), reused until
//! two thirds of its TTL has passed, never handed out with less than a quarter left, and
//! one daemon call for any number of workloads asking at once. It follows the agent's
//! published state to drop what a revocation names and what belongs to an entry that is
//! gone, and publishes how far it got so that revocations are acknowledged only after.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use tokio::sync::watch;

use mayfly_common::clock::{Clock, unix_ms};
use mayfly_proto::v1;

use super::{Credential, CredentialError, CredentialIssuer, CredentialKey};
use crate::state::WorkloadState;

/// How many keys are kept. A node runs at most a few hundred workloads asking for a few
/// credentials each; past this the soonest-expiring credential makes room.
pub(crate) const CREDENTIAL_CACHE_CAPACITY: usize = 4096;

/// How long one `IssueCredential` may take before it counts as the daemon being down.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a revoked lease id is remembered: longer than any call in flight when the
/// revocation arrived, which could otherwise bring the revoked lease back into the cache.
const REVOKED_MEMORY_MS: i64 = 10 * 60 * 1000;

/// Shared by the Workload API and the task that follows the state; cloning is cheap.
#[derive(Clone)]
pub struct CredentialCache {
    inner: Arc<Inner>,
}

/// How far the cache has followed the agent's state, and which cached leases each pending
/// revocation made it drop: what the revocation's acknowledgement waits for and reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialProgress {
    /// The `WorkloadState::version` last applied.
    pub applied: u64,
    /// Per pending revocation id, the lease ids whose cached copies were dropped.
    pub dropped: BTreeMap<String, Vec<String>>,
}

struct Inner {
    issuer: Arc<dyn CredentialIssuer>,
    clock: Arc<dyn Clock>,
    /// The agent's state: which SPIFFE IDs still have entries, which leases are revoked.
    state: watch::Receiver<Arc<WorkloadState>>,
    held: Mutex<Held>,
    progress: watch::Sender<CredentialProgress>,
    capacity: usize,
}

#[derive(Default)]
struct Held {
    slots: HashMap<CredentialKey, Slot>,
    /// Revoked lease id -> unix ms until which it is remembered.
    revoked: HashMap<String, i64>,
}

/// One key's cached credential and the daemon call under way for it, if any.
#[derive(Default)]
struct Slot {
    cached: Option<Arc<Credential>>,
    flight: Option<Flight>,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.cached.is_none() && self.flight.is_none()
    }
}

/// One daemon call that every request for the key awaits. The call runs in a task of its
/// own, so a workload that hangs up does not cancel it for the others.
type Flight = Shared<BoxFuture<'static, Result<Arc<Credential>, CredentialError>>>;

impl CredentialCache {
    /// What the cache asks the daemon with (elevation requests go the same way).
    pub fn issuer(&self) -> Arc<dyn CredentialIssuer> {
        self.inner.issuer.clone()
    }

    pub fn new(
        issuer: Arc<dyn CredentialIssuer>,
        clock: Arc<dyn Clock>,
        state: watch::Receiver<Arc<WorkloadState>>,
    ) -> Self {
        Self::with_capacity(issuer, clock, state, CREDENTIAL_CACHE_CAPACITY)
    }

    pub(crate) fn with_capacity(
        issuer: Arc<dyn CredentialIssuer>,
        clock: Arc<dyn Clock>,
        state: watch::Receiver<Arc<WorkloadState>>,
        capacity: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                issuer,
                clock,
                state,
                held: Mutex::new(Held::default()),
                progress: watch::channel(CredentialProgress::default()).0,
                capacity: capacity.max(1),
            }),
        }
    }

    /// Follows the cache's progress; revocation acknowledgements wait on it.
    pub fn progress(&self) -> watch::Receiver<CredentialProgress> {
        self.inner.progress.subscribe()
    }

    /// The credential for `key`: the cached one while it is within two thirds of its TTL,
    /// otherwise a fresh one from the daemon (one call however many ask). With the daemon
    /// unreachable, the cached one is served for as long as it has a quarter of its TTL
    /// left.
    pub async fn get(&self, key: &CredentialKey) -> Result<Arc<Credential>, CredentialError> {
        let flight = {
            let now = self.inner.now_ms();
            let mut held = self.inner.lock();
            let slot = held.slots.entry(key.clone()).or_default();
            if let (Some(now), Some(cached)) = (now, &slot.cached)
                && now < cached.reuse_until_ms()
            {
                return Ok(cached.clone());
            }
            match &slot.flight {
                Some(flight) => flight.clone(),
                None => {
                    // A lease still live is extended rather than replaced: the same
                    // user for the workload, one less to revoke.
                    let renewable = slot.cached.clone().filter(|c| {
                        c.renewable() && now.is_some_and(|now| now < c.expires_at * 1000)
                    });
                    let flight = self.launch(key, renewable);
                    slot.flight = Some(flight.clone());
                    flight
                }
            }
        };
        match flight.await {
            Err(CredentialError::Unavailable { name }) => {
                let now = self.inner.now_ms();
                let held = self.inner.lock();
                let cached = held.slots.get(key).and_then(|slot| slot.cached.clone());
                match (now, cached) {
                    (Some(now), Some(cached)) if now < cached.usable_until_ms() => {
                        tracing::warn!(credential = %key.name, spiffe_id = %key.spiffe_id, lease = %cached.lease_id, "mayflyd is unavailable; serving the cached credential");
                        Ok(cached)
                    }
                    _ => Err(CredentialError::Unavailable { name }),
                }
            }
            answer => answer,
        }
    }

    /// Starts the daemon call for `key`: a renewal of `renewable`'s lease if there is one,
    /// and where the daemon will not extend it, a new credential. The caller holds the lock
    /// and records the flight, which the call's own settling (under the same lock) clears.
    fn launch(&self, key: &CredentialKey, renewable: Option<Arc<Credential>>) -> Flight {
        let inner = self.inner.clone();
        let key = key.clone();
        let name = key.name.clone();
        let task = tokio::spawn(async move {
            if let Some(cached) = renewable {
                let request = v1::RenewCredentialRequest {
                    lease_id: cached.lease_id.clone(),
                    ttl_seconds: key.ttl_seconds,
                };
                match bounded(inner.issuer.renew(request)).await {
                    Ok(renewed) if renewed.lease_id == cached.lease_id => {
                        return inner.settle(&key, Ok(cached.renewed(&renewed)), "renewed");
                    }
                    Ok(_) => {
                        tracing::warn!(lease = %cached.lease_id, "mayflyd renewed another lease than asked; asking for a new one");
                    }
                    Err(status)
                        if matches!(
                            status.code(),
                            tonic::Code::FailedPrecondition | tonic::Code::Unimplemented
                        ) =>
                    {
                        tracing::debug!(lease = %cached.lease_id, reason = %status.message(), "lease not renewed; asking for a new one");
                    }
                    Err(status) => return inner.settle(&key, Err(status), "renewed"),
                }
            }
            let request = v1::IssueCredentialRequest {
                name: key.name.clone(),
                spiffe_id: key.spiffe_id.as_str().to_owned(),
                ttl_seconds: key.ttl_seconds,
            };
            let answer = bounded(inner.issuer.issue(request))
                .await
                .map(|issued| Credential::from_issued(issued, key.spiffe_id.clone()));
            inner.settle(&key, answer, "issued")
        });
        async move {
            task.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "the task issuing a credential failed");
                Err(CredentialError::Failed {
                    name,
                    code: tonic::Code::Internal,
                })
            })
        }
        .boxed()
        .shared()
    }

    /// Runs until the state's publisher goes away, applying every change.
    pub async fn follow(self) {
        let mut state = self.inner.state.clone();
        loop {
            let current = state.borrow_and_update().clone();
            self.apply(&current);
            if state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Drops the cached copies of the leases pending revocations name (remembering those
    /// ids), of SPIFFE IDs no entry gives any more, and of credentials too old to hand
    /// out; then publishes that `state` is applied.
    fn apply(&self, state: &WorkloadState) {
        let now = self.inner.now_ms().unwrap_or(0);
        let given: HashSet<&str> = state.entries.iter().map(|e| e.spiffe_id.as_str()).collect();
        let mut dropped: BTreeMap<String, Vec<String>> = BTreeMap::new();
        {
            let mut held = self.inner.lock();
            let held = &mut *held;
            for pending in &state.revocations {
                for lease in &pending.message.lease_ids {
                    held.revoked
                        .entry(lease.clone())
                        .or_insert(now + REVOKED_MEMORY_MS);
                    for slot in held.slots.values_mut() {
                        if slot.cached.as_ref().is_some_and(|c| c.lease_id == *lease) {
                            slot.cached = None;
                            tracing::info!(lease = %lease, revocation = %pending.message.id, "dropped a revoked credential from the cache");
                            dropped
                                .entry(pending.message.id.clone())
                                .or_default()
                                .push(lease.clone());
                        }
                    }
                }
            }
            for (key, slot) in held.slots.iter_mut() {
                let gone = !given.contains(key.spiffe_id.as_str());
                let stale = slot
                    .cached
                    .as_ref()
                    .is_some_and(|c| c.usable_until_ms() <= now);
                if gone || stale {
                    slot.cached = None;
                }
            }
            held.slots.retain(|_, slot| !slot.is_empty());
            held.revoked.retain(|_, until| *until > now);
        }
        self.inner.progress.send_if_modified(|progress| {
            let before = progress.clone();
            progress.applied = state.version;
            progress
                .dropped
                .retain(|id, _| state.revocations.iter().any(|r| r.message.id == *id));
            for (id, leases) in dropped {
                progress.dropped.entry(id).or_default().extend(leases);
            }
            *progress != before
        });
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().slots.len()
    }
}

/// A daemon call that takes longer than [`ISSUE_TIMEOUT`] counts as the daemon being down.
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(ISSUE_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {ISSUE_TIMEOUT:?}"
            )))
        })
}

impl Inner {
    /// Records the daemon's answer for `key` (`what` it did: issued or renewed) and returns what the waiting requests get. A
    /// credential is cached only while its SPIFFE ID still has an entry and its lease was
    /// not revoked meanwhile; a failure leaves the previous credential cached, for the
    /// requests that may still fall back on it.
    fn settle(
        &self,
        key: &CredentialKey,
        answer: Result<Credential, tonic::Status>,
        what: &str,
    ) -> Result<Arc<Credential>, CredentialError> {
        let state = self.state.borrow().clone();
        let now = self.now_ms();
        let mut held = self.lock();
        let held = &mut *held;
        let outcome = match answer {
            Ok(credential) => {
                let credential = Arc::new(credential);
                let revoked = held.revoked.contains_key(&credential.lease_id)
                    || state
                        .revocations
                        .iter()
                        .any(|r| r.message.lease_ids.contains(&credential.lease_id));
                let given = state.entries.iter().any(|e| e.spiffe_id == key.spiffe_id);
                if revoked {
                    Err(CredentialError::RevokedOnArrival {
                        name: key.name.clone(),
                    })
                } else if !given {
                    Err(CredentialError::HolderGone {
                        spiffe_id: key.spiffe_id.clone(),
                    })
                } else {
                    tracing::info!(credential = %key.name, spiffe_id = %key.spiffe_id, lease = %credential.lease_id, expires_at = credential.expires_at, "credential {what}");
                    Ok(credential)
                }
            }
            Err(status) => {
                tracing::warn!(credential = %key.name, spiffe_id = %key.spiffe_id, code = ?status.code(), error = %status.message(), "mayflyd refused or failed: credential not {what}");
                Err(CredentialError::from_daemon(&key.name, &status))
            }
        };
        if let Some(slot) = held.slots.get_mut(key) {
            slot.flight = None;
            match &outcome {
                Ok(credential) => slot.cached = Some(credential.clone()),
                Err(CredentialError::Unavailable { .. }) => {}
                // Refused or gone: what was cached is no longer for this workload.
                Err(_) => slot.cached = None,
            }
            if slot.is_empty() {
                held.slots.remove(key);
            }
        }
        if let Some(now) = now {
            held.make_room(self.capacity, now);
        }
        outcome
    }

    fn now_ms(&self) -> Option<i64> {
        // A clock before 1970 disables reuse rather than making every credential look fresh.
        let now = self.clock.now();
        now.duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|_| unix_ms(now))
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        // Every change under the lock is a single insert, remove or retain, so a panic
        // while holding it leaves a consistent map that is safe to reuse.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Held {
    /// Over capacity: first what can no longer be handed out goes, then the
    /// soonest-expiring credential. A key with a call in flight stays.
    fn make_room(&mut self, capacity: usize, now: i64) {
        if self.slots.len() <= capacity {
            return;
        }
        for slot in self.slots.values_mut() {
            if slot
                .cached
                .as_ref()
                .is_some_and(|c| c.usable_until_ms() <= now)
            {
                slot.cached = None;
            }
        }
        self.slots.retain(|_, slot| !slot.is_empty());
        while self.slots.len() > capacity {
            let soonest = self
                .slots
                .iter()
                .filter(|(_, slot)| slot.flight.is_none())
                .min_by_key(|(_, slot)| slot.cached.as_ref().map_or(i64::MIN, |c| c.expires_at))
                .map(|(key, _)| key.clone());
            match soonest {
                Some(key) => {
                    self.slots.remove(&key);
                }
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    use tonic::Code;

    use mayfly_common::{Selector, SpiffeId, TrustDomain};

    use super::*;
    use crate::state::{Bundle, EntryView, PendingRevocation};

    const APP: &str = "spiffe://example.org/app";
    const TTL: i64 = 600;

    /// Unix seconds that tests move by hand.
    struct ManualClock(AtomicI64);

    impl Clock for ManualClock {
        fn now(&self) -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(self.0.load(Ordering::SeqCst) as u64)
        }
    }

    /// Issues lease ls-1, ls-2, … for TTL seconds from the clock's now, counting calls;
    /// answers `failing` instead while it is set, and holds every answer until `gate`
    /// opens.
    struct CountingIssuer {
        clock: Arc<ManualClock>,
        calls: AtomicUsize,
        /// Renewals granted; while `renewing` is false they are refused as at max TTL.
        renewals: AtomicUsize,
        renewing: std::sync::atomic::AtomicBool,
        failing: Mutex<Option<Code>>,
        gate: watch::Receiver<bool>,
    }

    #[tonic::async_trait]
    impl CredentialIssuer for CountingIssuer {
        async fn issue(
            &self,
            request: v1::IssueCredentialRequest,
        ) -> Result<v1::IssuedCredential, tonic::Status> {
            let _ = self.gate.clone().wait_for(|open| *open).await;
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(code) = *self.failing.lock().unwrap() {
                return Err(tonic::Status::new(
                    code,
                    "credential orders-db is not granted",
                ));
            }
            let now = self.clock.0.load(Ordering::SeqCst);
            Ok(v1::IssuedCredential {
                lease_id: format!("ls-{n}"),
                name: request.name,
                kind: "postgres_dynamic".into(),
                values: [
                    ("username".to_string(), format!("v_app_{n}")),
                    ("password".to_string(), format!("Pw-{n}-secret")),
                ]
                .into(),
                issued_at: now,
                expires_at: now + TTL,
                notice: String::new(),
                facts: None,
            })
        }

        async fn renew(
            &self,
            request: v1::RenewCredentialRequest,
        ) -> Result<v1::RenewedCredential, tonic::Status> {
            if let Some(code) = *self.failing.lock().unwrap() {
                self.calls.fetch_add(1, Ordering::SeqCst);
                return Err(tonic::Status::new(
                    code,
                    "credential orders-db is not granted",
                ));
            }
            if !self.renewing.load(Ordering::SeqCst) {
                return Err(tonic::Status::failed_precondition(
                    "lease has reached the max TTL; ask for a new one",
                ));
            }
            self.renewals.fetch_add(1, Ordering::SeqCst);
            let now = self.clock.0.load(Ordering::SeqCst);
            Ok(v1::RenewedCredential {
                lease_id: request.lease_id,
                renewed_at: now,
                expires_at: now + TTL,
                notice: String::new(),
            })
        }
    }

    struct Fixture {
        clock: Arc<ManualClock>,
        issuer: Arc<CountingIssuer>,
        state: watch::Sender<Arc<WorkloadState>>,
        cache: CredentialCache,
        gate: watch::Sender<bool>,
    }

    impl Fixture {
        fn new(capacity: usize) -> Self {
            let clock = Arc::new(ManualClock(AtomicI64::new(1_000_000)));
            let (gate, gate_rx) = watch::channel(true);
            let issuer = Arc::new(CountingIssuer {
                clock: clock.clone(),
                calls: AtomicUsize::new(0),
                renewals: AtomicUsize::new(0),
                renewing: Default::default(),
                failing: Mutex::new(None),
                gate: gate_rx,
            });
            let mut state = WorkloadState::empty(Bundle {
                trust_domain: TrustDomain::new("example.org").unwrap(),
                x509_authorities: Vec::new(),
                jwt_keys: Vec::new(),
                sequence: 0,
            });
            state.entries = vec![entry("e-app", APP), entry("e-b", "spiffe://example.org/b")];
            let (state, receiver) = watch::channel(Arc::new(state));
            let cache =
                CredentialCache::with_capacity(issuer.clone(), clock.clone(), receiver, capacity);
            Self {
                clock,
                issuer,
                state,
                cache,
                gate,
            }
        }

        fn advance(&self, secs: i64) {
            self.clock.0.fetch_add(secs, Ordering::SeqCst);
        }

        fn calls(&self) -> usize {
            self.issuer.calls.load(Ordering::SeqCst)
        }

        fn fail_with(&self, code: Option<Code>) {
            *self.issuer.failing.lock().unwrap() = code;
        }

        /// Publishes a changed state and lets the cache apply it.
        fn update(&self, change: impl FnOnce(&mut WorkloadState)) {
            let mut next = (**self.state.borrow()).clone();
            change(&mut next);
            next.version += 1;
            self.state.send_replace(Arc::new(next));
            self.cache.apply(&self.state.borrow());
        }
    }

    fn entry(id: &str, spiffe_id: &str) -> Arc<EntryView> {
        Arc::new(EntryView {
            id: id.into(),
            spiffe_id: SpiffeId::parse(spiffe_id).unwrap(),
            selectors: vec![Selector::Uid(1000)],
            hint: String::new(),
            sets: Vec::new(),
            revision: 1,
            expires_at: 0,
        })
    }

    fn key(spiffe_id: &str, ttl_seconds: i64) -> CredentialKey {
        CredentialKey {
            spiffe_id: SpiffeId::parse(spiffe_id).unwrap(),
            name: "orders-db".into(),
            ttl_seconds,
        }
    }

    fn revocation(id: &str, leases: &[&str]) -> Arc<PendingRevocation> {
        Arc::new(PendingRevocation {
            message: v1::Revocation {
                id: id.into(),
                kind: "lease".into(),
                lease_ids: leases.iter().map(|l| (*l).to_owned()).collect(),
                ..Default::default()
            },
            dropped: Vec::new(),
            awaiting: Vec::new(),
            reissued: Vec::new(),
        })
    }

    #[tokio::test]
    async fn a_live_lease_is_renewed_until_the_daemon_says_ask_anew() {
        let f = Fixture::new(16);
        let k = key(APP, 0);
        let first = f.cache.get(&k).await.unwrap();
        f.issuer.renewing.store(true, Ordering::SeqCst);
        f.advance(TTL * 2 / 3 + 1);
        let renewed = f.cache.get(&k).await.unwrap();
        assert_eq!(renewed.lease_id, first.lease_id, "the same lease, extended");
        assert_eq!(renewed.value("password"), first.value("password"));
        assert_eq!(renewed.expires_at, f.clock.0.load(Ordering::SeqCst) + TTL);
        assert_eq!(f.issuer.renewals.load(Ordering::SeqCst), 1);
        assert_eq!(f.calls(), 1, "no new credential");
        // Reused for two thirds of the renewed TTL, not of the first one.
        f.advance(TTL / 2);
        assert!(Arc::ptr_eq(&f.cache.get(&k).await.unwrap(), &renewed));
        // At its max TTL the daemon refuses to extend it: a new lease.
        f.issuer.renewing.store(false, Ordering::SeqCst);
        f.advance(TTL / 6 + 1);
        let fresh = f.cache.get(&k).await.unwrap();
        assert_ne!(fresh.lease_id, first.lease_id);
        assert_eq!(f.calls(), 2);
    }

    #[tokio::test]
    async fn reused_until_two_thirds_of_its_ttl_then_issued_again() {
        let f = Fixture::new(16);
        let first = f.cache.get(&key(APP, 0)).await.unwrap();
        assert_eq!(first.lease_id, "ls-1");
        f.advance(TTL * 2 / 3 - 1);
        assert_eq!(f.cache.get(&key(APP, 0)).await.unwrap().lease_id, "ls-1");
        assert_eq!(f.calls(), 1);
        f.advance(1);
        assert_eq!(f.cache.get(&key(APP, 0)).await.unwrap().lease_id, "ls-2");
        assert_eq!(f.calls(), 2);
        // Another TTL or another SPIFFE ID is another lease.
        assert_eq!(f.cache.get(&key(APP, 3600)).await.unwrap().lease_id, "ls-3");
        let other = f
            .cache
            .get(&key("spiffe://example.org/b", 0))
            .await
            .unwrap();
        assert_eq!(other.lease_id, "ls-4");
        assert_eq!(other.spiffe_id.as_str(), "spiffe://example.org/b");
    }

    #[tokio::test]
    async fn a_hundred_concurrent_requests_cause_one_daemon_call() {
        let f = Fixture::new(16);
        f.gate.send_replace(false);
        let requests: Vec<_> = (0..100)
            .map(|_| {
                let cache = f.cache.clone();
                tokio::spawn(async move { cache.get(&key(APP, 0)).await })
            })
            .collect();
        // On this single-threaded runtime every request runs up to its wait for the
        // daemon before the gate opens.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        f.gate.send_replace(true);
        for request in requests {
            assert_eq!(request.await.unwrap().unwrap().lease_id, "ls-1");
        }
        assert_eq!(f.calls(), 1);
    }

    #[tokio::test]
    async fn with_the_daemon_down_the_cached_one_serves_until_a_quarter_is_left() {
        let f = Fixture::new(16);
        f.cache.get(&key(APP, 0)).await.unwrap();
        f.fail_with(Some(Code::Unavailable));
        f.advance(TTL * 3 / 4 - 1);
        let served = f.cache.get(&key(APP, 0)).await.unwrap();
        assert_eq!(served.lease_id, "ls-1", "the daemon was asked and was down");
        assert_eq!(f.calls(), 2);
        f.advance(1);
        let err = f.cache.get(&key(APP, 0)).await.unwrap_err();
        assert!(matches!(err, CredentialError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("unavailable"), "{err}");
        // Back up: a fresh lease.
        f.fail_with(None);
        assert_eq!(f.cache.get(&key(APP, 0)).await.unwrap().lease_id, "ls-4");
    }

    #[tokio::test]
    async fn nothing_cached_and_the_daemon_down_is_unavailable() {
        let f = Fixture::new(16);
        f.fail_with(Some(Code::DeadlineExceeded));
        let err = f.cache.get(&key(APP, 0)).await.unwrap_err();
        assert!(matches!(err, CredentialError::Unavailable { .. }), "{err}");
        assert_eq!(f.cache.len(), 0, "a failed call leaves nothing behind");
    }

    #[tokio::test]
    async fn a_refusal_passes_through_and_drops_what_was_cached() {
        let f = Fixture::new(16);
        f.cache.get(&key(APP, 0)).await.unwrap();
        f.fail_with(Some(Code::PermissionDenied));
        f.advance(TTL * 2 / 3);
        let err = f.cache.get(&key(APP, 0)).await.unwrap_err();
        assert!(matches!(err, CredentialError::Refused(_)), "{err}");
        assert!(err.to_string().contains("not granted"), "{err}");
        assert_eq!(f.cache.len(), 0);
    }

    #[tokio::test]
    async fn a_revoked_lease_is_dropped_reported_and_never_cached_again() {
        let f = Fixture::new(16);
        let progress = f.cache.progress();
        let first = f.cache.get(&key(APP, 0)).await.unwrap();
        f.update(|s| s.revocations = vec![revocation("rv-1", &[&first.lease_id])]);
        assert_eq!(progress.borrow().applied, 1);
        assert_eq!(progress.borrow().dropped["rv-1"], vec!["ls-1".to_string()]);
        assert_eq!(f.cache.get(&key(APP, 0)).await.unwrap().lease_id, "ls-2");
        // Acknowledged: the revocation leaves the state, its report goes with it.
        f.update(|s| s.revocations.clear());
        assert!(progress.borrow().dropped.is_empty());
        assert_eq!(progress.borrow().applied, 2);

        // An answer carrying a lease revoked while the call was under way is not kept.
        f.update(|s| s.revocations = vec![revocation("rv-2", &["ls-3"])]);
        f.update(|s| s.revocations.clear());
        let err = f.cache.get(&key(APP, 3600)).await.unwrap_err();
        assert!(
            matches!(err, CredentialError::RevokedOnArrival { .. }),
            "{err}"
        );
        assert_eq!(f.cache.get(&key(APP, 3600)).await.unwrap().lease_id, "ls-4");
    }

    #[tokio::test]
    async fn credentials_of_an_entry_that_went_away_are_dropped() {
        let f = Fixture::new(16);
        f.cache.get(&key(APP, 0)).await.unwrap();
        f.cache
            .get(&key("spiffe://example.org/b", 0))
            .await
            .unwrap();
        f.update(|s| s.entries.retain(|e| e.spiffe_id.as_str() != APP));
        assert_eq!(f.cache.len(), 1);
        // An answer arriving for it after it went is not handed out.
        let err = f.cache.get(&key(APP, 0)).await.unwrap_err();
        assert!(matches!(err, CredentialError::HolderGone { .. }), "{err}");
        assert_eq!(f.cache.len(), 1);
    }

    #[tokio::test]
    async fn the_cache_stays_within_capacity() {
        let f = Fixture::new(2);
        for ttl in [60, 120, 180] {
            f.cache.get(&key(APP, ttl)).await.unwrap();
            f.advance(1);
        }
        assert_eq!(f.cache.len(), 2);
        // The soonest-expiring (the first) made room; the others are still reused.
        f.cache.get(&key(APP, 120)).await.unwrap();
        f.cache.get(&key(APP, 180)).await.unwrap();
        assert_eq!(f.calls(), 3);
    }
}
