//! The daemon's Cedar policies, decided here too: the daemon pushes its active set with
//! the agent's state, and the Workload API asks it before it hands a workload an
//! X509-SVID or a JWT-SVID, with the selectors the agent attested for the caller. A deny
//! therefore holds while the daemon is unreachable, and is decided on what only the agent
//! knows (the calling process), which the daemon never sees.

use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use mayfly_common::Selector;
use mayfly_common::policy::{
    Access, AccessContext, Action, ActiveSet, DEFAULTS, DEFAULTS_NAME, Decider, EntryFacts,
    PolicyDecision, PolicySource, Principal, Resource, Source,
};
use mayfly_proto::v1;

use crate::state::{EntryView, WorkloadState};

/// Unvalidated: the daemon validated the set against the schema before pushing it, and
/// leaving the schema parser and validator out keeps their code out of the agent's memory.
static DECIDER: LazyLock<Decider> = LazyLock::new(Decider::unvalidated);

/// A policy set as the daemon pushed it, compiled.
pub struct AgentPolicy {
    set: ActiveSet,
}

impl AgentPolicy {
    /// Compiles what the daemon pushed; refused (the agent keeps the set it has) when it
    /// does not validate here, which only an agent older than its daemon would see.
    pub fn compile(pushed: &v1::PolicySet) -> Result<Self, String> {
        let decider = &*DECIDER;
        if !pushed.json.is_empty() {
            let set = decider
                .compile_json(&pushed.json, pushed.hash.clone(), pushed.enforce)
                .map_err(|e| e.to_string())?;
            return Ok(Self { set });
        }
        let sources = pushed
            .sources
            .iter()
            .map(|s| PolicySource {
                name: s.name.clone(),
                text: s.text.clone(),
            })
            .collect();
        let set = decider
            .compile(sources, pushed.enforce)
            .map_err(|e| e.to_string())?;
        Ok(Self { set })
    }

    /// The daemon's hash of the set.
    pub fn hash(&self) -> &str {
        &self.set.hash
    }

    fn decide(&self, access: &Access<'_>) -> PolicyDecision {
        DECIDER.decide(&self.set, access, SystemTime::now())
    }
}

impl PartialEq for AgentPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.set.hash == other.set.hash
    }
}

impl std::fmt::Debug for AgentPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentPolicy")
            .field("hash", &self.set.hash)
            .field("enforce", &self.set.enforce)
            .finish_non_exhaustive()
    }
}

/// What a workload asks the agent for.
#[derive(Debug, Clone, Copy)]
pub enum WorkloadAsk<'a> {
    X509Svid,
    JwtSvid {
        audience: &'a str,
    },
    /// A secret the daemon granted to `granted_to` here (the holders it decided).
    Secret {
        name: &'a str,
        granted_to: &'a [String],
        sets: &'a [String],
    },
    /// A credential, with the facts the daemon sent when it issued it.
    Credential {
        name: &'a str,
        kind: &'a str,
        facts: &'a v1::CredentialFacts,
        ttl_seconds: i64,
    },
}

/// Whether the caller (with `caller` selectors) may have `ask` for `entry` under the
/// pushed policies; `Err` carries the denial, naming the deciding policies. Without a
/// pushed set (an older daemon) nothing is decided here.
pub fn check(
    state: &WorkloadState,
    entry: &EntryView,
    caller: &[Selector],
    ask: WorkloadAsk<'_>,
) -> Result<(), String> {
    let Some(policy) = state.policy.as_ref() else {
        return Ok(());
    };
    let entry_selectors: Vec<String> = entry.selectors.iter().map(|s| s.to_string()).collect();
    let caller_selectors: Vec<String> = caller.iter().map(|s| s.to_string()).collect();
    let facts = EntryFacts {
        id: &entry.id,
        spiffe_id: entry.spiffe_id.as_str(),
        parent: &state.node,
        selectors: &entry_selectors,
        hint: &entry.hint,
        sets: &entry.sets,
    };
    let (action, resource, method) = match ask {
        WorkloadAsk::X509Svid => (
            Action::SignX509Svid,
            Resource::Entry(facts),
            "FetchX509SVID",
        ),
        WorkloadAsk::JwtSvid { audience } => (
            Action::MintJwtSvid,
            Resource::Audience(audience),
            "FetchJWTSVID",
        ),
        // The agent knows of a secret only the holders the daemon granted it to among its
        // own entries, and of a credential only whether it is granted to the holder.
        WorkloadAsk::Secret {
            name,
            granted_to,
            sets,
        } => (
            Action::ReadSecret,
            Resource::Secret {
                name,
                grants: granted_to,
                sets,
            },
            "WatchSecrets",
        ),
        WorkloadAsk::Credential {
            name, kind, facts, ..
        } => (
            Action::ObtainCredential,
            Resource::Credential {
                name,
                kind,
                grants: &facts.grants,
                sets: &facts.sets,
                max_ttl_seconds: facts.max_ttl_seconds,
            },
            "GetCredential",
        ),
    };
    let ttl_seconds = match ask {
        WorkloadAsk::Credential { ttl_seconds, .. } => ttl_seconds,
        _ => 0,
    };
    let access = Access {
        principal: Principal::Workload {
            spiffe_id: entry.spiffe_id.as_str(),
        },
        action,
        resource,
        context: AccessContext {
            node: &state.node,
            selectors: &caller_selectors,
            ttl_seconds,
            source: Source::WorkloadApi,
            method,
            elevation: None,
        },
    };
    let decision = policy.decide(&access);
    if decision.allowed {
        return Ok(());
    }
    let what = match ask {
        WorkloadAsk::X509Svid => format!("X509-SVID {}", entry.spiffe_id),
        WorkloadAsk::JwtSvid { audience } => {
            format!("JWT-SVID {} for audience {audience}", entry.spiffe_id)
        }
        WorkloadAsk::Secret { name, .. } => format!("secret {name} for {}", entry.spiffe_id),
        WorkloadAsk::Credential { name, .. } => {
            format!("credential {name} for {}", entry.spiffe_id)
        }
    };
    if !decision.enforce {
        tracing::warn!(%what, reason = %decision.denial(), "shadow mode: a policy would deny this Workload API request");
        return Ok(());
    }
    Err(format!("{what}: {}", decision.denial()))
}

