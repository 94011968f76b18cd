//! One authorization request in Mayfly's terms (who, what, on what, in which context),
//! and its translation into Cedar's entities, request and context. Everything here is
//! built by the daemon or the agent from what it attested and recorded.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::SystemTime;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request, RestrictedExpression,
};

/// The actions of the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    SignX509Svid,
    MintJwtSvid,
    ReadSecret,
    ObtainCredential,
    RequestElevation,
    ReviewElevation,
    ActivateElevation,
    RejectElevation,
    ViewElevation,
    AdminRead,
    AdminWrite,
    Rotate,
    Revoke,
}

impl Action {
    pub const ALL: [Action; 13] = [
        Action::SignX509Svid,
        Action::MintJwtSvid,
        Action::ReadSecret,
        Action::ObtainCredential,
        Action::RequestElevation,
        Action::ReviewElevation,
        Action::ActivateElevation,
        Action::RejectElevation,
        Action::ViewElevation,
        Action::AdminRead,
        Action::AdminWrite,
        Action::Rotate,
        Action::Revoke,
    ];

    /// The action's id in the schema (`Mayfly::Action::"<name>"`).
    pub fn name(self) -> &'static str {
        match self {
            Action::SignX509Svid => "sign_x509_svid",
            Action::MintJwtSvid => "mint_jwt_svid",
            Action::ReadSecret => "read_secret",
            Action::ObtainCredential => "obtain_credential",
            Action::RequestElevation => "request_elevation",
            Action::ReviewElevation => "review_elevation",
            Action::ActivateElevation => "activate_elevation",
            Action::RejectElevation => "reject_elevation",
            Action::ViewElevation => "view_elevation",
            Action::AdminRead => "admin_read",
            Action::AdminWrite => "admin_write",
            Action::Rotate => "rotate",
            Action::Revoke => "revoke",
        }
    }

    /// Whether its context is the elevation context (`Mayfly::ElevationContext`).
    pub fn is_elevation(self) -> bool {
        matches!(
            self,
            Action::RequestElevation
                | Action::ReviewElevation
                | Action::ActivateElevation
                | Action::RejectElevation
                | Action::ViewElevation
        )
    }

    /// The action groups it is in, besides itself.
    pub fn groups(self) -> &'static [&'static str] {
        match self {
            Action::AdminRead | Action::AdminWrite | Action::Rotate | Action::Revoke => &["admin"],
            _ => &[],
        }
    }

    pub fn parse(name: &str) -> Option<Action> {
        let name = name
            .strip_prefix("Mayfly::Action::")
            .map(|quoted| quoted.trim_matches('"'))
            .unwrap_or(name);
        Action::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The action of an admin API method: reading, rotating, revoking or changing.
    pub fn of_admin_method(method: &str) -> Action {
        let reads = ["List", "Get", "Show", "Verify", "Test", "BlastRadius"];
        if method == "RotateSecret" {
            Action::Rotate
        } else if method.starts_with("Revoke") || method == "TaintCa" {
            Action::Revoke
        } else if reads.iter().any(|r| method.starts_with(r)) {
            Action::AdminRead
        } else {
            Action::AdminWrite
        }
    }

    pub(super) fn uid(self) -> EntityUid {
        action_uid(self.name())
    }
}

pub(crate) fn action_uid(name: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(TYPES.action.clone(), EntityId::new(name))
}

/// Who asks.
#[derive(Debug, Clone, Copy)]
pub enum Principal<'a> {
    /// A node agent, for itself (a secret granted to the agent).
    Agent {
        spiffe_id: &'a str,
    },
    /// A workload, by the SPIFFE ID its entry gives it.
    Workload {
        spiffe_id: &'a str,
    },
    Operator {
        uid: u32,
        name: &'a str,
    },
}

/// A registration entry as a policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct EntryFacts<'a> {
    pub id: &'a str,
    pub spiffe_id: &'a str,
    /// The SPIFFE ID of the agent that serves it.
    pub parent: &'a str,
    pub selectors: &'a [String],
    pub hint: &'a str,
    /// The policy sets (`Mayfly::EntrySet`) it is in.
    pub sets: &'a [String],
}

