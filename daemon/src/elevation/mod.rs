//! Just-in-time elevation: temporary access to one credential, secret or entry, asked for
//! by an operator or by a workload (through its agent), reviewed by other operators, active
//! until its TTL runs out or its requester says the task is done, and then taken back
//! through the acknowledged revocation: leases revoked at their backend, a secret withdrawn
//! from the workload and rotated, a temporary entry deleted with its SVIDs deny-listed. Who may ask, who may review, how many approvals activate it and
//! how many denials reject it are Cedar policies (`request_elevation`, `review_elevation`,
//! `activate_elevation`, `reject_elevation`); the server counts the reviews and hands the
//! counts in. Each elevation is one permanent row, each step one record on the hash chain.

pub mod notify;
mod record;

use std::sync::Arc;
use std::time::Duration;

use mayfly_common::clock::{Clock, unix};

use crate::audit::{Actor, Audit, Event};
use crate::config::ElevationConfig;
use crate::creds::{Broker, CredsError};
use crate::identity::{EntryInput, Registry};
use crate::policy::{
    Access, AccessContext, Action, ElevationFacts, PolicyDecision, PolicyEngine, Principal, Source,
};
use crate::revoke::{RevokeError, Revoker, Target};
use crate::secrets::engine::RotationEngine;
use crate::store::{
    ElevationRecord, ElevationReview, ElevationState, EntryFilter, EntryRecord, Store, StoreError,
};
use crate::visibility::{ElevatedSecret, Visibility};

pub use record::ElevationView;

/// What an elevation may be to: a credential definition, a secret, or an entry's identity.
pub const CREDENTIAL: &str = "credential";
pub const SECRET: &str = "secret";
pub const ENTRY: &str = "entry";

/// How the temporary entry of an elevation is marked (its hint), so that it is never taken
/// for the entry it copies.
const ENTRY_HINT: &str = "elevation ";

/// An elevation over for this long with nothing taken back was interrupted.
const UNTAKEN_GRACE_SECS: i64 = 30;

/// How often the sweeper looks for elevations that elapsed or expired.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ElevationError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// Refused (on the audit trail already, naming the deciding policies where one did).
    #[error("{0}")]
    Denied(String),
    /// Not in a state that allows it.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credentials(#[from] CredsError),
    #[error(transparent)]
    Revoke(#[from] RevokeError),
    #[error("{0}")]
    Unavailable(String),
}

/// Who asks for, reviews or ends an elevation, as the server established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A local user on the elevation socket, by the socket's peer credentials.
    Operator { uid: u32, name: String },
    /// A workload its agent attested, as the SPIFFE ID of one of the agent's entries.
    Workload { spiffe_id: String, agent: String },
}

impl Caller {
    /// How an elevation names its requester: `uid:1000` or the SPIFFE ID.
    pub fn requester(&self) -> String {
        match self {
            Caller::Operator { uid, .. } => format!("uid:{uid}"),
            Caller::Workload { spiffe_id, .. } => spiffe_id.clone(),
        }
    }

    pub fn actor(&self) -> Actor {
        match self {
            Caller::Operator { uid, .. } => Actor::Operator(*uid),
            Caller::Workload { agent, .. } => Actor::Spiffe(agent.clone()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Caller::Operator { uid, name } if name.is_empty() => format!("uid:{uid}"),
            Caller::Operator { uid, name } => format!("uid:{uid} ({name})"),
            Caller::Workload { spiffe_id, agent } => format!("{spiffe_id} via {agent}"),
        }
    }
}

/// What is asked for.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    pub scope_kind: String,
    pub scope_name: String,
    pub ttl: Duration,
    pub reason: String,
    pub ticket: String,
    pub break_glass: bool,
}

/// What an elevation is to, as the policies see it.
enum Subject {
    Credential(Arc<crate::creds::spec::CredentialSpec>),
    Secret(Box<crate::secrets::spec::SecretSpec>),
    Entry(EntryRecord),
    /// Deleted since the request: the record stays readable, decided on its name alone.
    Gone {
        kind: String,
        name: String,
    },
}

impl Subject {
    fn resource(&self) -> mayfly_common::policy::Resource<'_> {
        use mayfly_common::policy::{EntryFacts, Resource};
        match self {
            Subject::Credential(spec) => spec.policy_resource(),
            Subject::Secret(spec) => Resource::Secret {
                name: &spec.name,
                grants: &spec.grants,
                sets: &spec.sets,
            },
            Subject::Entry(entry) => Resource::Entry(EntryFacts {
                id: &entry.id,
                spiffe_id: &entry.spiffe_id,
                parent: &entry.parent_id,
                selectors: &entry.selectors,
                hint: &entry.hint,
                sets: &entry.sets,
            }),
            Subject::Gone { kind, name } => match kind.as_str() {
                SECRET => Resource::Secret {
                    name,
                    grants: &[],
                    sets: &[],
                },
                ENTRY => Resource::Entry(EntryFacts {
                    id: name,
                    spiffe_id: "",
                    parent: "",
                    selectors: &[],
                    hint: "",
                    sets: &[],
                }),
                _ => Resource::Credential {
                    name,
                    kind: "",
                    grants: &[],
                    sets: &[],
                    max_ttl_seconds: 0,
                },
            },
        }
    }
}

