//! The agent's side of the node API: one sync stream whose pushes become the authorized
//! state, the SVID cache that signs and renews workload SVIDs from it, and the agent's own
//! SVID renewal and re-attestation after eviction.

pub mod denials;
pub mod revocations;
pub mod svids;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

use mayfly_common::tls::TrustBundle;
use mayfly_proto::v1::node_client::NodeClient;
use mayfly_proto::v1::{self, sync_message::Update};

use crate::ops::AgentMetrics;

/// What the daemon last told this agent it may hold.
#[derive(Clone, Default, PartialEq)]
pub struct Authorized {
    pub entries: BTreeMap<String, v1::Entry>,
    pub bundle: Option<v1::Bundle>,
    /// Current versions of the secrets granted to this agent's workloads.
    pub secrets: BTreeMap<String, v1::GrantedSecret>,
    /// True once a full state has arrived on the current or an earlier stream.
    pub synced: bool,
    /// Revoked serials and when their certificates expire (unix seconds): never served.
    pub deny: BTreeMap<String, i64>,
    /// SPIFFE IDs whose entries were revoked: files holding them are removed or blanked.
    /// An ID leaves the set when an entry gives it again.
    pub revoked_ids: BTreeSet<String>,
    /// Secrets no longer granted here because the entries they were granted to were
    /// revoked: sinks using them remove or blank their files.
    pub revoked_secrets: BTreeSet<String>,
    /// Everything this agent held is revoked (it was banned).
    pub revoked_all: bool,
    /// Revocations applied but not yet acknowledged to the daemon, oldest first.
    pub revocations: Vec<v1::Revocation>,
    /// The daemon's policy set, compiled.
    pub policy: Option<Arc<crate::policy::AgentPolicy>>,
}

