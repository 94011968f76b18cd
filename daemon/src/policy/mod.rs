//! Runtime authorization: every grant is a Cedar request decided when it is asked for,
//! against the built-in policies (which grant what entries and definitions grant) and the
//! operator's files in `policy_dir`, validated against the schema Mayfly ships.
//!
//! The active set is published through a watch channel and replaced whole, so a reload
//! under load is atomic: a decision sees the old set or the new one. A set that does not
//! parse or validate is refused and the old one keeps deciding.

mod load;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use tokio::sync::watch;

use crate::audit::{Actor, Audit, Event};
use crate::identity::Clock;

pub use load::{load_dir, sources};
pub use mayfly_common::policy::{
    Access, AccessContext, Action, ActiveSet, Compiled, Decider, ElevationFacts, EntryFacts,
    LoadError, PolicyDecision, PolicyProblem, PolicySource, Principal, Resource, Source, compile,
    schema,
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

/// The policies deciding now, and when they were loaded (unix seconds).
pub struct ActivePolicy {
    pub set: ActiveSet,
    pub loaded_at: i64,
}

impl std::ops::Deref for ActivePolicy {
    type Target = ActiveSet;

    fn deref(&self) -> &ActiveSet {
        &self.set
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
    decider: Decider,
    active: watch::Sender<Arc<ActivePolicy>>,
    audit: Option<Audit>,
    clock: Arc<dyn Clock>,
}

impl PolicyEngine {
    /// Loads the built-in policies and `config.dir`; an error names the file, line and
    /// column of every problem.
    pub fn load(config: PolicyConfig, clock: Arc<dyn Clock>) -> Result<Self, LoadError> {
        let decider = Decider::new()?;
        let active = Self::read(&config, &decider, clock.as_ref())?;
        Ok(Self {
            config,
            decider,
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

    pub fn decider(&self) -> &Decider {
        &self.decider
    }

    fn read(
        config: &PolicyConfig,
        decider: &Decider,
        clock: &dyn Clock,
    ) -> Result<ActivePolicy, LoadError> {
        let set = decider.compile(load::sources(config)?, config.enforce)?;
        Ok(ActivePolicy {
            set,
            loaded_at: mayfly_common::clock::unix(clock.now()),
        })
    }

    /// The directory the operator's policies are read from.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.config.dir.as_deref()
    }

    /// Reads the policy files again. A set that does not load is refused, with the
    /// problems named, and the one active stays; either way the attempt is on the trail.
    pub async fn reload(&self, actor: &Actor) -> Result<Arc<ActivePolicy>, LoadError> {
        let loaded = Self::read(&self.config, &self.decider, self.clock.as_ref());
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
        self.decider.decide(&self.current(), access, now)
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
        let actor = actor_of(access);
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

/// Who the audit trail names for a request: the agent that asked, or the operator.
pub fn actor_of(access: &Access<'_>) -> Actor {
    match access.principal {
        Principal::Operator { uid, .. } => Actor::Operator(uid),
        Principal::Agent { spiffe_id } => Actor::Spiffe(spiffe_id.to_string()),
        Principal::Workload { spiffe_id } if access.context.node.is_empty() => {
            Actor::Spiffe(spiffe_id.to_string())
        }
        Principal::Workload { .. } => Actor::Spiffe(access.context.node.to_string()),
    }
}

/// `entry` as the policies see it.
pub fn entry_facts(entry: &crate::store::EntryRecord) -> EntryFacts<'_> {
    EntryFacts {
        id: &entry.id,
        spiffe_id: &entry.spiffe_id,
        parent: &entry.parent_id,
        selectors: &entry.selectors,
        hint: &entry.hint,
        sets: &entry.sets,
    }
}

#[cfg(test)]
mod tests;
