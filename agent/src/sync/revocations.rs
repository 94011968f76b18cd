//! Acknowledging revocations: once the SVID cache has dropped what a revocation names (and
//! got fresh SVIDs where the entry is still valid), the credential cache has dropped the
//! revoked leases, and the sinks have caught up with that state, the agent tells the
//! daemon what it did.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use mayfly_proto::v1;

use super::{Authorized, ClientCell};
use crate::attest::node::NodeIdentity;
use crate::credentials::CredentialProgress;
use crate::sinks::runner::SinkProgress;
use crate::state::WorkloadState;

/// How long an acknowledgement waits for fresh SVIDs before it goes out without them.
const REISSUE_WAIT: Duration = Duration::from_secs(10);

/// How often a pending acknowledgement is looked at again when nothing changes.
const RECHECK: Duration = Duration::from_millis(500);

/// What the acknowledgements follow and whom they prod.
pub struct Acknowledger {
    pub client: ClientCell,
    pub authorized: Arc<watch::Sender<Authorized>>,
    pub state: watch::Receiver<Arc<WorkloadState>>,
    pub progress: Option<watch::Receiver<SinkProgress>>,
    /// The credential cache's progress: a revoked lease is out of it before the ack.
    pub credentials: watch::Receiver<CredentialProgress>,
    /// The agent's own SVID, renewed at once when a revocation taints its CA.
    pub identity: watch::Receiver<NodeIdentity>,
    pub renew_now: Arc<Notify>,
}

/// Runs until the state's publisher goes away.
pub async fn acknowledge(context: Acknowledger) {
    let Acknowledger {
        client,
        authorized,
        mut state,
        mut progress,
        mut credentials,
        identity,
        renew_now,
    } = context;
    // When each pending revocation was first seen, and (for a tainted CA) the serial of
    // the agent's own SVID then.
    let mut first_seen: HashMap<String, (Instant, String)> = HashMap::new();
    loop {
        let current = state.borrow_and_update().clone();
        let cached = credentials.borrow().clone();
        first_seen.retain(|id, _| current.revocations.iter().any(|r| r.message.id == *id));
        for pending in &current.revocations {
            let id = &pending.message.id;
            let (seen, own_serial) = first_seen
                .entry(id.clone())
                .or_insert_with(|| {
                    if pending.message.renew_agent_svid {
                        renew_now.notify_one();
                    }
                    (Instant::now(), identity.borrow().serial.clone())
                })
                .clone();
            let timed_out = seen.elapsed() >= REISSUE_WAIT;
            let renewed =
                !pending.message.renew_agent_svid || identity.borrow().serial != own_serial;
            let reissued = (pending.awaiting.is_empty() && renewed) || timed_out;
            let sinks = progress.as_ref().map(|p| p.borrow().clone());
            let written = sinks.as_ref().is_none_or(|p| p.applied >= current.version);
            if !reissued || !written || cached.applied < current.version {
                continue;
            }
            let effects = sinks
                .and_then(|p| p.revocations.get(id).cloned())
                .unwrap_or_default();
            let mut actions = effects.actions;
            actions.extend(lease_actions(
                &pending.message.lease_ids,
                cached
                    .dropped
                    .get(id)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            ));
            let mut errors = effects.errors;
            let mut reissued = pending.reissued.clone();
            if pending.message.renew_agent_svid {
                if renewed {
                    reissued.push(format!("agent SVID {}", identity.borrow().serial));
                } else {
                    errors.push("the agent's own SVID is not renewed yet".into());
                }
            }
            errors.extend(
                pending
                    .awaiting
                    .iter()
                    .map(|spiffe_id| format!("no fresh SVID for {spiffe_id} yet")),
            );
            let ack = v1::RevocationAck {
                revocation_id: id.clone(),
                dropped_serials: pending.dropped.clone(),
                reissued,
                files_removed: effects.removed,
                files_blanked: effects.blanked,
                actions,
                errors,
            };
            let mut node = client.borrow().clone();
            match tokio::time::timeout(Duration::from_secs(5), node.ack_revocation(ack)).await {
                Ok(Ok(_)) => {
                    tracing::info!(revocation = %id, kind = %pending.message.kind, dropped = pending.dropped.len(), reissued = pending.reissued.len(), "revocation carried out and acknowledged");
                    authorized.send_modify(|a| a.revocations.retain(|r| r.id != *id));
                }
                Ok(Err(status)) => {
                    tracing::warn!(revocation = %id, code = ?status.code(), error = %status.message(), "the daemon did not take the revocation's acknowledgement; retrying")
                }
                Err(_) => {
                    tracing::warn!(revocation = %id, "acknowledging the revocation timed out; retrying")
                }
            }
        }
        let waiting = !current.revocations.is_empty();
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            changed = async {
                match progress.as_mut() {
                    Some(p) => p.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            } => {
                if !changed {
                    progress = None;
                }
            }
            changed = credentials.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(RECHECK), if waiting => {}
        }
    }
}

/// What the acknowledgement says about each revoked lease: its cached copy dropped, or
/// none held here (the workload never asked through this agent, or it had expired).
fn lease_actions(revoked: &[String], dropped: &[String]) -> Vec<String> {
    revoked
        .iter()
        .map(|lease| {
            if dropped.contains(lease) {
                format!("dropped the cached credential of lease {lease}")
            } else {
                format!("held no cached credential of lease {lease}")
            }
        })
        .collect()
}

/// Waits (at most `limit`) until every revocation is acknowledged and the sinks have
/// written the latest state: an agent that must stop says its last word first.
pub async fn settle(
    authorized: &watch::Sender<Authorized>,
    state: &watch::Receiver<Arc<WorkloadState>>,
    progress: Option<&watch::Receiver<SinkProgress>>,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let acked = authorized.borrow().revocations.is_empty();
        let current = state.borrow().clone();
        let written = progress.is_none_or(|p| p.borrow().applied >= current.version);
        let dropped = current.revocations.is_empty() && current.entries.is_empty();
        if acked && written && dropped {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!("stopping before every revocation was carried out and acknowledged");
}
