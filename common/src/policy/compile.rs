//! Compiling policies: the shipped schema and built-in set, and sources (files, or what the
//! daemon pushes to agents) each parsed and then validated together in strict mode. Every
//! problem is reported with its file, line and column, and a set with any problem is
//! refused whole.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use aws_lc_rs::digest;
use cedar_policy::{
    ActionConstraint, Entity, EntityUid, Policy, PolicyId, PolicySet, PrincipalConstraint,
    ResourceConstraint, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

use super::access::{Action, action_uid};
use super::{ActionPolicies, ActiveSet};

/// The schema every policy is validated against.
pub const SCHEMA: &str = include_str!("mayfly.cedarschema");

/// The built-in policies, loaded unless `defaults = false`.
pub const DEFAULTS: &str = include_str!("default.cedar");

/// The name the built-in policies go by in messages.
pub const DEFAULTS_NAME: &str = "(built-in) default.cedar";

/// One policy file, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySource {
    /// The file name (or the built-in set's name).
    pub name: String,
    pub text: String,
}

impl PolicySource {
    /// The built-in policies.
    pub fn defaults() -> Self {
        Self {
            name: DEFAULTS_NAME.to_string(),
            text: DEFAULTS.to_string(),
        }
    }
}

/// One problem in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    pub file: String,
    /// 1-based; 0 when the problem has no place (a file that cannot be read).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("the policy set is refused: {}", join(.0))]
    Invalid(Vec<PolicyProblem>),
    #[error("policy directory {dir}: {message}")]
    Dir { dir: String, message: String },
    #[error("Mayfly's own policy schema does not load: {0}")]
    Schema(String),
}

