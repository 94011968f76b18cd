//! What one agent may see: the entries it serves, and the secrets the policies let one of
//! their SPIFFE IDs or the agent itself read (the built-in policy: those the definition
//! grants them, or an active elevation of the secret gives them). Read from the registry's and the rotation engine's published snapshots
//! (watch channels) and the active policy set, never from the store and never under a lock
//! another stream waits on, so a sync stream decides what to push without a query.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::policy::{
    Access, AccessContext, Action, PolicyDecision, PolicyEngine, Principal, Resource, Source,
};
use crate::secrets::spec::SecretSpec;
use crate::store::EntryRecord;

/// The registry's entries by id and by agent, as it publishes them.
pub type EntryIndex = Arc<crate::identity::index::Entries>;

/// The loaded secret definitions, sorted by name, as the rotation engine publishes them.
pub type Definitions = Arc<[SecretSpec]>;

/// A secret one agent may hold, with the SPIFFE IDs it goes to there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub secret: String,
    pub to: Vec<String>,
    /// The policy sets of its definition, which the agent decides with too.
    pub sets: Vec<String>,
    /// The hash of the policy set that granted it.
    pub policy_set: String,
}

/// A secret an active elevation gives one workload on one agent, as the elevation engine
/// publishes them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ElevatedSecret {
    pub agent: String,
    pub holder: String,
    pub secret: String,
    pub elevation: String,
}

/// Every active elevation of a secret, sorted.
pub type ElevatedSecrets = Arc<Vec<ElevatedSecret>>;

#[derive(Clone)]
pub struct Visibility {
    entries: watch::Receiver<EntryIndex>,
    definitions: watch::Receiver<Definitions>,
    policy: Arc<PolicyEngine>,
    elevated: Arc<watch::Sender<ElevatedSecrets>>,
}

impl Visibility {
    pub fn new(
        entries: watch::Receiver<EntryIndex>,
        definitions: watch::Receiver<Definitions>,
        policy: Arc<PolicyEngine>,
    ) -> Self {
        Self {
            entries,
            definitions,
            policy,
            elevated: Arc::new(watch::channel(ElevatedSecrets::default()).0),
        }
    }

    /// Replaces the secrets active elevations give; streams of the agents whose share
    /// changed push their state again.
    pub fn publish_elevated(&self, mut elevated: Vec<ElevatedSecret>) {
        elevated.sort();
        self.elevated.send_if_modified(|current| {
            if **current == elevated {
                return false;
            }
            *current = Arc::new(elevated);
            true
        });
    }

    pub fn subscribe_elevated(&self) -> watch::Receiver<ElevatedSecrets> {
        self.elevated.subscribe()
    }

    /// The elevations that give `agent`'s workloads a secret, by id.
    pub fn elevated_for(&self, agent: &str) -> Vec<String> {
        self.elevated
            .borrow()
            .iter()
            .filter(|e| e.agent == agent)
            .map(|e| e.elevation.clone())
            .collect()
    }

    pub fn policy(&self) -> &Arc<PolicyEngine> {
        &self.policy
    }

    /// Every entry, as the registry published them last.
    pub fn all_entries(&self) -> EntryIndex {
        self.entries.borrow().clone()
    }

    /// Every secret definition, as the rotation engine published them last.
    pub fn secret_definitions(&self) -> Definitions {
        self.definitions.borrow().clone()
    }

    /// Entries whose parent is `agent`, sorted by SPIFFE ID then id.
    pub fn entries(&self, agent: &str) -> Vec<Arc<EntryRecord>> {
        self.entries.borrow().of_parent(agent).cloned().collect()
    }

    /// Every secret `agent` may hold, sorted by name.
    pub fn grants(&self, agent: &str) -> Vec<Grant> {
        let definitions = self.definitions.borrow().clone();
        let served = self.served(agent);
        definitions
            .iter()
            .filter_map(|spec| self.grant_of(spec, &served, agent))
            .collect()
    }

