//! The credentials the agent's sinks write, kept fresh: every (SPIFFE ID, credential, TTL)
//! a sink names is asked of the cache (shared with the workloads, so a sink and a process
//! asking for the same thing share one lease), again when the cache would hand out a new
//! one (two thirds of the TTL), whenever a revocation made the cache drop one, and on a
//! short retry while the daemon is unreachable. What it holds is published for the sinks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use mayfly_common::clock::unix_ms;

use super::{Credential, CredentialCache, CredentialError, CredentialKey};
use crate::state::WorkloadState;

/// How soon an answer that was neither a credential nor a refusal is asked again.
const RETRY_UNAVAILABLE: Duration = Duration::from_secs(5);
/// How soon a refusal is asked again: an operator may add the grant meanwhile.
const RETRY_REFUSED: Duration = Duration::from_secs(30);
/// Never sooner than this, however the daemon's clock and ours disagree.
const MIN_WAIT: Duration = Duration::from_millis(200);

/// What the sinks may write now.
#[derive(Debug, Default)]
pub struct HeldCredentials {
    /// Rounds of asking finished; 0 before the first.
    pub round: u64,
    pub held: HashMap<CredentialKey, Arc<Credential>>,
    /// Per key the daemon refused, its words (no value is in them).
    pub refused: HashMap<CredentialKey, String>,
}

/// A key with the words it was refused in.
type Refusals<'a> = Vec<(&'a CredentialKey, &'a str)>;

/// A key with the lease it holds and that lease's expiry (a renewal moves only that).
type Leases<'a> = Vec<(&'a CredentialKey, &'a str, i64)>;

impl HeldCredentials {
    /// Which leases it holds until when, and which refusals: what tells one round from
    /// the next.
    fn shape(&self) -> (Leases<'_>, Refusals<'_>) {
        let mut held: Vec<_> = self
            .held
            .iter()
            .map(|(k, c)| (k, c.lease_id.as_str(), c.expires_at))
            .collect();
        held.sort_by(|a, b| a.1.cmp(b.1).then_with(|| a.0.name.cmp(&b.0.name)));
        let mut refused: Vec<_> = self
            .refused
            .iter()
            .map(|(k, why)| (k, why.as_str()))
            .collect();
        refused.sort_by(|a, b| a.1.cmp(b.1).then_with(|| a.0.name.cmp(&b.0.name)));
        (held, refused)
    }
}

pub struct CredentialFeed {
    cache: CredentialCache,
    wanted: Vec<CredentialKey>,
    published: watch::Sender<Arc<HeldCredentials>>,
}

impl CredentialFeed {
    pub fn new(cache: CredentialCache, mut wanted: Vec<CredentialKey>) -> Self {
        let mut seen = std::collections::HashSet::new();
        wanted.retain(|key| seen.insert(key.clone()));
        Self {
            cache,
            wanted,
            published: watch::channel(Arc::new(HeldCredentials::default())).0,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<HeldCredentials>> {
        self.published.subscribe()
    }

    /// Runs until the agent's state goes away. Starts once the agent has its first full
    /// state (the daemon checks the SPIFFE IDs against the agent's entries).
    pub async fn run(self, mut state: watch::Receiver<Arc<WorkloadState>>) {
        if self.wanted.is_empty() || state.wait_for(|s| s.synced).await.is_err() {
            return;
        }
        let mut dropped = self.cache.progress();
        let mut round = 0;
        loop {
            let answers =
                futures::future::join_all(self.wanted.iter().map(|key| self.cache.get(key))).await;
            round += 1;
            let mut next = HeldCredentials {
                round,
                ..HeldCredentials::default()
            };
            let mut wait: Option<Duration> = None;
            let mut sooner = |d: Duration| wait = Some(wait.map_or(d, |w| w.min(d)));
            let now = unix_ms(SystemTime::now());
            for (key, answer) in self.wanted.iter().zip(answers) {
                match answer {
                    Ok(credential) => {
                        let due = credential.reuse_until_ms().saturating_sub(now).max(0);
                        sooner(Duration::from_millis(due as u64 + 1));
                        next.held.insert(key.clone(), credential);
                    }
                    Err(
                        e @ (CredentialError::Refused(_)
                        | CredentialError::Rejected(_)
                        | CredentialError::HolderGone { .. }),
                    ) => {
                        sooner(RETRY_REFUSED);
                        next.refused.insert(key.clone(), e.to_string());
                    }
                    Err(e) => {
                        tracing::debug!(credential = %key.name, spiffe_id = %key.spiffe_id, error = %e, "no credential for the sinks yet; retrying");
                        sooner(RETRY_UNAVAILABLE);
                    }
                }
            }
            self.published.send_if_modified(|current| {
                let modified = current.round == 0 || current.shape() != next.shape();
                if modified {
                    *current = Arc::new(next);
                }
                modified
            });
            let wait = wait.unwrap_or(RETRY_REFUSED).max(MIN_WAIT);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                changed = dropped.changed() => if changed.is_err() { return },
                changed = state.changed() => if changed.is_err() { return },
            }
        }
    }
}
