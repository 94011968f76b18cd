//! Runtime authorization's core, shared by the daemon (which decides node-API grants and
//! admin calls, and loads the operator's files) and the agent (which decides Workload API
//! calls with the set the daemon pushes): the schema Mayfly ships, the built-in policies,
//! compiling a set of sources, and deciding one request against it with Cedar.

mod access;
mod compile;

use std::collections::HashMap;
use std::time::SystemTime;

use cedar_policy::{Authorizer, Decision, Entity, EntityUid, PolicySet, Schema};

pub use access::{
    Access, AccessContext, Action, ElevationFacts, EntryFacts, Principal, Resource, Source,
};
pub use compile::{
    Compiled, DEFAULTS, DEFAULTS_NAME, LoadError, PolicyProblem, PolicySource, SCHEMA, compile,
    schema, schema_action_entities,
};

/// A compiled policy set, ready to decide.
pub struct ActiveSet {
    /// SHA-256 (hex) over every source's name and text and the mode: what each granting
    /// record carries, so that the set that granted can be found again.
    pub hash: String,
    /// False in shadow mode: denials are reported, not enforced.
    pub enforce: bool,
    /// Each source's name with its policies' ids.
    pub listing: Vec<(String, Vec<String>)>,
    /// The texts it was compiled from (what the daemon pushes to agents).
    pub sources: Vec<PolicySource>,
    all: PolicySet,
    /// The set as Cedar's JSON policy format, made once when first asked for.
    json: std::sync::OnceLock<String>,
    /// The policies that can apply to each action, indexed by the entities their scopes
    /// name, so that a decision evaluates only those that can apply (Cedar evaluates
    /// every policy of the set it is given: 1,000 policies cost 200 µs a decision).
    by_action: HashMap<Action, ActionPolicies>,
    /// Decisions already made with this set, by request ([`Access::key`]), for the actions
    /// whose policies cannot read the time: the same request against the same set is the
    /// same decision (Cedar is deterministic, and a request's entities are built from the
    /// request alone), and deciding it again cost a tenth of each signing. A set is never
    /// changed, only replaced, and the replacement starts empty.
    decisions: std::sync::Mutex<HashMap<Vec<u8>, PolicyDecision>>,
}

/// At most this many decisions are remembered per set; when full, they are forgotten all
/// at once and remembered again as they come (a few MB at most, at an agent too).
const REMEMBERED: usize = 16_384;

impl ActiveSet {
    fn remembered(&self, key: &[u8]) -> Option<PolicyDecision> {
        self.decisions.lock().ok()?.get(key).cloned()
    }

    fn remember(&self, key: Vec<u8>, decision: &PolicyDecision) {
        if let Ok(mut decisions) = self.decisions.lock() {
            if decisions.len() >= REMEMBERED {
                decisions.clear();
            }
            decisions.insert(key, decision.clone());
        }
    }
}

/// One action's policies: those whose scope names a resource (or a set of resources) or
/// a principal, by that entity, and the rest.
#[derive(Default)]
pub(crate) struct ActionPolicies {
    pub(crate) general: PolicySet,
    pub(crate) by_resource: HashMap<EntityUid, PolicySet>,
    pub(crate) by_principal: HashMap<EntityUid, PolicySet>,
    /// Whether any of them may read `context.time` (requests leave it out otherwise).
    pub(crate) reads_time: bool,
}

/// Where one action's permits can apply, read off the index: what a reach computation must
/// decide (anything no permit can reach is denied without asking).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PermitScopes {
    /// Ids of the permits whose scope names no principal or resource entity.
    pub general: Vec<String>,
    /// Principal entities some permit names, as (type, id): `("Mayfly::Workload", "spiffe://…")`.
    pub principals: Vec<(String, String)>,
    /// Resource entities (a resource or a set of them) some permit names, as (type, id).
    pub resources: Vec<(String, String)>,
}