    /// The grant of one secret to `agent`, when it has one.
    pub fn grant(&self, agent: &str, secret: &str) -> Option<Grant> {
        let definitions = self.definitions.borrow().clone();
        let spec = definitions.iter().find(|s| s.name == secret)?;
        self.grant_of(spec, &self.served(agent), agent)
    }

    /// Whether the policies let `holder`, a workload `agent` serves, obtain a credential
    /// (`ttl_seconds` asked, through `method`). Unserved is refused before any policy;
    /// a policy's denial is on the audit trail under `credential.issue`. `elevated`: an
    /// active elevation of `holder` grants it, so the policies see it among the grants
    /// (a `forbid` still wins).
    pub fn credential_decision(
        &self,
        agent: &str,
        holder: &str,
        spec: &crate::creds::spec::CredentialSpec,
        elevated: bool,
        ttl_seconds: i64,
        method: &str,
    ) -> Result<PolicyDecision, CredentialRefusal> {
        let Some(mut selectors) = self.served(agent).remove(holder) else {
            return Err(CredentialRefusal::Unserved(format!(
                "agent {agent} serves no workload {holder}"
            )));
        };
        selectors.sort();
        selectors.dedup();
        let mut grants = spec.grants.clone();
        if elevated && !grants.iter().any(|g| g == holder) {
            grants.push(holder.to_string());
        }
        let access = Access {
            principal: Principal::Workload { spiffe_id: holder },
            action: Action::ObtainCredential,
            resource: Resource::Credential {
                name: &spec.name,
                kind: spec.kind(),
                grants: &grants,
                sets: &spec.sets,
                max_ttl_seconds: spec.max().as_secs() as i64,
            },
            context: AccessContext {
                node: agent,
                selectors: &selectors,
                ttl_seconds,
                source: Source::NodeApi,
                method,
                elevation: None,
            },
        };
        self.policy
            .authorize(&access, "credential.issue")
            .map_err(|denied| CredentialRefusal::Policy(denied.reason))
    }

    /// What the daemon knows of `holder` as `agent` serves it: its entries' selectors and
    /// policy sets, each sorted and without duplicates; `None` when it serves no such
    /// workload.
    pub fn holder(&self, agent: &str, holder: &str) -> Option<(Vec<String>, Vec<String>)> {
        let mut selectors = Vec::new();
        let mut sets = Vec::new();
        let mut found = false;
        for entry in self.entries.borrow().of_parent(agent) {
            if entry.spiffe_id == holder {
                found = true;
                selectors.extend(entry.selectors.iter().cloned());
                sets.extend(entry.sets.iter().cloned());
            }
        }
        selectors.sort();
        selectors.dedup();
        sets.sort();
        sets.dedup();
        found.then_some((selectors, sets))
    }

    /// The SPIFFE IDs `agent` serves workloads as, with their entries' selectors.
    fn served(&self, agent: &str) -> BTreeMap<String, Vec<String>> {
        let mut served: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for entry in self.entries.borrow().of_parent(agent) {
            served
                .entry(entry.spiffe_id.clone())
                .or_default()
                .extend(entry.selectors.iter().cloned());
        }
        served
    }