/// What it asks for.
#[derive(Debug, Clone, Copy)]
pub enum Resource<'a> {
    Entry(EntryFacts<'a>),
    Audience(&'a str),
    Secret {
        name: &'a str,
        grants: &'a [String],
        sets: &'a [String],
    },
    Credential {
        name: &'a str,
        kind: &'a str,
        grants: &'a [String],
        sets: &'a [String],
        max_ttl_seconds: i64,
    },
    AdminCall(&'a str),
}

impl Resource<'_> {
    /// Its entity id: the entry's id, the audience, the name or the method.
    pub fn id(&self) -> &str {
        match self {
            Resource::Entry(entry) => entry.id,
            Resource::Audience(aud) => aud,
            Resource::Secret { name, .. } | Resource::Credential { name, .. } => name,
            Resource::AdminCall(method) => method,
        }
    }
}

/// Where the call came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    NodeApi,
    AdminSocket,
    WorkloadApi,
    /// The daemon's elevation socket, which every local user may reach.
    ElevationSocket,
}

impl Source {
    pub fn parse(name: &str) -> Option<Source> {
        [
            Source::NodeApi,
            Source::AdminSocket,
            Source::WorkloadApi,
            Source::ElevationSocket,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Source::NodeApi => "node_api",
            Source::AdminSocket => "admin_socket",
            Source::WorkloadApi => "workload_api",
            Source::ElevationSocket => "elevation_socket",
        }
    }
}

/// What the server knows of an elevation request when it decides about it; the elevation
/// actions' context carries it besides the common fields. The counts are the server's.
#[derive(Debug, Clone, Copy, Default)]
pub struct ElevationFacts<'a> {
    /// Who asked: `uid:1000` for an operator, the SPIFFE ID for a workload.
    pub requester: &'a str,
    /// `operator`, `workload` or `ai_agent`.
    pub requester_kind: &'a str,
    pub reason: &'a str,
    pub ticket: &'a str,
    pub break_glass: bool,
    /// Distinct reviewers who approved, and who denied, so far.
    pub approvals: i64,
    pub denials: i64,
}

/// The context the server builds: the time is added when it decides.
#[derive(Debug, Clone, Copy)]
pub struct AccessContext<'a> {
    /// The agent that asked; "" on the admin socket.
    pub node: &'a str,
    pub selectors: &'a [String],
    /// Seconds asked for; 0 when none were.
    pub ttl_seconds: i64,
    pub source: Source,
    pub method: &'a str,
    /// Set on the elevation actions only (their context has these fields; the others'
    /// has not).
    pub elevation: Option<ElevationFacts<'a>>,
}

/// One request to decide.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub principal: Principal<'a>,
    pub action: Action,
    pub resource: Resource<'a>,
    pub context: AccessContext<'a>,
}

struct Types {
    action: EntityTypeName,
    agent: EntityTypeName,
    workload: EntityTypeName,
    operator: EntityTypeName,
    entry: EntityTypeName,
    entry_set: EntityTypeName,
    audience: EntityTypeName,
    secret: EntityTypeName,
    secret_set: EntityTypeName,
    credential: EntityTypeName,
    credential_set: EntityTypeName,
    admin_call: EntityTypeName,
}

static TYPES: LazyLock<Types> = LazyLock::new(|| {
    // These names are in the schema shipped in this crate; a test loads it.
    let name = |n: &str| EntityTypeName::from_str(n).expect("a valid Cedar type name");
    Types {
        action: name("Mayfly::Action"),
        agent: name("Mayfly::Agent"),
        workload: name("Mayfly::Workload"),
        operator: name("Mayfly::Operator"),
        entry: name("Mayfly::Entry"),
        entry_set: name("Mayfly::EntrySet"),
        audience: name("Mayfly::Audience"),
        secret: name("Mayfly::Secret"),
        secret_set: name("Mayfly::SecretSet"),
        credential: name("Mayfly::Credential"),
        credential_set: name("Mayfly::CredentialSet"),
        admin_call: name("Mayfly::AdminCall"),
    }
});

fn uid(kind: &EntityTypeName, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(kind.clone(), EntityId::new(id))
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_string())
}

fn strings(values: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(values.iter().map(|v| string(v)))
}

/// Trust domain and path of a SPIFFE ID; empty when it is not one.
fn spiffe_parts(id: &str) -> (&str, &str) {
    let rest = id.strip_prefix("spiffe://").unwrap_or("");
    match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, ""),
    }
}