fn has_permit(set: &PolicySet) -> bool {
    set.policies()
        .any(|p| p.effect() == cedar_policy::Effect::Permit)
}

fn parts(uid: &EntityUid) -> (String, String) {
    (
        uid.type_name().to_string(),
        uid.id().unescaped().to_string(),
    )
}

impl ActiveSet {
    /// The scopes of `action`'s permits in this set.
    pub fn permit_scopes(&self, action: Action) -> PermitScopes {
        let Some(policies) = self.by_action.get(&action) else {
            return PermitScopes::default();
        };
        let mut general: Vec<String> = policies
            .general
            .policies()
            .filter(|p| p.effect() == cedar_policy::Effect::Permit)
            .map(|p| p.id().to_string())
            .collect();
        general.sort();
        let pick = |map: &HashMap<EntityUid, PolicySet>| {
            let mut out: Vec<(String, String)> = map
                .iter()
                .filter(|(_, set)| has_permit(set))
                .map(|(uid, _)| parts(uid))
                .collect();
            out.sort();
            out
        };
        PermitScopes {
            general,
            principals: pick(&policies.by_principal),
            resources: pick(&policies.by_resource),
        }
    }

    /// The first 12 hex digits of the hash, as messages show it.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }

    pub fn policy_count(&self) -> usize {
        self.all.policies().count()
    }

    /// Every policy as Cedar prints it.
    pub fn text(&self) -> String {
        self.all.to_string()
    }

    /// The set as Cedar's JSON policy format: what agents compile, without the grammar.
    pub fn json(&self) -> &str {
        self.json.get_or_init(|| {
            self.all
                .clone()
                .to_json()
                .map(|v| v.to_string())
                .unwrap_or_default()
        })
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

/// Whether a refusal's message is a policy's denial (`PolicyDecision::denial`), as an
/// agent tells it from a missing entry in the daemon's answer.
pub fn is_denial(message: &str) -> bool {
    message.contains("denied by policy ") || message.contains("no policy permits it")
}

/// Checks the names of the policy sets a resource is in (`sets = [..]` on an entry, a
/// secret or a credential) and returns them sorted, without duplicates: 1 to 128
/// characters, none of them a control character, at most 64 sets.
pub fn check_set_names(names: &[String]) -> Result<Vec<String>, String> {
    if names.len() > 64 {
        return Err(format!("{} sets; at most 64", names.len()));
    }
    for name in names {
        if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
            return Err(format!(
                "set name {name:?}: 1 to 128 characters, no control characters"
            ));
        }
    }
    let mut sorted = names.to_vec();
    sorted.sort();
    sorted.dedup();
    Ok(sorted)
}

/// The schema and its action entities, loaded once per process; compiles sets and
/// decides requests against them.
pub struct Decider {
    /// The schema sets are validated against; none at an agent, which decides only what
    /// its daemon validated (and so never loads the schema parser or the validator).
    schema: Option<Schema>,
    /// The schema's action entities (their groups), part of every request's entities.
    actions: Vec<Entity>,
    /// Per action, its own entity and its groups': all a request's action needs (a
    /// request with every action entity costs a third more, measured).
    action_entities: HashMap<Action, Vec<Entity>>,
}

impl Decider {
    /// A decider that validates what it compiles against the shipped schema.
    pub fn new() -> Result<Self, LoadError> {
        Ok(Self::with_schema(Some(compile::schema()?)))
    }

    /// A decider that compiles without validating: for sets validated elsewhere.
    pub fn unvalidated() -> Self {
        Self::with_schema(None)
    }

    fn with_schema(schema: Option<Schema>) -> Self {
        let actions = compile::action_entities();
        let action_entities = Action::ALL
            .into_iter()
            .map(|action| {
                let mut names = vec![action.name()];
                names.extend_from_slice(action.groups());
                let own = actions
                    .iter()
                    .filter(|e| names.iter().any(|n| e.uid() == access::action_uid(n)))
                    .cloned()
                    .collect();
                (action, own)
            })
            .collect();
        Self {
            schema,
            actions,
            action_entities,
        }
    }