pub struct Elevations {
    store: Store,
    registry: Arc<Registry>,
    secrets: Arc<RotationEngine>,
    policy: Arc<PolicyEngine>,
    broker: Arc<Broker>,
    revoker: Arc<Revoker>,
    view: Visibility,
    audit: Audit,
    clock: Arc<dyn Clock>,
    config: ElevationConfig,
    notifier: notify::Notifier,
}

/// Checks free text an operator or a workload supplies: bounded, no control characters.
fn check_text(field: &str, text: &str, max: usize, required: bool) -> Result<(), ElevationError> {
    if required && text.trim().is_empty() {
        return Err(ElevationError::Invalid(format!("{field} is required")));
    }
    if text.chars().count() > max || text.chars().any(char::is_control) {
        return Err(ElevationError::Invalid(format!(
            "{field}: at most {max} characters, no control characters"
        )));
    }
    Ok(())
}

impl Elevations {
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        store: Store,
        registry: Arc<Registry>,
        secrets: Arc<RotationEngine>,
        policy: Arc<PolicyEngine>,
        broker: Arc<Broker>,
        revoker: Arc<Revoker>,
        view: Visibility,
        audit: Audit,
        clock: Arc<dyn Clock>,
        config: ElevationConfig,
        notifier: notify::Notifier,
    ) -> Arc<Self> {
        let elevations = Arc::new(Self {
            store,
            registry,
            secrets,
            policy,
            broker,
            revoker,
            view,
            audit,
            clock,
            config,
            notifier,
        });
        let sweeper = elevations.clone();
        tokio::spawn(async move { sweeper.sweep_loop().await });
        elevations
    }

    fn now(&self) -> i64 {
        unix(self.clock.now())
    }

    /// What `kind` `name` is now; `strict` refuses one deleted since.
    async fn subject(
        &self,
        kind: &str,
        name: &str,
        strict: bool,
    ) -> Result<Subject, ElevationError> {
        let found = match kind {
            CREDENTIAL => match self.broker.describe(name).await {
                Ok((spec, _, _)) => Some(Subject::Credential(spec)),
                Err(CredsError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            },
            SECRET => match self.secrets.spec(name).await {
                Ok(spec) => Some(Subject::Secret(Box::new(spec))),
                Err(crate::secrets::runtime::EngineError::UnknownSecret(_)) => None,
                Err(e) => return Err(ElevationError::Unavailable(e.to_string())),
            },
            ENTRY => match self.store.get_entry(name).await {
                Ok(entry) => Some(Subject::Entry(entry)),
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            },
            other => {
                return Err(ElevationError::Invalid(format!(
                    "scope kind `{other}`: an elevation is to a credential, a secret or an entry \
                     (--credential NAME, --secret NAME or --entry ID)"
                )));
            }
        };
        match found {
            Some(subject) => Ok(subject),
            None if strict => Err(ElevationError::NotFound(format!(
                "no {kind} named `{name}`"
            ))),
            None => Ok(Subject::Gone {
                kind: kind.to_string(),
                name: name.to_string(),
            }),
        }
    }

    /// The entry an elevation of an entry names: by id, or by a SPIFFE ID exactly one
    /// entry (not an elevation's temporary one) gives.
    async fn entry_named(&self, name: &str) -> Result<String, ElevationError> {
        if !name.starts_with("spiffe://") {
            return Ok(name.to_string());
        }
        let found: Vec<EntryRecord> = self
            .store
            .list_entries(&EntryFilter {
                spiffe_id: Some(name.to_string()),
                ..EntryFilter::default()
            })
            .await?
            .into_iter()
            .filter(|e| !e.hint.starts_with(ENTRY_HINT))
            .collect();
        match found.as_slice() {
            [one] => Ok(one.id.clone()),
            [] => Err(ElevationError::NotFound(format!(
                "no entry gives {name}; `mayflyd entry list` shows them"
            ))),
            many => Err(ElevationError::Invalid(format!(
                "{} entries give {name}: name one by its id ({})",
                many.len(),
                many.iter()
                    .map(|e| e.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Gives what an elevation that just became active grants beyond leases: its
    /// temporary entry, or the secret to its workload's agent.
    async fn grant(&self, record: &ElevationRecord) -> Result<(), ElevationError> {
        match record.scope_kind.as_str() {
            SECRET => self.refresh_elevated().await,
            ENTRY => self.grant_entry(record).await,
            _ => Ok(()),
        }
    }

    /// Creates the temporary entry of an active elevation of an entry: the entry's SPIFFE
    /// ID, on the requesting workload's agent, with that workload's selectors, its SVIDs no
    /// longer-lived than the elevation.
    async fn grant_entry(&self, record: &ElevationRecord) -> Result<(), ElevationError> {
        if !record.granted_entry.is_empty() {
            return Ok(());
        }
        let template = match self.store.get_entry(&record.scope_name).await {
            Ok(entry) => entry,
            Err(StoreError::NotFound { .. }) => {
                tracing::warn!(elevation = %record.id, entry = %record.scope_name, "the entry an active elevation is to was deleted; nothing to grant");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        // The workload's own entry on its agent decides which processes get the identity.
        let mut mine: Vec<EntryRecord> = self
            .store
            .list_entries(&EntryFilter {
                spiffe_id: Some(record.requester.clone()),
                ..EntryFilter::default()
            })
            .await?
            .into_iter()
            .filter(|e| e.parent_id == record.agent_id && !e.hint.starts_with(ENTRY_HINT))
            .collect();
        mine.sort_by(|a, b| a.id.cmp(&b.id));
        let Some(own) = mine.first() else {
            tracing::warn!(elevation = %record.id, requester = %record.requester, "the requesting workload has no entry on its agent any more; nothing to grant");
            return Ok(());
        };
        let remaining = (record.ends_at.unwrap_or_default() - self.now()).max(1);
        let capped = |ttl: i64| {
            if ttl > 0 {
                ttl.min(remaining)
            } else {
                remaining
            }
        };
        let created = self
            .registry
            .create_entry(EntryInput {
                spiffe_id: template.spiffe_id.clone(),
                parent_id: record.agent_id.clone(),
                selectors: own.selectors.clone(),
                x509_svid_ttl: capped(template.x509_svid_ttl),
                jwt_svid_ttl: capped(template.jwt_svid_ttl),
                dns_names: template.dns_names.clone(),
                hint: format!("{ENTRY_HINT}{}", record.id),
                sets: template.sets.clone(),
                expires_at: record.ends_at.unwrap_or_default(),
            })
            .await
            .map_err(|e| {
                ElevationError::Unavailable(format!("creating the temporary entry: {e}"))
            })?;
        if !self
            .store
            .set_elevation_entry(&record.id, &created.id)
            .await?
        {
            // Ended meanwhile, or granted by another pass: this copy is not needed.
            let _ = self.registry.delete_entry(&created.id).await;
            return Ok(());
        }
        self.record_event(
            Event::new(&Actor::Daemon, "elevation.grant", &record.id)
                .scope(scope_of(record))
                .detail(serde_json::json!({
                    "entry": created.id,
                    "spiffe_id": created.spiffe_id,
                    "agent": created.parent_id,
                    "selectors": created.selectors,
                })),
        )
        .await?;
        tracing::info!(elevation = %record.id, entry = %created.id, spiffe_id = %created.spiffe_id, "temporary entry created");
        Ok(())
    }

    /// Publishes the secrets active elevations give workloads, from the store (so that
    /// those another daemon activated or ended count too).
    async fn refresh_elevated(&self) -> Result<(), ElevationError> {
        let active = self.store.active_elevations(&[SECRET]).await?;
        let now = self.now();
        self.view.publish_elevated(
            active
                .into_iter()
                .filter(|r| !r.agent_id.is_empty() && r.ends_at.is_some_and(|end| end > now))
                .map(|r| ElevatedSecret {
                    agent: r.agent_id,
                    holder: r.requester,
                    secret: r.scope_name,
                    elevation: r.id,
                })
                .collect(),
        );
        Ok(())
    }

    // ----- asking -----

    /// Records a request of `caller` for `ask`, decided by `request_elevation`. A
    /// break-glass request the policies permit is active at once and needs a review.
    pub async fn request(
        &self,
        caller: &Caller,
        ask: &Ask,
    ) -> Result<ElevationRecord, ElevationError> {
        if ask.scope_kind == ENTRY && matches!(caller, Caller::Operator { .. }) {
            return Err(ElevationError::Invalid(
                "an elevation of an entry gives its identity to a workload: ask through the \
                 agent of the workload's node (`mayfly-agent elevate request --entry ID`)"
                    .into(),
            ));
        }
        check_text("reason", &ask.reason, 1024, true)?;
        check_text("ticket", &ask.ticket, 128, false)?;
        if ask.ttl < Duration::from_secs(1) || ask.ttl > self.config.max_ttl {
            return Err(ElevationError::Invalid(format!(
                "ttl {}: between 1s and {} (elevation.max_ttl)",
                humantime::format_duration(ask.ttl),
                humantime::format_duration(self.config.max_ttl)
            )));
        }
        let scope_name = if ask.scope_kind == ENTRY {
            self.entry_named(&ask.scope_name).await?
        } else {
            ask.scope_name.clone()
        };
        let subject = self.subject(&ask.scope_kind, &scope_name, true).await?;
        if let Subject::Entry(entry) = &subject
            && entry.hint.starts_with(ENTRY_HINT)
        {
            return Err(ElevationError::Invalid(format!(
                "entry {} is an elevation's temporary entry: ask for the entry it copies",
                entry.id
            )));
        }
        let (node, selectors, kind) = match caller {
            Caller::Operator { .. } => (String::new(), Vec::new(), "operator"),
            Caller::Workload { spiffe_id, agent } => {
                let Some((selectors, sets)) = self.view.holder(agent, spiffe_id) else {
                    let why = format!("agent {agent} serves no workload {spiffe_id}");
                    self.audit.note_refusal(
                        Event::new(&caller.actor(), "elevation.request", &ask.scope_name)
                            .denied(why.clone()),
                    );
                    return Err(ElevationError::Denied(why));
                };
                let kind = if sets.contains(&self.config.ai_agent_set) {
                    "ai_agent"
                } else {
                    "workload"
                };
                (agent.clone(), selectors, kind)
            }
        };
        let requester = caller.requester();
        let pending = self
            .store
            .list_elevations(
                Some(ElevationState::Pending),
                Some(&requester),
                self.config.max_pending as i64 + 1,
            )
            .await?
            .len();
        if pending >= self.config.max_pending {
            let why = format!(
                "{} has {pending} pending elevation requests, the most allowed \
                 (elevation.max_pending): cancel one or wait for its review",
                caller.describe()
            );
            self.audit.note_refusal(
                Event::new(&caller.actor(), "elevation.request", &ask.scope_name)
                    .denied(why.clone()),
            );
            return Err(ElevationError::Denied(why));
        }
        let ttl_seconds = ask.ttl.as_secs() as i64;
        let facts = ElevationFacts {
            requester: &requester,
            requester_kind: kind,
            reason: &ask.reason,
            ticket: &ask.ticket,
            break_glass: ask.break_glass,
            approvals: 0,
            denials: 0,
        };
        let decision = self
            .policy
            .authorize(
                &Access {
                    principal: principal(caller),
                    action: Action::RequestElevation,
                    resource: subject.resource(),
                    context: AccessContext {
                        node: &node,
                        selectors: &selectors,
                        ttl_seconds,
                        source: source(caller),
                        method: "RequestElevation",
                        elevation: Some(facts),
                    },
                },
                "elevation.request",
            )
            .map_err(|denied| {
                ElevationError::Denied(format!(
                    "elevation to {} {} for {}: {}",
                    ask.scope_kind,
                    scope_name,
                    caller.describe(),
                    denied.reason
                ))
            })?;
        let now = self.now();
        let mut record = ElevationRecord {
            id: format!("el-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
            requester,
            requester_name: match caller {
                Caller::Operator { name, .. } => name.clone(),
                Caller::Workload { agent, .. } => agent.clone(),
            },
            requester_kind: kind.to_string(),
            agent_id: node,
            scope_kind: ask.scope_kind.clone(),
            scope_name: scope_name.clone(),
            reason: ask.reason.clone(),
            ticket: ask.ticket.clone(),
            requested_ttl: ttl_seconds,
            break_glass: ask.break_glass,
            state: Some(ElevationState::Pending),
            created_at: now,
            pending_until: now + self.config.pending_ttl.as_secs() as i64,
            policy_set: decision.hash.clone(),
            ..Default::default()
        };
        if ask.break_glass {
            record.state = Some(ElevationState::Active);
            record.activated_at = Some(now);
            record.ends_at = Some(now + ttl_seconds);
            record.review_required = true;
        }
        self.store.insert_elevation(&record).await?;
        self.record_event(
            Event::new(&caller.actor(), "elevation.request", &record.id)
                .scope(scope_of(&record))
                .reason(record.reason.clone())
                .ttl_secs(ttl_seconds)
                .detail(serde_json::json!({
                    "policy_set": decision.hash,
                    "deciding": decision.policies,
                    "requester": record.requester,
                    "requester_kind": record.requester_kind,
                    "ticket": record.ticket,
                    "break_glass": record.break_glass,
                })),
        )
        .await?;
        tracing::info!(elevation = %record.id, requester = %record.requester, scope = %record.scope_kind, name = %record.scope_name, break_glass = record.break_glass, "elevation requested");
        self.notifier.send(
            if record.break_glass {
                "break-glass"
            } else {
                "request"
            },
            &record,
            serde_json::json!({}),
        );
        if ask.break_glass {
            tracing::warn!(elevation = %record.id, requester = %record.requester, "break-glass elevation active without approval; it needs a review");
            self.record_event(
                Event::new(&caller.actor(), "elevation.activate", &record.id)
                    .scope(scope_of(&record))
                    .ttl_secs(ttl_seconds)
                    .reason("break-glass: active without approval, to be reviewed")
                    .detail(
                        serde_json::json!({ "break_glass": true, "policy_set": decision.hash }),
                    ),
            )
            .await?;
            self.grant(&record).await?;
            return self.get(&record.id).await;
        }
        Ok(record)
    }

    // ----- reviewing -----

    /// One reviewer's verdict on a pending elevation, then the server's count: rejected
    /// when `reject_elevation` permits, else active when `activate_elevation` does.
    pub async fn review(
        &self,
        reviewer: &Caller,
        id: &str,
        approve: bool,
        comment: &str,
    ) -> Result<ElevationRecord, ElevationError> {
        let Caller::Operator { uid, name } = reviewer else {
            return Err(ElevationError::Invalid(
                "only operators review elevations".into(),
            ));
        };
        check_text("comment", comment, 1024, false)?;
        let record = self.get(id).await?;
        let refuse = |why: String| {
            self.audit.note_refusal(
                Event::new(&reviewer.actor(), "elevation.review", id)
                    .scope(scope_of(&record))
                    .denied(why.clone()),
            );
            ElevationError::Denied(why)
        };
        if record.requester == reviewer.requester() {
            return Err(refuse(format!(
                "elevation {id}: nobody reviews their own request"
            )));
        }
        if record.state() != ElevationState::Pending {
            return Err(ElevationError::Conflict(format!(
                "elevation {id} is {}, not pending",
                record.state()
            )));
        }
        let reviews = self.store.elevation_reviews(id).await?;
        let (approvals, denials) = count(&reviews);
        let subject = self
            .subject(&record.scope_kind, &record.scope_name, true)
            .await?;
        let facts = facts_of(&record, approvals, denials);
        let decision = self
            .policy
            .authorize(
                &Access {
                    principal: Principal::Operator {
                        uid: *uid,
                        name: name.as_str(),
                    },
                    action: Action::ReviewElevation,
                    resource: subject.resource(),
                    context: context_of(&record, Source::ElevationSocket, "ReviewElevation", facts),
                },
                "elevation.review",
            )
            .map_err(|denied| {
                ElevationError::Denied(format!(
                    "review of elevation {id} by {}: {}",
                    reviewer.describe(),
                    denied.reason
                ))
            })?;
        let verdict = if approve { "approve" } else { "deny" };
        let now = self.now();
        match self
            .store
            .insert_elevation_review(&ElevationReview {
                elevation_id: id.to_string(),
                reviewer_uid: *uid,
                reviewer_name: name.clone(),
                verdict: verdict.to_string(),
                comment: comment.to_string(),
                at: now,
                policy_set: decision.hash.clone(),
            })
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => {
                return Err(ElevationError::Conflict(format!(
                    "uid {uid} has reviewed elevation {id} already"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        self.notifier.send(
            verdict,
            &record,
            serde_json::json!({ "reviewer": reviewer.requester(), "comment": comment }),
        );
        self.record_event(
            Event::new(&reviewer.actor(), "elevation.review", id)
                .scope(scope_of(&record))
                .outcome(verdict)
                .reason(comment)
                .detail(serde_json::json!({ "policy_set": decision.hash, "deciding": decision.policies })),
        )
        .await?;
        self.settle(&record).await?;
        self.get(id).await
    }

    /// Decides a pending elevation on its reviews so far.
    async fn settle(&self, record: &ElevationRecord) -> Result<(), ElevationError> {
        let reviews = self.store.elevation_reviews(&record.id).await?;
        let (approvals, denials) = count(&reviews);
        let subject = self
            .subject(&record.scope_kind, &record.scope_name, true)
            .await?;
        let decide = |action: Action| -> PolicyDecision {
            let requester = record.requester.as_str();
            let principal = if record.requester_kind == "operator" {
                Principal::Operator {
                    uid: requester
                        .strip_prefix("uid:")
                        .and_then(|u| u.parse().ok())
                        .unwrap_or(u32::MAX),
                    name: &record.requester_name,
                }
            } else {
                Principal::Workload {
                    spiffe_id: requester,
                }
            };
            self.policy.decide(&Access {
                principal,
                action,
                resource: subject.resource(),
                context: context_of(
                    record,
                    Source::ElevationSocket,
                    "ReviewElevation",
                    facts_of(record, approvals, denials),
                ),
            })
        };
        let now = self.now();
        let rejected = decide(Action::RejectElevation);
        if rejected.allowed {
            if self
                .store
                .finish_elevation(
                    &record.id,
                    ElevationState::Pending,
                    ElevationState::Rejected,
                    now,
                    "",
                    &format!("rejected: {approvals} approvals, {denials} denials"),
                )
                .await?
            {
                self.record_event(
                    Event::new(&Actor::Daemon, "elevation.reject", &record.id)
                        .scope(scope_of(record))
                        .reason(format!("{approvals} approvals, {denials} denials"))
                        .detail(serde_json::json!({ "policy_set": rejected.hash, "deciding": rejected.policies })),
                )
                .await?;
                tracing::info!(elevation = %record.id, approvals, denials, "elevation rejected");
                self.notify_now("reject", &record.id).await;
            }
            return Ok(());
        }
        let activated = decide(Action::ActivateElevation);
        if activated.allowed {
            let ends_at = now + record.requested_ttl;
            if self
                .store
                .activate_elevation(&record.id, now, ends_at)
                .await?
            {
                self.record_event(
                    Event::new(&Actor::Daemon, "elevation.activate", &record.id)
                        .scope(scope_of(record))
                        .ttl_secs(record.requested_ttl)
                        .reason(format!("{approvals} approvals, {denials} denials"))
                        .detail(serde_json::json!({ "policy_set": activated.hash, "deciding": activated.policies })),
                )
                .await?;
                tracing::info!(elevation = %record.id, approvals, ends_at, "elevation active");
                self.grant(&self.get(&record.id).await?).await?;
                self.notify_now("activate", &record.id).await;
            }
        }
        Ok(())
    }

    /// The after-the-fact review a break-glass elevation requires.
    pub async fn review_break_glass(
        &self,
        reviewer: &Caller,
        id: &str,
        comment: &str,
    ) -> Result<ElevationRecord, ElevationError> {
        check_text("comment", comment, 1024, true)?;
        let record = self.get(id).await?;
        if record.requester == reviewer.requester() {
            let why = format!("elevation {id}: nobody reviews their own break-glass");
            self.audit.note_refusal(
                Event::new(&reviewer.actor(), "elevation.break_glass_review", id)
                    .denied(why.clone()),
            );
            return Err(ElevationError::Denied(why));
        }
        self.authorize_view(
            reviewer,
            &record,
            Action::ReviewElevation,
            "elevation.break_glass_review",
        )
        .await?;
        let by = reviewer.requester();
        if !self
            .store
            .review_break_glass(id, &by, self.now(), comment)
            .await?
        {
            return Err(ElevationError::Conflict(format!(
                "elevation {id} needs no review or has one"
            )));
        }
        self.record_event(
            Event::new(&reviewer.actor(), "elevation.break_glass_review", id)
                .scope(scope_of(&record))
                .reason(comment),
        )
        .await?;
        self.get(id).await
    }

    // ----- ending -----

    /// Ends an active elevation (or withdraws a pending one, `cancel`): by its requester,
    /// or by an operator the policies let review it. What was issued under it is revoked
    /// through the acknowledged fan-out before this returns.
    pub async fn end(
        &self,
        caller: &Caller,
        id: &str,
        reason: &str,
        cancel: bool,
    ) -> Result<ElevationRecord, ElevationError> {
        check_text("reason", reason, 1024, false)?;
        let record = self.get(id).await?;
        if cancel && record.requester != caller.requester() {
            let why = format!(
                "elevation {id}: only its requester withdraws a request; reviewers deny it"
            );
            self.audit.note_refusal(
                Event::new(&caller.actor(), "elevation.cancel", id).denied(why.clone()),
            );
            return Err(ElevationError::Denied(why));
        }
        if record.requester != caller.requester() {
            self.authorize_view(caller, &record, Action::ReviewElevation, "elevation.end")
                .await?;
        }
        let (from, to) = if cancel {
            (ElevationState::Pending, ElevationState::Cancelled)
        } else {
            (ElevationState::Active, ElevationState::Ended)
        };
        let reason = if reason.is_empty() {
            if cancel {
                "withdrawn"
            } else {
                "the task is done"
            }
        } else {
            reason
        };
        let by = caller.requester();
        if !self
            .store
            .finish_elevation(id, from, to, self.now(), &by, reason)
            .await?
        {
            return Err(ElevationError::Conflict(format!(
                "elevation {id} is {}, not {from}",
                record.state()
            )));
        }
        self.record_event(
            Event::new(
                &caller.actor(),
                if cancel {
                    "elevation.cancel"
                } else {
                    "elevation.end"
                },
                id,
            )
            .scope(scope_of(&record))
            .reason(reason),
        )
        .await?;
        tracing::info!(elevation = %id, by = %by, state = %to, "elevation ended");
        self.notify_now(if cancel { "cancel" } else { "end" }, id)
            .await;
        if !cancel {
            self.take_back(&record, &caller.actor(), reason).await?;
        }
        self.get(id).await
    }

    /// Revokes everything issued under `record`, acknowledged by the agents that held it.
    async fn take_back(
        &self,
        record: &ElevationRecord,
        actor: &Actor,
        reason: &str,
    ) -> Result<(), ElevationError> {
        // Nothing pushes the secret again once the revocation withdraws it.
        if record.scope_kind == SECRET {
            self.refresh_elevated().await?;
        }
        let report = self
            .revoker
            .revoke(
                Target::Elevation {
                    id: record.id.clone(),
                },
                &format!("elevation {} ended: {reason}", record.id),
                actor,
                Some(Duration::from_secs(2)),
            )
            .await?;
        self.store
            .set_elevation_revocation(&record.id, &report.record.id)
            .await?;
        Ok(())
    }

    /// Moves what is due: active elevations past their end elapse (and are taken back),
    /// pending ones past their deadline expire; and an elevation recorded as over whose
    /// leases were never taken back (its daemon died in between) is taken back now.
    pub async fn sweep(&self) -> Result<usize, ElevationError> {
        let now = self.now();
        // What other daemons on the store activated or ended; temporary entries an
        // interrupted activation never created.
        self.refresh_elevated().await?;
        for record in self.store.active_elevations(&[ENTRY]).await? {
            if record.granted_entry.is_empty() && record.ends_at.is_some_and(|end| end > now) {
                self.grant_entry(&record).await?;
            }
        }
        // Not those that ended a moment ago: their `end` call may still be taking back.
        for record in self
            .store
            .elevations_untaken(now - UNTAKEN_GRACE_SECS, 100)
            .await?
        {
            tracing::warn!(elevation = %record.id, "an ended elevation's leases were never taken back; taking them back now");
            self.take_back(&record, &Actor::Daemon, "resumed after a restart")
                .await?;
        }
        let due = self.store.elevations_due(now, 100).await?;
        let mut moved = 0;
        for record in due {
            let (from, to, why) = match record.state() {
                ElevationState::Active => (
                    ElevationState::Active,
                    ElevationState::Elapsed,
                    "its TTL ran out",
                ),
                _ => (
                    ElevationState::Pending,
                    ElevationState::Expired,
                    "nobody decided in time",
                ),
            };
            if !self
                .store
                .finish_elevation(&record.id, from, to, now, "", why)
                .await?
            {
                continue;
            }
            moved += 1;
            self.record_event(
                Event::new(
                    &Actor::Daemon,
                    if to == ElevationState::Elapsed {
                        "elevation.elapse"
                    } else {
                        "elevation.expire"
                    },
                    &record.id,
                )
                .scope(scope_of(&record))
                .reason(why),
            )
            .await?;
            tracing::info!(elevation = %record.id, state = %to, "elevation over");
            self.notify_now("expire", &record.id).await;
            if to == ElevationState::Elapsed {
                self.take_back(&record, &Actor::Daemon, why).await?;
            }
        }
        Ok(moved)
    }

    async fn sweep_loop(self: Arc<Self>) {
        let interval = std::env::var("MAYFLY_ELEVATION_SWEEP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(SWEEP_INTERVAL);
        let mut timer = tokio::time::interval(interval);
        loop {
            timer.tick().await;
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "elevation sweep failed");
            }
        }
    }

    // ----- reading -----

    pub async fn get(&self, id: &str) -> Result<ElevationRecord, ElevationError> {
        match self.store.get_elevation(id).await {
            Ok(record) => Ok(record),
            Err(StoreError::NotFound { .. }) => Err(ElevationError::NotFound(format!(
                "no elevation with id {id}"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The credential of `caller`'s own active elevation (an operator's; a workload's
    /// comes through its agent like any other credential).
    pub async fn issue_credential(
        &self,
        caller: &Caller,
        id: &str,
        requested: Duration,
    ) -> Result<crate::creds::Granted, ElevationError> {
        let record = self.get(id).await?;
        self.check_own_active(caller, &record, CREDENTIAL, "credential.issue")?;
        Ok(self.broker.issue_elevated(&record, requested).await?)
    }

    /// The current value of the secret of `caller`'s own active elevation (an
    /// operator's; a workload's arrives through its agent like any granted secret).
    pub async fn read_secret(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(ElevationRecord, Arc<crate::secrets::engine::Promoted>), ElevationError> {
        let record = self.get(id).await?;
        self.check_own_active(caller, &record, SECRET, "secret.read")?;
        let value = self
            .secrets
            .promoted(&record.scope_name)
            .await
            .map_err(|e| ElevationError::Unavailable(e.to_string()))?
            .ok_or_else(|| {
                ElevationError::Unavailable(format!(
                    "secret {} has no current value yet (it has not been rotated once)",
                    record.scope_name
                ))
            })?;
        self.record_event(
            Event::new(&caller.actor(), "secret.read", &record.scope_name)
                .scope(format!("elevation {id}"))
                .detail(serde_json::json!({ "version": value.version, "elevation": id })),
        )
        .await?;
        Ok((record, value))
    }

    /// Refuses (audited as `audit_action`) unless `record` is `caller`'s own active
    /// elevation to a `kind`.
    fn check_own_active(
        &self,
        caller: &Caller,
        record: &ElevationRecord,
        kind: &str,
        audit_action: &str,
    ) -> Result<(), ElevationError> {
        if record.requester != caller.requester() {
            let why = format!("elevation {} is not {}'s", record.id, caller.describe());
            self.audit.note_refusal(
                Event::new(&caller.actor(), audit_action, &record.scope_name)
                    .scope(format!("elevation {}", record.id))
                    .denied(why.clone()),
            );
            return Err(ElevationError::Denied(why));
        }
        if record.scope_kind != kind {
            return Err(ElevationError::Invalid(format!(
                "elevation {} is to {} {}, not to a {kind}",
                record.id, record.scope_kind, record.scope_name
            )));
        }
        if record.state() != ElevationState::Active
            || record.ends_at.is_none_or(|end| end <= self.now())
        {
            return Err(ElevationError::Conflict(format!(
                "elevation {} is {}, not active",
                record.id,
                record.state()
            )));
        }
        Ok(())
    }

    /// Decides whether `caller` may read (or, with `ReviewElevation`, act on) `record`.
    async fn authorize_view(
        &self,
        caller: &Caller,
        record: &ElevationRecord,
        action: Action,
        audit_action: &str,
    ) -> Result<PolicyDecision, ElevationError> {
        let Caller::Operator { uid, name } = caller else {
            let why = format!("elevation {} is not {}'s", record.id, caller.describe());
            self.audit.note_refusal(
                Event::new(&caller.actor(), audit_action, &record.id).denied(why.clone()),
            );
            return Err(ElevationError::Denied(why));
        };
        let subject = self
            .subject(&record.scope_kind, &record.scope_name, false)
            .await?;
        let reviews = self.store.elevation_reviews(&record.id).await?;
        let (approvals, denials) = count(&reviews);
        self.policy
            .authorize(
                &Access {
                    principal: Principal::Operator {
                        uid: *uid,
                        name: name.as_str(),
                    },
                    action,
                    resource: subject.resource(),
                    context: context_of(
                        record,
                        Source::ElevationSocket,
                        audit_action,
                        facts_of(record, approvals, denials),
                    ),
                },
                audit_action,
            )
            .map_err(|denied| {
                ElevationError::Denied(format!(
                    "elevation {} for {}: {}",
                    record.id,
                    caller.describe(),
                    denied.reason
                ))
            })
    }

    /// Tells the webhooks of `event`, with the elevation as it stands now.
    async fn notify_now(&self, event: &str, id: &str) {
        match self.store.get_elevation(id).await {
            Ok(record) => self.notifier.send(event, &record, serde_json::json!({})),
            Err(e) => {
                tracing::warn!(elevation = %id, error = %e, "could not read an elevation to notify")
            }
        }
    }

    async fn record_event(&self, event: Event) -> Result<(), ElevationError> {
        self.audit.record(event).await.map(|_| ()).map_err(|e| {
            ElevationError::Store(StoreError::Corrupt {
                what: "audit trail",
                detail: e.to_string(),
            })
        })
    }
}

fn principal(caller: &Caller) -> Principal<'_> {
    match caller {
        Caller::Operator { uid, name } => Principal::Operator {
            uid: *uid,
            name: name.as_str(),
        },
        Caller::Workload { spiffe_id, .. } => Principal::Workload {
            spiffe_id: spiffe_id.as_str(),
        },
    }
}

fn source(caller: &Caller) -> Source {
    match caller {
        Caller::Operator { .. } => Source::ElevationSocket,
        Caller::Workload { .. } => Source::NodeApi,
    }
}

fn facts_of(record: &ElevationRecord, approvals: i64, denials: i64) -> ElevationFacts<'_> {
    ElevationFacts {
        requester: &record.requester,
        requester_kind: &record.requester_kind,
        reason: &record.reason,
        ticket: &record.ticket,
        break_glass: record.break_glass,
        approvals,
        denials,
    }
}

fn context_of<'a>(
    record: &'a ElevationRecord,
    source: Source,
    method: &'a str,
    facts: ElevationFacts<'a>,
) -> AccessContext<'a> {
    AccessContext {
        node: &record.agent_id,
        selectors: &[],
        ttl_seconds: record.requested_ttl,
        source,
        method,
        elevation: Some(facts),
    }
}

/// Distinct approvals and denials (one verdict per reviewer is all the store keeps).
fn count(reviews: &[ElevationReview]) -> (i64, i64) {
    let approvals = reviews.iter().filter(|r| r.verdict == "approve").count() as i64;
    (approvals, reviews.len() as i64 - approvals)
}

fn scope_of(record: &ElevationRecord) -> String {
    format!(
        "{} {} for {} ({})",
        record.scope_kind, record.scope_name, record.requester, record.requester_kind
    )
}