/// `now` as Cedar's `datetime` reads it (UTC, milliseconds).
fn cedar_time(now: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(now)
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

fn entity(
    uid: EntityUid,
    attrs: Vec<(&str, RestrictedExpression)>,
    parents: HashSet<EntityUid>,
) -> Result<Entity, String> {
    let attrs: HashMap<String, RestrictedExpression> =
        attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    Entity::new(uid, attrs, parents).map_err(|e| e.to_string())
}

impl Access<'_> {
    /// The scope an audit record of this request gives.
    pub fn scope(&self) -> String {
        let who = match self.principal {
            Principal::Agent { spiffe_id } | Principal::Workload { spiffe_id } => {
                spiffe_id.to_string()
            }
            Principal::Operator { uid, name: "" } => format!("uid:{uid}"),
            Principal::Operator { uid, name } => format!("uid:{uid} ({name})"),
        };
        format!(
            "{} for {who} via {}",
            self.action.name(),
            self.context.method
        )
    }

    fn principal_entity(&self) -> Result<(EntityUid, Entity), String> {
        match self.principal {
            Principal::Agent { spiffe_id } | Principal::Workload { spiffe_id } => {
                let (trust_domain, path) = spiffe_parts(spiffe_id);
                let (kind, mut attrs) = match self.principal {
                    Principal::Agent { .. } => (&TYPES.agent, Vec::new()),
                    _ => (&TYPES.workload, vec![("path", string(path))]),
                };
                attrs.push(("spiffe_id", string(spiffe_id)));
                attrs.push(("trust_domain", string(trust_domain)));
                let id = uid(kind, spiffe_id);
                Ok((id.clone(), entity(id, attrs, HashSet::new())?))
            }
            Principal::Operator { uid: n, name } => {
                let id = uid(&TYPES.operator, &n.to_string());
                let attrs = vec![
                    ("uid", RestrictedExpression::new_long(i64::from(n))),
                    ("name", string(name)),
                ];
                Ok((id.clone(), entity(id, attrs, HashSet::new())?))
            }
        }
    }

    /// The resource's entity and those of the sets it is in.
    fn resource_entities(&self) -> Result<(EntityUid, Vec<Entity>), String> {
        let in_sets = |kind: &EntityTypeName, sets: &[String]| -> HashSet<EntityUid> {
            sets.iter().map(|s| uid(kind, s)).collect()
        };
        let (id, attrs, parents) = match self.resource {
            Resource::Entry(entry) => (
                uid(&TYPES.entry, entry.id),
                vec![
                    ("id", string(entry.id)),
                    ("spiffe_id", string(entry.spiffe_id)),
                    ("parent", string(entry.parent)),
                    ("selectors", strings(entry.selectors)),
                    ("hint", string(entry.hint)),
                ],
                in_sets(&TYPES.entry_set, entry.sets),
            ),
            Resource::Audience(aud) => (uid(&TYPES.audience, aud), Vec::new(), HashSet::new()),
            Resource::AdminCall(method) => {
                (uid(&TYPES.admin_call, method), Vec::new(), HashSet::new())
            }
            Resource::Secret { name, grants, sets } => (
                uid(&TYPES.secret, name),
                vec![("name", string(name)), ("grants", strings(grants))],
                in_sets(&TYPES.secret_set, sets),
            ),
            Resource::Credential {
                name,
                kind,
                grants,
                sets,
                max_ttl_seconds,
            } => (
                uid(&TYPES.credential, name),
                vec![
                    ("name", string(name)),
                    ("kind", string(kind)),
                    ("grants", strings(grants)),
                    (
                        "max_ttl_seconds",
                        RestrictedExpression::new_long(max_ttl_seconds),
                    ),
                ],
                in_sets(&TYPES.credential_set, sets),
            ),
        };
        let mut all: Vec<Entity> = parents
            .iter()
            .map(|p| Entity::new_no_attrs(p.clone(), HashSet::new()))
            .collect();
        all.push(entity(id.clone(), attrs, parents)?);
        Ok((id, all))
    }

    fn context(&self, now: Option<SystemTime>) -> Result<Context, String> {
        let mut pairs = vec![
            ("node".to_string(), string(self.context.node)),
            ("selectors".to_string(), strings(self.context.selectors)),
            (
                "ttl_seconds".to_string(),
                RestrictedExpression::new_long(self.context.ttl_seconds),
            ),
            ("source".to_string(), string(self.context.source.name())),
            ("method".to_string(), string(self.context.method)),
        ];
        if let Some(now) = now {
            pairs.push((
                "time".to_string(),
                RestrictedExpression::new_datetime(cedar_time(now)),
            ));
        }
        if self.action.is_elevation() {
            let e = self.context.elevation.unwrap_or_default();
            pairs.extend([
                ("requester".to_string(), string(e.requester)),
                ("requester_kind".to_string(), string(e.requester_kind)),
                ("reason".to_string(), string(e.reason)),
                ("ticket".to_string(), string(e.ticket)),
                (
                    "break_glass".to_string(),
                    RestrictedExpression::new_bool(e.break_glass),
                ),
                (
                    "approvals".to_string(),
                    RestrictedExpression::new_long(e.approvals),
                ),
                (
                    "denials".to_string(),
                    RestrictedExpression::new_long(e.denials),
                ),
            ]);
        }
        Context::from_pairs(pairs).map_err(|e| e.to_string())
    }

    /// The principal's uid, and the resource's with those of the sets it is in: the
    /// entities a policy's scope may name for this request.
    pub(crate) fn scope_uids(&self) -> (EntityUid, Vec<EntityUid>) {
        let principal = match self.principal {
            Principal::Agent { spiffe_id } => uid(&TYPES.agent, spiffe_id),
            Principal::Workload { spiffe_id } => uid(&TYPES.workload, spiffe_id),
            Principal::Operator { uid: n, .. } => uid(&TYPES.operator, &n.to_string()),
        };
        let resources = match self.resource {
            Resource::Entry(entry) => std::iter::once(uid(&TYPES.entry, entry.id))
                .chain(entry.sets.iter().map(|s| uid(&TYPES.entry_set, s)))
                .collect(),
            Resource::Audience(aud) => vec![uid(&TYPES.audience, aud)],
            Resource::AdminCall(method) => vec![uid(&TYPES.admin_call, method)],
            Resource::Secret { name, sets, .. } => std::iter::once(uid(&TYPES.secret, name))
                .chain(sets.iter().map(|s| uid(&TYPES.secret_set, s)))
                .collect(),
            Resource::Credential { name, sets, .. } => {
                std::iter::once(uid(&TYPES.credential, name))
                    .chain(sets.iter().map(|s| uid(&TYPES.credential_set, s)))
                    .collect()
            }
        };
        (principal, resources)
    }

    /// What the request is made of, as JSON: the principal's and the resource's entities
    /// and the context (for `policy test`).
    pub fn describe(&self, now: SystemTime) -> serde_json::Value {
        let json = |e: Result<Entity, String>| {
            e.and_then(|e| e.to_json_value().map_err(|e| e.to_string()))
                .unwrap_or_else(serde_json::Value::String)
        };
        let resource = self
            .resource_entities()
            .map(|(_, all)| all.into_iter().map(|e| json(Ok(e))).collect::<Vec<_>>())
            .unwrap_or_default();
        let time = cedar_time(now);
        let mut context = serde_json::json!({
            "time": time,
            "node": self.context.node,
            "selectors": self.context.selectors,
            "ttl_seconds": self.context.ttl_seconds,
            "source": self.context.source.name(),
            "method": self.context.method,
        });
        if self.action.is_elevation() {
            let e = self.context.elevation.unwrap_or_default();
            for (key, value) in [
                ("requester", serde_json::json!(e.requester)),
                ("requester_kind", serde_json::json!(e.requester_kind)),
                ("reason", serde_json::json!(e.reason)),
                ("ticket", serde_json::json!(e.ticket)),
                ("break_glass", serde_json::json!(e.break_glass)),
                ("approvals", serde_json::json!(e.approvals)),
                ("denials", serde_json::json!(e.denials)),
            ] {
                context[key] = value;
            }
        }
        serde_json::json!({
            "principal": json(self.principal_entity().map(|(_, e)| e)),
            "action": format!("Mayfly::Action::\"{}\"", self.action.name()),
            "resource": resource,
            "context": context,
        })
    }

    /// Cedar's request and the entities it needs; `actions` are the schema's action
    /// entities. Not validated against the schema here (it costs as much as the decision):
    /// a test checks that what this builds conforms. `now` is `context.time`; `None` leaves
    /// it out, for policies that never read it (making Cedar's `datetime` value is a third
    /// of a decision's cost).
    pub fn cedar_request(
        &self,
        actions: &[Entity],
        now: Option<SystemTime>,
    ) -> Result<(Request, Entities), String> {
        self.request_with(actions, now, None)
    }

    /// As [`Self::cedar_request`], with `context.time`, checked against `schema`.
    pub fn cedar_request_checked(
        &self,
        actions: &[Entity],
        now: SystemTime,
        schema: Option<&cedar_policy::Schema>,
    ) -> Result<(Request, Entities), String> {
        self.request_with(actions, Some(now), schema)
    }

    fn request_with(
        &self,
        actions: &[Entity],
        now: Option<SystemTime>,
        schema: Option<&cedar_policy::Schema>,
    ) -> Result<(Request, Entities), String> {
        let (principal, principal_entity) = self.principal_entity()?;
        let (resource, mut own) = self.resource_entities()?;
        own.push(principal_entity);
        let request = Request::new(
            principal,
            self.action.uid(),
            resource,
            self.context(now)?,
            schema,
        )
        .map_err(|e| e.to_string())?;
        let entities = Entities::from_entities(actions.iter().cloned().chain(own), schema)
            .map_err(|e| e.to_string())?;
        Ok((request, entities))
    }
}