impl std::fmt::Debug for Authorized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secret values never reach Debug output: names and versions only.
        let secrets: Vec<(&str, &str)> = self
            .secrets
            .values()
            .map(|s| (s.name.as_str(), s.version.as_str()))
            .collect();
        f.debug_struct("Authorized")
            .field("entries", &self.entries.keys().collect::<Vec<_>>())
            .field("secrets", &secrets)
            .field("synced", &self.synced)
            .field("deny", &self.deny.len())
            .field("revoked_ids", &self.revoked_ids)
            .field("revoked_secrets", &self.revoked_secrets)
            .field("revoked_all", &self.revoked_all)
            .field("policy", &self.policy)
            .field(
                "revocations",
                &self.revocations.iter().map(|r| &r.id).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// How a sync stream ended.
#[derive(Debug)]
pub enum StreamEnd {
    /// The daemon went away or the stream broke: reconnect with backoff.
    Broken(String),
    /// The daemon no longer accepts this agent's SVID: re-attest.
    Evicted(String),
    /// The agent must stop.
    Banned(String),
}

/// Runs one sync stream to its end, publishing every change.
/// `metrics` learn when the stream is open and when the daemon was last heard.
pub async fn follow(
    client: &mut NodeClient<Channel>,
    authorized: &watch::Sender<Authorized>,
    trust: &TrustBundle,
    on_bundle: &(dyn Fn(&v1::Bundle) + Send + Sync),
    metrics: &Arc<AgentMetrics>,
) -> StreamEnd {
    let mut stream = match client.sync(v1::SyncRequest {}).await {
        Ok(response) => response.into_inner(),
        Err(status) => return classify(status),
    };
    let _open = metrics.sync_opened();
    loop {
        let message = match stream.next().await {
            Some(Ok(message)) => {
                metrics.heard_from_daemon();
                message
            }
            Some(Err(status)) => return classify(status),
            None => return StreamEnd::Broken("the daemon closed the sync stream".into()),
        };
        let Some(update) = message.update else {
            continue;
        };
        if let Update::Evicted(evicted) = &update {
            return if evicted.banned {
                StreamEnd::Banned(evicted.reason.clone())
            } else {
                StreamEnd::Evicted(evicted.reason.clone())
            };
        }
        let bundle_changed = matches!(update, Update::BundleChanged(_) | Update::FullState(_));
        authorized.send_modify(|state| apply(state, update));
        if bundle_changed && let Some(bundle) = authorized.borrow().bundle.clone() {
            if let Err(e) = trust.replace(&bundle.x509_authorities) {
                tracing::warn!(error = %e, "the daemon sent an unusable bundle");
            }
            on_bundle(&bundle);
        }
    }
}

fn apply(state: &mut Authorized, update: Update) {
    match update {
        Update::FullState(full) => {
            if let Some(pushed) = &full.policy {
                state.policy = crate::policy::update(&state.policy, pushed);
            }
            state.entries = full
                .entries
                .into_iter()
                .map(|e| (e.id.clone(), e))
                .collect();
            if full.bundle.is_some() {
                state.bundle = full.bundle;
            }
            state.secrets = full
                .secrets
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect();
            state.deny = full
                .deny_list
                .into_iter()
                .map(|s| (s.serial, s.not_after))
                .collect();
            // Being served again means no longer revoked.
            state.revoked_all = false;
            let given: BTreeSet<String> = state
                .entries
                .values()
                .map(|e| e.spiffe_id.clone())
                .collect();
            state.revoked_ids.retain(|id| !given.contains(id));
            state
                .revoked_secrets
                .retain(|name| !state.secrets.contains_key(name));
            for revocation in full.revocations {
                revoke(state, revocation);
            }
            state.synced = true;
        }
        Update::Revoked(revocation) => revoke(state, revocation),
        Update::SecretUpdated(secret) => {
            state.revoked_secrets.remove(&secret.name);
            state.secrets.insert(secret.name.clone(), secret);
        }
        Update::SecretRemoved(name) => {
            state.secrets.remove(&name);
        }
        Update::EntryUpserted(entry) => {
            state.revoked_ids.remove(&entry.spiffe_id);
            state.entries.insert(entry.id.clone(), entry);
        }
        Update::EntryDeleted(id) => {
            state.entries.remove(&id);
        }
        Update::BundleChanged(bundle) => state.bundle = Some(bundle),
        Update::Evicted(_) => {}
    }
}

/// Applies a revocation to the authorized state and queues its acknowledgement.
fn revoke(state: &mut Authorized, revocation: v1::Revocation) {
    for id in &revocation.entry_ids {
        state.entries.remove(id);
    }
    for serial in &revocation.serials {
        state.deny.insert(serial.serial.clone(), serial.not_after);
    }
    let still_given: BTreeSet<&str> = state
        .entries
        .values()
        .map(|e| e.spiffe_id.as_str())
        .collect();
    for id in &revocation.spiffe_ids {
        if !still_given.contains(id.as_str()) {
            state.revoked_ids.insert(id.clone());
        }
    }
    // A secret granted only to revoked identities goes with them.
    let revoked: BTreeSet<&str> = revocation
        .spiffe_ids
        .iter()
        .map(String::as_str)
        .filter(|id| !still_given.contains(id))
        .collect();
    if !revoked.is_empty() {
        let mut gone = Vec::new();
        for (name, secret) in state.secrets.iter_mut() {
            let before = secret.granted_to.len();
            secret.granted_to.retain(|g| !revoked.contains(g.as_str()));
            if secret.granted_to.is_empty() && before > 0 {
                gone.push(name.clone());
            }
        }
        for name in gone {
            state.secrets.remove(&name);
            state.revoked_secrets.insert(name);
        }
    }
    // A secret an ended elevation gave: gone for those workloads, and from the agent
    // (its sinks emptied) once nobody here holds it.
    for withdrawn in &revocation.withdrawn_secrets {
        if let Some(secret) = state.secrets.get_mut(&withdrawn.name) {
            secret
                .granted_to
                .retain(|g| !withdrawn.spiffe_ids.contains(g));
            if secret.granted_to.is_empty() {
                state.secrets.remove(&withdrawn.name);
                state.revoked_secrets.insert(withdrawn.name.clone());
            }
        } else {
            state.revoked_secrets.insert(withdrawn.name.clone());
        }
    }
    for secret in &revocation.replacements {
        state.revoked_secrets.remove(&secret.name);
        state.secrets.insert(secret.name.clone(), secret.clone());
    }
    if revocation.everything {
        state
            .revoked_ids
            .extend(state.entries.values().map(|e| e.spiffe_id.clone()));
        state.entries.clear();
        state.secrets.clear();
        state.revoked_all = true;
    }
    if !state.revocations.iter().any(|r| r.id == revocation.id) {
        // The replacement values now live in `secrets`; the pending copy keeps none.
        let mut pending = revocation;
        pending.replacements.clear();
        state.revocations.push(pending);
    }
}

fn classify(status: tonic::Status) -> StreamEnd {
    let message = status.message().to_string();
    match status.code() {
        Code::PermissionDenied if message.contains("banned") => StreamEnd::Banned(message),
        Code::PermissionDenied | Code::Unauthenticated => StreamEnd::Evicted(message),
        _ => StreamEnd::Broken(format!("{:?}: {message}", status.code())),
    }
}

/// Reconnect delays: from 100 ms doubling to 10 s, with jitter so a fleet does not
/// reconnect in step after a daemon restart.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(10));
        let jitter = rand::random_range(0.8..1.2);
        base.mul_f64(jitter)
    }
}

