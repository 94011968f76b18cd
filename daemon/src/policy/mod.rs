//! Runtime authorization: every grant is a Cedar request decided when it is asked for,
//! against the built-in policies (which grant what entries and definitions grant) and the
//! operator's files in `policy_dir`, validated against the schema Mayfly ships.
//!
//! The active set is published through a watch channel and replaced whole, so a reload
//! under load is atomic: a decision sees the old set or the new one. A set that does not
//! parse or validate is refused and the old one keeps deciding.

mod access;
mod load;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use cedar_policy::{Authorizer, Decision, Entity, PolicySet, Schema};
use serde::Deserialize;
use tokio::sync::watch;

use crate::audit::{Actor, Audit, Event};
use crate::identity::Clock;

pub use access::{Access, AccessContext, Action, Principal, Resource, Source};
pub use load::{
    Compiled, LoadError, PolicyProblem, PolicySource, compile, load_dir, schema, sources,
};

/// `[policy]` in daemon.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Every `*.cedar` file here is loaded (sorted by name); none when absent.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// False: shadow mode, where a denial is logged and audited as one that would have
    /// been made, and nothing is refused.
    #[serde(default = "yes")]
    pub enforce: bool,
    /// False: only the files of `dir` decide, without the built-in policies, so nothing
    /// is granted that a policy of `dir` does not permit.
    #[serde(default = "yes")]
    pub defaults: bool,
}

fn yes() -> bool {
    true
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: None,
            enforce: true,
            defaults: true,
        }
    }
}

/// The policies deciding now.
pub struct ActivePolicy {
    /// SHA-256 (hex) over every source's name and text and the mode: what each granting
    /// record carries, so that the set that granted can be found again.
    pub hash: String,
    pub enforce: bool,
    /// The files it came from (the built-in one first), with their policies' ids.
    pub sources: Vec<(String, Vec<String>)>,
    /// When it was loaded, unix seconds.
    pub loaded_at: i64,
    all: PolicySet,
    /// The policies that can apply to each action, so that a decision evaluates only
    /// those (Cedar evaluates every policy of the set it is given).
    by_action: HashMap<Action, PolicySet>,
}

impl ActivePolicy {
    /// The first 12 hex digits of the hash, as messages show it.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }

    pub fn policy_count(&self) -> usize {
        self.all.policies().count()
    }

    pub fn text(&self) -> String {
        self.all.to_string()
    }
}

/// What one request got.
#[derive(Debug, Clone)]
pub struct PolicyDecision {
    /// Whether Cedar allowed it.
    pub allowed: bool,
    /// The policies that decided: those that permitted an allow, or the forbids (or
    /// nothing, when no permit applied) behind a deny.
    pub policies: Vec<String>,
    /// Policies whose evaluation failed (they count as not applying).
    pub errors: Vec<String>,
    pub hash: String,
    pub enforce: bool,
}

impl PolicyDecision {
    /// Whether the caller gets it: allowed, or denied in shadow mode.
    pub fn granted(&self) -> bool {
        self.allowed || !self.enforce
    }

    /// The reason a denial gives, naming the deciding policies and the set.
    pub fn denial(&self) -> String {
        let set = &self.hash[..12.min(self.hash.len())];
        if self.policies.is_empty() {
            format!("not granted: no policy permits it (policy set {set})")
        } else {
            format!(
                "denied by policy {} (policy set {set})",
                self.policies.join(", ")
            )
        }
    }
}

/// A request the active policies denied; the audit record is already written.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct PolicyDenied {
    pub reason: String,
    pub decision: PolicyDecision,
}

/// Decides requests against the active policies and reloads them.
pub struct PolicyEngine {
    config: PolicyConfig,
    schema: Arc<Schema>,
    /// The schema's action entities (their groups), part of every request's entities.
    actions: Vec<Entity>,
    active: watch::Sender<Arc<ActivePolicy>>,
    audit: Option<Audit>,
    clock: Arc<dyn Clock>,
}

impl PolicyEngine {
    /// Loads the built-in policies and `config.dir`; an error names the file, line and
    /// column of every problem.
    pub fn load(config: PolicyConfig, clock: Arc<dyn Clock>) -> Result<Self, LoadError> {
        let schema = Arc::new(load::schema()?);
        let actions = load::action_entities(&schema)?;
        let now = mayfly_common::clock::unix(clock.now());
        let active = load::active(&config, &schema, now)?;
        Ok(Self {
            config,
            schema,
            actions,
            active: watch::Sender::new(Arc::new(active)),
            audit: None,
            clock,
        })
    }