impl Access<'_> {
    /// Every field of the request, each written with its length (or as a fixed-size
    /// number) after a tag for its variant, so that two requests have the same key exactly
    /// when they are the same request: what a decision is remembered by
    /// ([`super::ActiveSet`]). Each struct is taken apart whole, so a field added later
    /// does not compile until it is written here too.
    pub(crate) fn key(&self) -> Vec<u8> {
        let Access {
            principal,
            action,
            resource,
            context,
        } = self;
        let mut key = Key(Vec::with_capacity(256));
        match principal {
            Principal::Agent { spiffe_id } => key.tag(1).text(spiffe_id),
            Principal::Workload { spiffe_id } => key.tag(2).text(spiffe_id),
            Principal::Operator { uid, name } => key.tag(3).number(i64::from(*uid)).text(name),
        };
        key.text(action.name());
        match resource {
            Resource::Entry(EntryFacts {
                id,
                spiffe_id,
                parent,
                selectors,
                hint,
                sets,
            }) => key
                .tag(1)
                .text(id)
                .text(spiffe_id)
                .text(parent)
                .texts(selectors)
                .text(hint)
                .texts(sets),
            Resource::Audience(audience) => key.tag(2).text(audience),
            Resource::Secret { name, grants, sets } => {
                key.tag(3).text(name).texts(grants).texts(sets)
            }
            Resource::Credential {
                name,
                kind,
                grants,
                sets,
                max_ttl_seconds,
            } => key
                .tag(4)
                .text(name)
                .text(kind)
                .texts(grants)
                .texts(sets)
                .number(*max_ttl_seconds),
            Resource::AdminCall(method) => key.tag(5).text(method),
        };
        let AccessContext {
            node,
            selectors,
            ttl_seconds,
            source,
            method,
            elevation,
        } = context;
        key.text(node)
            .texts(selectors)
            .number(*ttl_seconds)
            .text(source.name())
            .text(method);
        match elevation {
            None => key.tag(0),
            Some(ElevationFacts {
                requester,
                requester_kind,
                reason,
                ticket,
                break_glass,
                approvals,
                denials,
            }) => key
                .tag(1)
                .text(requester)
                .text(requester_kind)
                .text(reason)
                .text(ticket)
                .tag(u8::from(*break_glass))
                .number(*approvals)
                .number(*denials),
        };
        key.0
    }
}

/// The writer of [`Access::key`].
struct Key(Vec<u8>);

impl Key {
    fn tag(&mut self, tag: u8) -> &mut Self {
        self.0.push(tag);
        self
    }

    fn number(&mut self, n: i64) -> &mut Self {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }

    fn text(&mut self, text: &str) -> &mut Self {
        self.number(text.len() as i64);
        self.0.extend_from_slice(text.as_bytes());
        self
    }

    fn texts(&mut self, texts: &[String]) -> &mut Self {
        self.number(texts.len() as i64);
        for text in texts {
            self.text(text);
        }
        self
    }
}
