//! The admin API's policy calls: the active set, a reload from policy_dir, and one request
//! decided against the active set with the entities the daemon knows (nothing granted).

use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use cedar_policy::EntityUid;
use tonic::Status;

use mayfly_proto::v1;

use super::AdminApi;
use super::operator::Operator;
use crate::policy::{Access, AccessContext, Action, ActivePolicy, Principal, Resource, Source};
use crate::store::EntryRecord;

impl AdminApi {
    pub(super) fn policy_set(&self, active: &ActivePolicy, text: bool) -> v1::ActivePolicySet {
        v1::ActivePolicySet {
            hash: active.hash.clone(),
            enforce: active.enforce,
            sources: active
                .listing
                .iter()
                .map(|(name, ids)| v1::PolicyFile {
                    name: name.clone(),
                    policy_ids: ids.clone(),
                })
                .collect(),
            loaded_at: active.loaded_at,
            dir: self
                .policy
                .dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            text: if text { active.text() } else { String::new() },
        }
    }

    pub(super) async fn reload_policy_set(
        &self,
        op: &Operator,
    ) -> Result<v1::ActivePolicySet, Status> {
        let active = self.policy.reload(&op.actor()).await.map_err(|e| {
            Status::invalid_argument(format!(
                "{}\nthe active policy set stays",
                e.problems().join("\n")
            ))
        })?;
        Ok(self.policy_set(&active, false))
    }

    pub(super) async fn decide_test(
        &self,
        body: v1::TestPolicyRequest,
    ) -> Result<v1::PolicyDecision, Status> {
        let action = Action::parse(&body.action).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown action `{}`; the actions are {}",
                body.action,
                Action::ALL.map(Action::name).join(", ")
            ))
        })?;
        let (principal_type, principal_id) = reference("principal", &body.principal)?;
        let (resource_type, resource_id) = reference("resource", &body.resource)?;
        let overrides = Overrides::parse(&body.context_json)?;

        let operator_name;
        let principal = match principal_type.as_str() {
            "Mayfly::Workload" => Principal::Workload {
                spiffe_id: &principal_id,
            },
            "Mayfly::Agent" => Principal::Agent {
                spiffe_id: &principal_id,
            },
            "Mayfly::Operator" => {
                let uid: u32 = principal_id.parse().map_err(|_| {
                    Status::invalid_argument(format!(
                        "an operator is named by uid: Mayfly::Operator::\"1000\", not `{principal_id}`"
                    ))
                })?;
                operator_name = uzers::get_user_by_uid(uid)
                    .map(|u| u.name().to_string_lossy().into_owned())
                    .unwrap_or_default();
                Principal::Operator {
                    uid,
                    name: &operator_name,
                }
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "principal type {other} is not one of Mayfly::Workload, Mayfly::Agent, Mayfly::Operator"
                )));
            }
        };

        // What the daemon knows of the resource, held here for the request to borrow.
        let entry: Option<Arc<EntryRecord>>;
        let secret;
        let credential;
        let resource = match resource_type.as_str() {
            "Mayfly::Entry" => {
                entry = self.registry.entries().borrow().get(&resource_id).cloned();
                Resource::Entry(crate::policy::entry_facts(entry.as_deref().ok_or_else(
                    || Status::not_found(format!("entry {resource_id} does not exist")),
                )?))
            }
            "Mayfly::Audience" => Resource::Audience(&resource_id),
            "Mayfly::AdminCall" => Resource::AdminCall(&resource_id),
            "Mayfly::Secret" => {
                let definitions = self.secrets.definitions().borrow().clone();
                secret = definitions
                    .iter()
                    .find(|s| s.name == resource_id)
                    .cloned()
                    .ok_or_else(|| Status::not_found(format!("no secret named `{resource_id}`")))?;
                Resource::Secret {
                    name: &secret.name,
                    grants: &secret.grants,
                    sets: &secret.sets,
                }
            }
            "Mayfly::Credential" => {
                credential = self.broker.describe(&resource_id).await?.0;
                Resource::Credential {
                    name: &credential.name,
                    kind: credential.kind(),
                    grants: &credential.grants,
                    sets: &credential.sets,
                    max_ttl_seconds: credential.max().as_secs() as i64,
                }
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "resource type {other} is not one of Mayfly::Entry, Mayfly::Audience, \
                     Mayfly::Secret, Mayfly::Credential, Mayfly::AdminCall"
                )));
            }
        };
        let default_selectors = match &resource {
            Resource::Entry(e) => e.selectors.to_vec(),
            _ => Vec::new(),
        };
        let default_node = match &resource {
            Resource::Entry(e) => e.parent.to_string(),
            _ => String::new(),
        };
        let selectors = overrides.selectors.unwrap_or(default_selectors);
        let node = overrides.node.unwrap_or(default_node);
        let source = overrides.source.unwrap_or(match principal {
            Principal::Operator { .. } => Source::AdminSocket,
            _ => Source::NodeApi,
        });
        let method = overrides.method.unwrap_or_default();
        let access = Access {
            principal,
            action,
            resource,
            context: AccessContext {
                node: &node,
                selectors: &selectors,
                ttl_seconds: overrides.ttl_seconds.unwrap_or(0),
                source,
                method: &method,
                elevation: None,
            },
        };
        let now = overrides.time.unwrap_or_else(SystemTime::now);
        let decision = self.policy.decide_at(&access, now);
        Ok(v1::PolicyDecision {
            decision: if decision.allowed { "allow" } else { "deny" }.to_string(),
            policies: decision.policies,
            errors: decision.errors,
            policy_set: decision.hash,
            enforce: decision.enforce,
            request_json: access.describe(now).to_string(),
        })
    }
}