/// Shares the current authenticated client; replaced after renewal or re-attestation.
pub type ClientCell = Arc<watch::Sender<NodeClient<Channel>>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> v1::Entry {
        v1::Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://example.org/{id}"),
            ..Default::default()
        }
    }

    #[test]
    fn updates_apply_in_order() {
        let mut state = Authorized::default();
        apply(
            &mut state,
            Update::FullState(v1::FullState {
                entries: vec![entry("a"), entry("b")],
                bundle: Some(v1::Bundle::default()),
                ..Default::default()
            }),
        );
        assert!(state.synced);
        apply(&mut state, Update::EntryDeleted("a".into()));
        apply(&mut state, Update::EntryUpserted(entry("c")));
        assert_eq!(
            state.entries.keys().cloned().collect::<Vec<_>>(),
            vec!["b", "c"]
        );
        // A new full state replaces, it does not merge.
        apply(
            &mut state,
            Update::FullState(v1::FullState {
                entries: vec![entry("z")],
                bundle: None,
                ..Default::default()
            }),
        );
        assert_eq!(state.entries.keys().cloned().collect::<Vec<_>>(), vec!["z"]);
        assert!(
            state.bundle.is_some(),
            "a full state without bundle keeps the old one"
        );
    }

    #[test]
    fn a_revocation_drops_entries_and_marks_ids() {
        let mut state = Authorized::default();
        apply(
            &mut state,
            Update::FullState(v1::FullState {
                entries: vec![entry("a"), entry("b")],
                ..Default::default()
            }),
        );
        apply(
            &mut state,
            Update::Revoked(v1::Revocation {
                id: "rv-1".into(),
                entry_ids: vec!["a".into()],
                spiffe_ids: vec!["spiffe://example.org/a".into()],
                serials: vec![v1::RevokedSerial {
                    serial: "0a".into(),
                    not_after: 9,
                }],
                ..Default::default()
            }),
        );
        assert_eq!(state.entries.keys().cloned().collect::<Vec<_>>(), vec!["b"]);
        assert!(state.revoked_ids.contains("spiffe://example.org/a"));
        assert_eq!(state.deny.get("0a"), Some(&9));
        assert_eq!(state.revocations.len(), 1);
        // Given again by a new entry: no longer revoked.
        apply(&mut state, Update::EntryUpserted(entry("a")));
        assert!(state.revoked_ids.is_empty());
        // Everything: the agent was banned.
        apply(
            &mut state,
            Update::Revoked(v1::Revocation {
                id: "rv-2".into(),
                everything: true,
                ..Default::default()
            }),
        );
        assert!(state.entries.is_empty() && state.revoked_all);
        assert_eq!(state.revocations.len(), 2);
    }

    #[test]
    fn revocations_keep_no_secret_value_and_debug_shows_none() {
        let mut state = Authorized::default();
        let secret = v1::GrantedSecret {
            name: "db".into(),
            version: "v2".into(),
            value: b"s3cr3t-Value-xyz".to_vec(),
            granted_to: vec!["spiffe://example.org/a".into()],
            ..Default::default()
        };
        apply(
            &mut state,
            Update::Revoked(v1::Revocation {
                id: "rv-1".into(),
                replacements: vec![secret],
                ..Default::default()
            }),
        );
        assert_eq!(state.secrets["db"].value, b"s3cr3t-Value-xyz");
        assert!(state.revocations[0].replacements.is_empty());
        let shown = format!("{state:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("v2"));
    }

    #[test]
    fn a_withdrawal_takes_a_secret_from_those_workloads_and_the_last_one_empties_sinks() {
        let mut state = Authorized::default();
        let secret = |to: &[&str]| v1::GrantedSecret {
            name: "deploy-key".into(),
            version: "v1".into(),
            value: b"hunter2".to_vec(),
            granted_to: to.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        apply(
            &mut state,
            Update::SecretUpdated(secret(&[
                "spiffe://example.org/a",
                "spiffe://example.org/b",
            ])),
        );
        let withdraw = |id: &str, from: &str| v1::Revocation {
            id: id.into(),
            kind: "elevation".into(),
            withdrawn_secrets: vec![v1::SecretWithdrawal {
                name: "deploy-key".into(),
                spiffe_ids: vec![from.into()],
                agent: String::new(),
            }],
            ..Default::default()
        };
        apply(
            &mut state,
            Update::Revoked(withdraw("rv-1", "spiffe://example.org/a")),
        );
        assert_eq!(
            state.secrets["deploy-key"].granted_to,
            ["spiffe://example.org/b"],
            "the other workload keeps it"
        );
        assert!(state.revoked_secrets.is_empty());
        apply(
            &mut state,
            Update::Revoked(withdraw("rv-2", "spiffe://example.org/b")),
        );
        assert!(!state.secrets.contains_key("deploy-key"));
        assert!(state.revoked_secrets.contains("deploy-key"), "sinks empty");
        assert_eq!(state.revocations.len(), 2, "each is acknowledged");
    }

    #[test]
    fn backoff_grows_to_a_cap() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(first <= Duration::from_millis(120));
        for _ in 0..20 {
            backoff.next_delay();
        }
        assert!(backoff.next_delay() <= Duration::from_secs(12));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(120));
    }

    #[test]
    fn refusals_are_classified() {
        assert!(matches!(
            classify(tonic::Status::permission_denied("agent x is banned")),
            StreamEnd::Banned(_)
        ));
        assert!(matches!(
            classify(tonic::Status::permission_denied("agent x has been evicted")),
            StreamEnd::Evicted(_)
        ));
        assert!(matches!(
            classify(tonic::Status::unavailable("down")),
            StreamEnd::Broken(_)
        ));
    }
}