    /// Denials (and, in shadow mode, would-be denials) go on this trail.
    pub fn with_audit(mut self, audit: Audit) -> Self {
        self.audit = Some(audit);
        self
    }

    pub fn current(&self) -> Arc<ActivePolicy> {
        self.active.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ActivePolicy>> {
        self.active.subscribe()
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The directory the operator's policies are read from.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.config.dir.as_deref()
    }

    /// Reads the policy files again. A set that does not load is refused, with the
    /// problems named, and the one active stays; either way the attempt is on the trail.
    pub async fn reload(&self, actor: &Actor) -> Result<Arc<ActivePolicy>, LoadError> {
        let now = mayfly_common::clock::unix(self.clock.now());
        let loaded = load::active(&self.config, &self.schema, now);
        let before = self.current();
        let event = Event::new(actor, "policy.reload", before.short_hash());
        match loaded {
            Ok(active) => {
                let active = Arc::new(active);
                self.active.send_replace(active.clone());
                tracing::info!(policy_set = %active.short_hash(), policies = active.policy_count(), "policy set loaded");
                if let Some(audit) = &self.audit {
                    let event = Event::new(actor, "policy.reload", active.short_hash())
                        .scope(format!("{} policies", active.policy_count()))
                        .detail(serde_json::json!({
                            "policy_set": active.hash,
                            "previous": before.hash,
                            "enforce": active.enforce,
                        }));
                    let _ = audit.record(event).await;
                }
                Ok(active)
            }
            Err(e) => {
                tracing::warn!(error = %e, "policy set refused; the active one stays");
                if let Some(audit) = &self.audit {
                    let _ = audit
                        .record(event.outcome(crate::audit::FAILED).reason(e.to_string()))
                        .await;
                }
                Err(e)
            }
        }
    }

    /// Decides `access` without recording anything.
    pub fn decide(&self, access: &Access<'_>) -> PolicyDecision {
        self.decide_at(access, self.clock.now())
    }

    /// Decides `access` as if it were `now` (`policy test` with a time), recording nothing.
    pub fn decide_at(&self, access: &Access<'_>, now: SystemTime) -> PolicyDecision {
        let active = self.current();
        let decision = |allowed, policies, errors| PolicyDecision {
            allowed,
            policies,
            errors,
            hash: active.hash.clone(),
            enforce: active.enforce,
        };
        let (request, entities) = match access.cedar_request(&self.actions, now) {
            Ok(built) => built,
            // Our own request did not build: deny, and say why.
            Err(e) => return decision(false, Vec::new(), vec![e]),
        };
        let empty = PolicySet::new();
        let policies = active.by_action.get(&access.action).unwrap_or(&empty);
        let response = Authorizer::new().is_authorized(&request, policies, &entities);
        let mut reasons: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| id.to_string())
            .collect();
        reasons.sort();
        let errors = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        decision(response.decision() == Decision::Allow, reasons, errors)
    }

    /// Decides `access`; a denial is put on the audit trail (aggregated, it can be
    /// repeated at will) under `audit_action`, naming the deciding policies. In shadow
    /// mode a denial is recorded as one that would have been made and the request passes.
    pub fn authorize(
        &self,
        access: &Access<'_>,
        audit_action: &str,
    ) -> Result<PolicyDecision, PolicyDenied> {
        let decision = self.decide(access);
        if decision.allowed {
            return Ok(decision);
        }
        let reason = decision.denial();
        let actor = access.actor();
        tracing::warn!(actor = %actor, action = %access.action.name(), resource = %access.resource.id(), enforce = decision.enforce, reason = %reason, "policy denial");
        if let Some(audit) = &self.audit {
            let event = Event::new(&actor, audit_action, access.resource.id())
                .scope(access.scope())
                .detail(serde_json::json!({
                    "policy_set": decision.hash,
                    "deciding": decision.policies,
                    "action": access.action.name(),
                    "errors": decision.errors,
                }));
            audit.note_refusal(if decision.enforce {
                event.denied(reason.clone())
            } else {
                event
                    .outcome(crate::audit::WOULD_DENY)
                    .reason(format!("shadow mode, not enforced: {reason}"))
            });
        }
        if decision.enforce {
            Err(PolicyDenied { reason, decision })
        } else {
            Ok(decision)
        }
    }

    /// Watches SIGHUP and reloads on each; runs until the process ends.
    pub fn reload_on_sighup(self: Arc<Self>) -> Result<(), std::io::Error> {
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                // The reason is logged and on the trail; the old set keeps deciding.
                let _ = self.reload(&Actor::Daemon).await;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests;
