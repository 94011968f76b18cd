//! One agent's sync stream: the full state when it connects, then each change that
//! concerns it (its entries, revocations it must apply, promoted versions of the secrets
//! it may hold, the trust bundle; the whole state again when the policies change), until
//! it goes away, is evicted or the daemon stops.
//!
//! What the agent may see is decided by the view (`crate::visibility`); a promoted value
//! and a revocation's replacements arrive with their values, read from the secret's store
//! once for every stream, so pushing them here reads nothing.

use std::collections::BTreeMap;

use tokio::sync::watch;

use super::*;
use crate::ca::manager::Authorities;
use crate::identity::{Change, RevocationNotice};
use crate::secrets::engine::Promoted;
use crate::visibility::Grant;

/// Everything a sync stream listens to, subscribed to before the agent is checked and its
/// snapshot taken, so that no change falls in between.
pub(super) struct Subscriptions {
    changes: broadcast::Receiver<Change>,
    authorities: watch::Receiver<Arc<Authorities>>,
    closing: watch::Receiver<bool>,
    promoted: broadcast::Receiver<Arc<Promoted>>,
    policy: watch::Receiver<Arc<crate::policy::ActivePolicy>>,
    elevated: watch::Receiver<crate::visibility::ElevatedSecrets>,
}

impl Subscriptions {
    pub(super) fn take(api: &NodeApi) -> Self {
        Self {
            changes: api.registry.subscribe_changes(),
            authorities: api.registry.ca().subscribe(),
            closing: api.registry.closing(),
            promoted: api.secrets.subscribe(),
            policy: api.view.policy().subscribe(),
            elevated: api.view.subscribe_elevated(),
        }
    }
}

/// Which secrets go to which of an agent's identities: what, when it changes, sends the
/// whole state again.
fn grant_names(grants: &[Grant]) -> Vec<(String, Vec<String>)> {
    grants
        .iter()
        .map(|g| (g.secret.clone(), g.to.clone()))
        .collect()
}

/// A promoted value as one agent receives it: only the SPIFFE IDs it serves the grant to.
fn granted(grant: Grant, value: &Promoted) -> v1::GrantedSecret {
    v1::GrantedSecret {
        name: grant.secret,
        version: value.version.clone(),
        username: value.credential.username.clone(),
        value: value.credential.password.expose().as_bytes().to_vec(),
        granted_to: grant.to,
        sets: grant.sets,
    }
}