/// `Type::"id"` split into its type name and its id, or a refusal naming `what`.
fn reference(what: &str, text: &str) -> Result<(String, String), Status> {
    let uid = EntityUid::from_str(text.trim()).map_err(|e| {
        Status::invalid_argument(format!(
            "{what} `{text}` is not an entity reference like Mayfly::Workload::\"spiffe://example.org/web\": {e}"
        ))
    })?;
    Ok((
        uid.type_name().to_string(),
        uid.id().unescaped().to_string(),
    ))
}

/// What `--context` may set; every other key is an error.
#[derive(Default)]
struct Overrides {
    node: Option<String>,
    selectors: Option<Vec<String>>,
    ttl_seconds: Option<i64>,
    source: Option<Source>,
    method: Option<String>,
    time: Option<SystemTime>,
}

impl Overrides {
    fn parse(json: &str) -> Result<Self, Status> {
        let mut overrides = Overrides::default();
        if json.trim().is_empty() {
            return Ok(overrides);
        }
        let bad = |message: String| Status::invalid_argument(format!("--context: {message}"));
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(format!("not JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| bad("must be a JSON object".into()))?;
        let text = |key: &str, v: &serde_json::Value| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("`{key}` must be a string")))
        };
        for (key, v) in object {
            match key.as_str() {
                "node" => overrides.node = Some(text(key, v)?),
                "method" => overrides.method = Some(text(key, v)?),
                "source" => {
                    let name = text(key, v)?;
                    overrides.source = Some(Source::parse(&name).ok_or_else(|| {
                        bad(format!(
                            "`source` is node_api, admin_socket or workload_api, not `{name}`"
                        ))
                    })?);
                }
                "ttl_seconds" => {
                    overrides.ttl_seconds = Some(
                        v.as_i64()
                            .ok_or_else(|| bad("`ttl_seconds` must be a whole number".into()))?,
                    )
                }
                "selectors" => {
                    let list = v
                        .as_array()
                        .ok_or_else(|| bad("`selectors` must be a list of strings".into()))?;
                    overrides.selectors = Some(
                        list.iter()
                            .map(|s| text("selectors", s))
                            .collect::<Result<_, _>>()?,
                    );
                }
                "time" => {
                    let stamp = text(key, v)?;
                    let parsed = chrono::DateTime::parse_from_rfc3339(&stamp)
                        .map_err(|e| bad(format!("`time` {stamp}: {e}")))?;
                    overrides.time = Some(SystemTime::from(parsed));
                }
                other => {
                    return Err(bad(format!(
                        "unknown key `{other}`; the context has node, selectors, ttl_seconds, \
                         source, method and time"
                    )));
                }
            }
        }
        Ok(overrides)
    }
}