    /// Who, of `agent` itself and the identities it serves, the policies let read `spec`.
    /// A denial of what the definition grants is on the audit trail; not being granted is
    /// not (it is the usual case, asked on every sync).
    fn grant_of(
        &self,
        spec: &SecretSpec,
        served: &BTreeMap<String, Vec<String>>,
        agent: &str,
    ) -> Option<Grant> {
        let itself = (agent.to_string(), Vec::new());
        let elevated = self.elevated.borrow().clone();
        let mut to = Vec::new();
        let mut policy_set = String::new();
        for (holder, selectors) in served.iter().chain(std::iter::once((&itself.0, &itself.1))) {
            let principal = if holder == agent {
                Principal::Agent { spiffe_id: agent }
            } else {
                Principal::Workload { spiffe_id: holder }
            };
            // An active elevation of the secret grants it to its requester here, so the
            // policies see the requester among the grants (a `forbid` still wins).
            let is_elevated = holder != agent
                && elevated
                    .iter()
                    .any(|e| e.agent == agent && e.holder == *holder && e.secret == spec.name);
            let with_elevation;
            let grants = if is_elevated && !spec.grants.contains(holder) {
                with_elevation = spec
                    .grants
                    .iter()
                    .cloned()
                    .chain(std::iter::once(holder.clone()))
                    .collect::<Vec<_>>();
                &with_elevation
            } else {
                &spec.grants
            };
            let access = Access {
                principal,
                action: Action::ReadSecret,
                resource: Resource::Secret {
                    name: &spec.name,
                    grants,
                    sets: &spec.sets,
                },
                context: AccessContext {
                    node: agent,
                    selectors,
                    ttl_seconds: 0,
                    source: Source::NodeApi,
                    method: "Sync",
                    elevation: None,
                },
            };
            let decision = if grants.contains(holder) {
                self.policy.authorize(&access, "secret.grant").ok()
            } else {
                Some(self.policy.decide(&access)).filter(|d| d.allowed)
            };
            if let Some(decision) = decision.filter(PolicyDecision::granted) {
                policy_set = decision.hash;
                if !to.contains(holder) {
                    to.push(holder.clone());
                }
            }
        }
        (!to.is_empty()).then(|| Grant {
            secret: spec.name.clone(),
            to,
            sets: spec.sets.clone(),
            policy_set,
        })
    }
}

/// Why an agent may not have a credential for a holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialRefusal {
    /// The agent has no entry for the holder (not a policy question).
    Unserved(String),
    /// The policies deny it (already on the audit trail).
    Policy(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::index::Entries;

    fn entry(id: &str, spiffe_id: &str, parent: &str) -> EntryRecord {
        EntryRecord {
            id: id.to_string(),
            spiffe_id: spiffe_id.to_string(),
            parent_id: parent.to_string(),
            ..Default::default()
        }
    }

    fn spec(name: &str, grants: &[&str]) -> SecretSpec {
        let mut spec = SecretSpec::from_toml(&format!(
            "name = \"{name}\"\nschedule = \"@yearly\"\n[store]\nkind = \"local\"\n[target]\nkind = \"none\"\n"
        ))
        .expect("spec");
        spec.grants = grants.iter().map(|g| g.to_string()).collect();
        spec
    }

    #[test]
    fn an_agent_sees_its_own_entries_and_the_secrets_granted_to_them() {
        let node_a = "spiffe://example.org/node/a";
        let node_b = "spiffe://example.org/node/b";
        let index: EntryIndex = Arc::new(Entries::new([
            entry("2", "spiffe://example.org/web", node_a),
            entry("1", "spiffe://example.org/api", node_a),
            entry("3", "spiffe://example.org/db", node_b),
        ]));
        let definitions: Definitions = vec![
            spec("db-password", &["spiffe://example.org/db"]),
            spec("shared", &["spiffe://example.org/web", node_b]),
            spec("web-token", &["spiffe://example.org/web"]),
        ]
        .into();
        let (_entries_tx, entries) = watch::channel(index);
        let (_definitions_tx, definitions) = watch::channel(definitions);
        let policy = PolicyEngine::load(
            crate::policy::PolicyConfig::default(),
            Arc::new(mayfly_common::clock::SystemClock),
        )
        .expect("built-in policies");
        let view = Visibility::new(entries, definitions, Arc::new(policy));

        let ids: Vec<_> = view
            .entries(node_a)
            .iter()
            .map(|e| e.spiffe_id.clone())
            .collect();
        assert_eq!(
            ids,
            ["spiffe://example.org/api", "spiffe://example.org/web"]
        );
        let names: Vec<_> = view.grants(node_a).into_iter().map(|g| g.secret).collect();
        assert_eq!(names, ["shared", "web-token"]);
        assert_eq!(
            view.grant(node_b, "shared").map(|g| g.to),
            Some(vec![node_b.to_string()]),
            "a grant to the agent itself counts"
        );
        assert_eq!(view.grant(node_a, "db-password"), None);
        assert_eq!(view.grant(node_a, "no-such-secret"), None);
    }
}