    pub fn schema(&self) -> Option<&Schema> {
        self.schema.as_ref()
    }

    pub fn actions(&self) -> &[Entity] {
        &self.actions
    }

    /// `sources` parsed and validated into a set that decides; refused whole, with every
    /// problem named, when any has one.
    pub fn compile(
        &self,
        sources: Vec<PolicySource>,
        enforce: bool,
    ) -> Result<ActiveSet, LoadError> {
        compile::active(sources, enforce, self.schema.as_ref())
    }

    /// A set compiled elsewhere, pushed as Cedar's JSON policy format (not validated).
    pub fn compile_json(
        &self,
        json: &str,
        hash: String,
        enforce: bool,
    ) -> Result<ActiveSet, LoadError> {
        compile::from_json(json, hash, enforce)
    }

    /// The built-in policies alone.
    pub fn defaults(&self, enforce: bool) -> Result<ActiveSet, LoadError> {
        self.compile(vec![PolicySource::defaults()], enforce)
    }

    /// Decides `access` against `set` as at `now`; records nothing.
    pub fn decide(&self, set: &ActiveSet, access: &Access<'_>, now: SystemTime) -> PolicyDecision {
        let Some(policies) = set.by_action.get(&access.action) else {
            return decision(set, false, Vec::new(), Vec::new());
        };
        if policies.reads_time {
            return self.evaluate(set, policies, access, Some(now));
        }
        let key = access.key();
        if let Some(decision) = set.remembered(&key) {
            return decision;
        }
        let decision = self.evaluate(set, policies, access, None);
        set.remember(key, &decision);
        decision
    }

    /// Asks Cedar about `access`, with the time in its context when `now` is given.
    fn evaluate(
        &self,
        set: &ActiveSet,
        policies: &ActionPolicies,
        access: &Access<'_>,
        now: Option<SystemTime>,
    ) -> PolicyDecision {
        let actions = self
            .action_entities
            .get(&access.action)
            .map_or(&self.actions[..], Vec::as_slice);
        let (request, entities) = match access.cedar_request(actions, now) {
            Ok(built) => built,
            // Our own request did not build: deny, and say why.
            Err(e) => return decision(set, false, Vec::new(), vec![e]),
        };
        // The subsets that can apply, each decided by Cedar, combined as Cedar combines
        // policies: any satisfied forbid denies; otherwise any satisfied permit allows.
        let (principal, resources) = access.scope_uids();
        let subsets = std::iter::once(&policies.general)
            .chain(policies.by_principal.get(&principal))
            .chain(resources.iter().filter_map(|r| policies.by_resource.get(r)));
        let authorizer = Authorizer::new();
        let (mut forbids, mut permits, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        let mut permitted = false;
        for subset in subsets {
            let response = authorizer.is_authorized(&request, subset, &entities);
            let reasons = response.diagnostics().reason().map(|id| id.to_string());
            if response.decision() == Decision::Allow {
                permitted = true;
                permits.extend(reasons);
            } else {
                // A deny's reasons are the forbids that held (none: no permit applied).
                forbids.extend(reasons);
            }
            errors.extend(response.diagnostics().errors().map(|e| e.to_string()));
        }
        let allowed = permitted && forbids.is_empty();
        let mut reasons = if allowed { permits } else { forbids };
        reasons.sort();
        decision(set, allowed, reasons, errors)
    }
}

fn decision(
    set: &ActiveSet,
    allowed: bool,
    policies: Vec<String>,
    errors: Vec<String>,
) -> PolicyDecision {
    PolicyDecision {
        allowed,
        policies,
        errors,
        hash: set.hash.clone(),
        enforce: set.enforce,
    }
}

#[cfg(test)]
mod tests;