/// Whether `pushed` is the built-in policies and nothing else. Those permit every SVID an
/// entry gives and every secret the daemon granted, which is what the agent hands out
/// anyway, so such a set is not compiled here: Cedar's code then stays out of the agent's
/// memory (measured: about 4 MiB of code pages) on every install without policies of its
/// own.
fn only_built_in(pushed: &v1::PolicySet) -> bool {
    matches!(pushed.sources.as_slice(), [only] if only.name == DEFAULTS_NAME && only.text == DEFAULTS)
}

/// The pushed set, compiled unless it is the one already held or the built-in one.
pub fn update(
    current: &Option<Arc<AgentPolicy>>,
    pushed: &v1::PolicySet,
) -> Option<Arc<AgentPolicy>> {
    if only_built_in(pushed) {
        if current.is_some() {
            tracing::info!(policy_set = %pushed.hash, "the daemon decides with its built-in policies alone; nothing more is decided here");
        }
        return None;
    }
    if current.as_ref().is_some_and(|p| p.hash() == pushed.hash) {
        return current.clone();
    }
    match AgentPolicy::compile(pushed) {
        Ok(policy) => {
            tracing::info!(policy_set = %pushed.hash, "policy set received from the daemon");
            Some(Arc::new(policy))
        }
        Err(e) => {
            tracing::warn!(error = %e, policy_set = %pushed.hash, "the daemon's policy set does not compile here; keeping the one held");
            current.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_that_does_not_parse_is_not_adopted() {
        let pushed = v1::PolicySet {
            hash: "h".into(),
            enforce: true,
            sources: vec![v1::PolicySource {
                name: "x.cedar".into(),
                text: "forbid(principal, action, resource".into(),
            }],
            json: String::new(),
        };
        assert!(AgentPolicy::compile(&pushed).is_err());
        assert!(
            update(&None, &pushed).is_none(),
            "a broken set is not adopted"
        );
    }

    #[test]
    fn a_pushed_json_set_that_does_not_read_is_refused() {
        let pushed = v1::PolicySet {
            hash: "h".into(),
            enforce: true,
            sources: Vec::new(),
            json: "{\"staticPolicies\": 7}".into(),
        };
        assert!(AgentPolicy::compile(&pushed).is_err());
    }

    #[test]
    fn the_built_in_set_alone_is_not_compiled_and_anything_more_is() {
        let built_in = v1::PolicySource {
            name: DEFAULTS_NAME.into(),
            text: DEFAULTS.into(),
        };
        let pushed = v1::PolicySet {
            hash: "h1".into(),
            enforce: true,
            sources: vec![built_in.clone()],
            json: String::new(),
        };
        assert!(update(&None, &pushed).is_none());
        let more = v1::PolicySet {
            hash: "h2".into(),
            sources: vec![
                built_in,
                v1::PolicySource {
                    name: "a.cedar".into(),
                    text: "forbid(principal, action, resource);".into(),
                },
            ],
            ..pushed.clone()
        };
        let compiled = update(&None, &more).expect("compiled");
        assert!(
            update(&Some(compiled), &pushed).is_none(),
            "back to the built-in set"
        );
    }
}