impl NodeApi {
    /// Sends the full state, then streams changes from a task of its own.
    pub(super) async fn open_sync(
        &self,
        agent_id: String,
        subscriptions: Subscriptions,
    ) -> Result<Response<SyncStream>, Status> {
        let Subscriptions {
            mut changes,
            mut authorities,
            mut closing,
            mut promoted,
            mut policy,
            mut elevated,
        } = subscriptions;
        let mut elevations_here = self.view.elevated_for(&agent_id);
        // What the agent was granted when its state was last sent whole: an entry that
        // comes or goes can grant or take a secret, and then the whole state goes again.
        let mut granted_here = grant_names(&self.view.grants(&agent_id));
        let (tx, rx) = mpsc::channel(256);
        tx.send(Ok(self.full_state(&agent_id).await?))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;
        let api = self.clone();
        let connected = self.metrics.agent_connected();
        tokio::spawn(async move {
            let _connected = connected;
            tracing::debug!(agent = %agent_id, "sync stream open");
            loop {
                let message = tokio::select! {
                    _ = tx.closed() => break,
                    _ = async { let _ = closing.wait_for(|c| *c).await; } => break,
                    change = changes.recv() => match change {
                        Ok(Change::EntryUpserted(entry)) if entry.parent_id == agent_id => {
                            let update = Update::EntryUpserted(convert::entry(&entry));
                            match api.entry_change(&agent_id, &mut granted_here, update).await {
                                Some(update) => update,
                                None => break,
                            }
                        }
                        Ok(Change::EntryDeleted { id, parent_id }) if parent_id == agent_id => {
                            let update = Update::EntryDeleted(id);
                            match api.entry_change(&agent_id, &mut granted_here, update).await {
                                Some(update) => update,
                                None => break,
                            }
                        }
                        Ok(Change::Revoked(notice)) if notice.agents.contains(&agent_id) => {
                            let RevocationNotice { message, replacements, shares, .. } = &*notice;
                            let own = shares.message_for(&agent_id, message);
                            Update::Revoked(api.with_replacements(&agent_id, own, replacements))
                        }
                        Ok(Change::AgentEvicted { spiffe_id, banned, reason })
                            if spiffe_id == agent_id =>
                        {
                            let _ = tx
                                .send(Ok(v1::SyncMessage {
                                    update: Some(Update::Evicted(v1::AgentEvicted { reason, banned })),
                                }))
                                .await;
                            break;
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // Missed changes: resend everything rather than guess.
                            match api.full_state(&agent_id).await {
                                Ok(v1::SyncMessage { update: Some(update) }) => update,
                                _ => break,
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    promotion = promoted.recv() => match promotion {
                        Ok(value) => {
                            let Some(grant) = api.view.grant(&agent_id, &value.secret) else {
                                continue;
                            };
                            let version = granted(grant, &value);
                            api.note_grants(&agent_id, std::slice::from_ref(&version));
                            Update::SecretUpdated(version)
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            match api.full_state(&agent_id).await {
                                Ok(v1::SyncMessage { update: Some(update) }) => update,
                                _ => break,
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    changed = authorities.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        Update::BundleChanged(api.bundle())
                    }
                    // A secret an elevation gives one of its workloads, or takes back.
                    changed = elevated.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let now_here = api.view.elevated_for(&agent_id);
                        if now_here == elevations_here {
                            continue;
                        }
                        elevations_here = now_here;
                        match api.full_state(&agent_id).await {
                            Ok(v1::SyncMessage { update: Some(update) }) => update,
                            _ => break,
                        }
                    }
                    // What the agent may hold is decided again under the new policies.
                    changed = policy.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        match api.full_state(&agent_id).await {
                            Ok(v1::SyncMessage { update: Some(update) }) => update,
                            _ => break,
                        }
                    }
                };
                if tx
                    .send(Ok(v1::SyncMessage {
                        update: Some(message),
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            tracing::debug!(agent = %agent_id, "sync stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// Everything the agent should hold now: its entries, the bundle, the secrets it may
    /// hold, the revocations it has not acknowledged, and the deny list. Each granted
    /// secret is read from its store once.
    async fn full_state(&self, agent: &str) -> Result<v1::SyncMessage, Status> {
        let (pending, deny_list) = self.revoker.pending_for(agent).await.map_err(|e| {
            tracing::error!(agent, error = %e, "could not read the revocations for an agent");
            Status::unavailable("the daemon cannot read its revocations now; retry")
        })?;
        let mut values: BTreeMap<String, Option<Arc<Promoted>>> = BTreeMap::new();
        let grants = self.view.grants(agent);
        for name in grants
            .iter()
            .map(|g| &g.secret)
            .chain(pending.iter().flat_map(|(_, secrets)| secrets))
        {
            if !values.contains_key(name) {
                values.insert(name.clone(), self.read_current(name).await);
            }
        }
        let revocations = pending
            .into_iter()
            .map(|(message, secrets)| {
                let replacements: Vec<_> = secrets
                    .iter()
                    .filter_map(|name| values.get(name).cloned().flatten())
                    .collect();
                self.with_replacements(agent, message, &replacements)
            })
            .collect();
        let secrets: Vec<_> = grants
            .into_iter()
            .filter_map(|grant| {
                let value = values.get(&grant.secret).cloned().flatten()?;
                Some(granted(grant, &value))
            })
            .collect();
        self.note_grants(agent, &secrets);
        Ok(v1::SyncMessage {
            update: Some(Update::FullState(v1::FullState {
                entries: self
                    .view
                    .entries(agent)
                    .iter()
                    .map(|e| convert::entry(e))
                    .collect(),
                bundle: Some(self.bundle()),
                secrets,
                revocations,
                deny_list,
                policy: Some(self.policy_set()),
            })),
        })
    }

    /// `update` for an entry change of `agent`'s, or its whole state when the change also
    /// granted or took a secret (`granted`: what it was last sent); `None` when the state
    /// cannot be read.
    async fn entry_change(
        &self,
        agent: &str,
        granted: &mut Vec<(String, Vec<String>)>,
        update: Update,
    ) -> Option<Update> {
        let now = grant_names(&self.view.grants(agent));
        if now == *granted {
            return Some(update);
        }
        *granted = now;
        match self.full_state(agent).await {
            Ok(v1::SyncMessage {
                update: Some(update),
            }) => Some(update),
            _ => None,
        }
    }

    /// The active policy set as agents receive it.
    fn policy_set(&self) -> v1::PolicySet {
        let active = self.view.policy().current();
        v1::PolicySet {
            hash: active.hash.clone(),
            enforce: active.enforce,
            sources: active
                .sources
                .iter()
                .map(|s| v1::PolicySource {
                    name: s.name.clone(),
                    text: s.text.clone(),
                })
                .collect(),
            json: active.json().to_string(),
        }
    }

    /// A secret's current value; a store that cannot answer now leaves it out (the agent
    /// keeps what it has, and the next promotion or reconnect brings it).
    async fn read_current(&self, name: &str) -> Option<Arc<Promoted>> {
        match self.secrets.promoted(name).await {
            Ok(value) => value,
            Err(e) => {
                tracing::warn!(secret = %name, error = %e, "could not read a granted secret for an agent");
                None
            }
        }
    }

    /// A revocation as this agent receives it (already cut to its share,
    /// [`crate::revoke::Shares`]): with the replacement values of the revoked secrets it
    /// may hold.
    fn with_replacements(
        &self,
        agent: &str,
        mut message: v1::Revocation,
        replacements: &[Arc<Promoted>],
    ) -> v1::Revocation {
        for value in replacements {
            if let Some(grant) = self.view.grant(agent, &value.secret) {
                message.replacements.push(granted(grant, value));
            }
        }
        message
    }

    fn note_grants(&self, agent: &str, secrets: &[v1::GrantedSecret]) {
        let policy_set = self.view.policy().current().hash.clone();
        for secret in secrets {
            self.audit.note(
                Event::new(
                    &Actor::Spiffe(agent.to_string()),
                    "secret.grant",
                    &secret.name,
                )
                .scope(format!(
                    "version {} to {}",
                    secret.version,
                    secret.granted_to.join(", ")
                ))
                .detail(serde_json::json!({ "policy_set": policy_set })),
            );
        }
    }
}