impl LoadError {
    /// Each problem on a line of its own, for a terminal.
    pub fn problems(&self) -> Vec<String> {
        match self {
            LoadError::Invalid(problems) => problems.iter().map(|p| p.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

fn join(problems: &[PolicyProblem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn schema() -> Result<Schema, LoadError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(schema, _warnings)| schema)
        .map_err(|e| LoadError::Schema(e.to_string()))
}

/// The schema's actions as entities, each with the groups it is in, built from
/// [`Action`] (a test checks they are the schema's), so that no schema need be parsed to
/// decide.
pub fn action_entities() -> Vec<Entity> {
    let mut groups: Vec<&str> = Action::ALL
        .iter()
        .flat_map(|a| a.groups())
        .copied()
        .collect();
    groups.sort_unstable();
    groups.dedup();
    Action::ALL
        .iter()
        .map(|a| {
            let parents = a.groups().iter().map(|g| action_uid(g)).collect();
            Entity::new_no_attrs(a.uid(), parents)
        })
        .chain(
            groups
                .into_iter()
                .map(|g| Entity::new_no_attrs(action_uid(g), Default::default())),
        )
        .collect()
}

/// The action entities the schema declares.
pub fn schema_action_entities(schema: &Schema) -> Result<Vec<Entity>, LoadError> {
    Ok(schema
        .action_entities()
        .map_err(|e| LoadError::Schema(e.to_string()))?
        .iter()
        .cloned()
        .collect())
}

/// A set that parsed and validated.
pub struct Compiled {
    pub set: PolicySet,
    /// What the validator warns of (policies that can never apply, say), with places.
    pub warnings: Vec<String>,
    /// Each source's name with the ids of its policies.
    pub listing: Vec<(String, Vec<String>)>,
}

/// Parses and validates `sources` into one set: each policy takes its `@id("…")` as its
/// id, or `<file>#<n>` (its place in the file, from 1). Duplicate ids, templates, parse
/// and validation errors are problems; any problem refuses the whole set. Warnings
/// (policies that can never apply, say) come back beside the set.
/// Without a schema nothing is validated: the agent compiles only what its daemon has
/// validated already, and so never loads the validator.
pub fn compile(sources: &[PolicySource], schema: Option<&Schema>) -> Result<Compiled, LoadError> {
    let mut problems = Vec::new();
    let mut all = PolicySet::new();
    // Policy id -> (file, text), to place validation errors.
    let mut origin: HashMap<String, usize> = HashMap::new();
    let mut listing = Vec::new();
    for (index, source) in sources.iter().enumerate() {
        let parsed = match PolicySet::from_str(&source.text) {
            Ok(parsed) => parsed,
            Err(errors) => {
                for error in errors.iter() {
                    problems.push(place(source, error, error.to_string()));
                }
                continue;
            }
        };
        if parsed.templates().next().is_some() {
            problems.push(PolicyProblem {
                file: source.name.clone(),
                line: 0,
                column: 0,
                message: "policy templates (with ?principal or ?resource) are not supported; \
                          write static policies"
                    .to_string(),
            });
            continue;
        }
        let mut ids = Vec::new();
        // Policies come back in no particular order; the parser numbers them in the
        // order of the file (policy0, policy1, ...).
        let mut policies: Vec<_> = parsed.policies().collect();
        policies.sort_by_key(|p| {
            p.id()
                .to_string()
                .trim_start_matches("policy")
                .parse::<usize>()
                .unwrap_or(usize::MAX)
        });
        for (n, policy) in policies.into_iter().enumerate() {
            let id = policy
                .annotation("id")
                .map(str::to_string)
                .unwrap_or_else(|| format!("{}#{}", source.name, n + 1));
            if let Some(first) = origin.get(&id) {
                problems.push(place_at(
                    source,
                    None,
                    format!(
                        "policy id `{id}` is already used in {}; ids must be unique",
                        sources[*first].name
                    ),
                ));
                continue;
            }
            origin.insert(id.clone(), index);
            ids.push(id.clone());
            if let Err(e) = all.add(policy.new_id(PolicyId::new(&id))) {
                problems.push(place_at(source, None, e.to_string()));
            }
        }
        listing.push((source.name.clone(), ids));
    }
    if !problems.is_empty() {
        return Err(LoadError::Invalid(problems));
    }
    let Some(schema) = schema else {
        return Ok(Compiled {
            set: all,
            warnings: Vec::new(),
            listing,
        });
    };
    let result = Validator::new(schema.clone()).validate(&all, ValidationMode::Strict);
    for error in result.validation_errors() {
        let id = error.policy_id().to_string();
        let source = &sources[origin.get(&id).copied().unwrap_or(0)];
        problems.push(place(source, error, error_text(error)));
    }
    if !problems.is_empty() {
        return Err(LoadError::Invalid(problems));
    }
    let warnings = result
        .validation_warnings()
        .map(|w| {
            let id = w.policy_id().to_string();
            let source = &sources[origin.get(&id).copied().unwrap_or(0)];
            place(source, w, error_text(w)).to_string()
        })
        .collect();
    Ok(Compiled {
        set: all,
        warnings,
        listing,
    })
}

/// The error's message with its help, when it has one.
fn error_text(error: &(impl Diagnostic + std::fmt::Display)) -> String {
    match error.help() {
        Some(help) => format!("{error} ({help})"),
        None => error.to_string(),
    }
}

/// `message` placed at the first label of `diagnostic` in `source`.
fn place(source: &PolicySource, diagnostic: &dyn Diagnostic, message: String) -> PolicyProblem {
    let offset = diagnostic
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    let message = match diagnostic.help() {
        Some(help) if !message.contains(&help.to_string()) => format!("{message} ({help})"),
        _ => message,
    };
    place_at(source, offset, message)
}

fn place_at(source: &PolicySource, offset: Option<usize>, message: String) -> PolicyProblem {
    let (line, column) = match offset {
        Some(offset) => line_column(&source.text, offset),
        None => (0, 0),
    };
    PolicyProblem {
        file: source.name.clone(),
        line,
        column,
        message,
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// `sources` compiled into the set that decides, with its hash and per-action subsets.
pub fn active(
    sources: Vec<PolicySource>,
    enforce: bool,
    schema: Option<&Schema>,
) -> Result<ActiveSet, LoadError> {
    let Compiled {
        set: all,
        warnings,
        listing,
    } = compile(&sources, schema)?;
    for warning in &warnings {
        tracing::warn!(%warning, "policy warning");
    }
    let hash = hash(&sources, enforce);
    Ok(indexed(all, hash, enforce, listing, sources))
}

/// A set already compiled elsewhere, as Cedar's JSON policy format (what a daemon pushes
/// to its agents): read without Cedar's policy grammar, not validated, `hash` as given.
pub fn from_json(json: &str, hash: String, enforce: bool) -> Result<ActiveSet, LoadError> {
    let invalid = |message: String| {
        LoadError::Invalid(vec![PolicyProblem {
            file: "(pushed policy set)".into(),
            line: 0,
            column: 0,
            message,
        }])
    };
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
    let all = PolicySet::from_json_value(value).map_err(|e| invalid(e.to_string()))?;
    let ids = all.policies().map(|p| p.id().to_string()).collect();
    Ok(indexed(
        all,
        hash,
        enforce,
        vec![("(pushed policy set)".into(), ids)],
        Vec::new(),
    ))
}

/// `all` with each action's policies indexed by the entities their scopes name.
fn indexed(
    all: PolicySet,
    hash: String,
    enforce: bool,
    listing: Vec<(String, Vec<String>)>,
    sources: Vec<PolicySource>,
) -> ActiveSet {
    let mut by_action = HashMap::new();
    for action in Action::ALL {
        let mut subset = ActionPolicies::default();
        for policy in all.policies() {
            if applies_to(&policy.action_constraint(), action) {
                subset.reads_time |= may_read_time(policy);
                // Ids are unique in `all`, so adding to a subset cannot clash.
                let _ = subset_for(&mut subset, policy).add(policy.clone());
            }
        }
        by_action.insert(action, subset);
    }
    ActiveSet {
        hash,
        enforce,
        listing,
        sources,
        all,
        by_action,
        json: std::sync::OnceLock::new(),
        decisions: std::sync::Mutex::default(),
    }
}

/// Whether `policy` may read `context.time`: it names the attribute (`context.time`,
/// `context has time`, `context["time"]` all read as the attribute `time` in Cedar's JSON
/// form, whatever escapes the text used), or it uses `context` as a whole. When in doubt,
/// yes: a request without `time` makes a policy that reads it fail, and a failed forbid
/// does not deny.
pub(super) fn may_read_time(policy: &Policy) -> bool {
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(map) => {
                map.iter().any(|(key, value)| match (key.as_str(), value) {
                    ("." | "has", serde_json::Value::Object(access)) => match access.get("left") {
                        // `context.x` reads one attribute; on anything else `.time` is not it.
                        Some(left) if is_context(left) => {
                            access.get("attr").and_then(|a| a.as_str()) == Some("time")
                        }
                        Some(left) => walk(left),
                        None => true,
                    },
                    _ if is_context(v) => true,
                    _ => walk(value),
                })
            }
            serde_json::Value::Array(items) => items.iter().any(walk),
            _ => false,
        }
    }
    fn is_context(v: &serde_json::Value) -> bool {
        v.get("Var").and_then(|var| var.as_str()) == Some("context")
    }
    match policy.to_json() {
        Ok(json) => walk(&json),
        Err(_) => true,
    }
}

/// Where a policy of one action goes: under the entity its resource scope names (`==` or
/// `in`), else under the one its principal scope names, else with those that apply to any
/// request. A decision then evaluates the general policies and only the indexed ones its
/// principal, resource and the resource's sets name.
fn subset_for<'a>(subset: &'a mut ActionPolicies, policy: &Policy) -> &'a mut PolicySet {
    let resource = match policy.resource_constraint() {
        ResourceConstraint::Eq(uid)
        | ResourceConstraint::In(uid)
        | ResourceConstraint::IsIn(_, uid) => Some(uid),
        _ => None,
    };
    if let Some(uid) = resource {
        return subset.by_resource.entry(uid).or_default();
    }
    let principal: Option<EntityUid> = match policy.principal_constraint() {
        PrincipalConstraint::Eq(uid)
        | PrincipalConstraint::In(uid)
        | PrincipalConstraint::IsIn(_, uid) => Some(uid),
        _ => None,
    };
    match principal {
        Some(uid) => subset.by_principal.entry(uid).or_default(),
        None => &mut subset.general,
    }
}

/// Whether a policy with `constraint` can apply to `action` (its groups included).
fn applies_to(constraint: &ActionConstraint, action: Action) -> bool {
    let mut names = vec![action.name()];
    names.extend_from_slice(action.groups());
    let matches = |uid: &cedar_policy::EntityUid| names.iter().any(|n| *uid == action_uid(n));
    match constraint {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(uid) => matches(uid),
        ActionConstraint::In(uids) => uids.iter().any(matches),
    }
}

fn hash(sources: &[PolicySource], enforce: bool) -> String {
    // Names and texts are length-prefixed, so no two different sets hash alike.
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"mayfly-policy-v1");
    ctx.update(&[u8::from(enforce)]);
    let ordered: BTreeMap<usize, &PolicySource> = sources.iter().enumerate().collect();
    for source in ordered.values() {
        for part in [source.name.as_bytes(), source.text.as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
    }
    hex::encode(ctx.finish().as_ref())
}
