//! Emergency revocation: one SVID by serial, every SVID of an identity, everything matching
//! a selector, a whole agent, or a secret's current value. A revocation is written (with
//! its deny-list serials and the agents it must reach) before anything is pushed, pushed
//! to each affected agent's sync stream, and acknowledged by each agent once it has
//! dropped the credential and dealt with the files holding it. An agent that is away gets
//! its unacknowledged revocations in the full state it receives on reconnecting.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use mayfly_common::{Selector, SpiffeId};
use mayfly_proto::v1;

use crate::audit::{Actor, Audit, Event};
use crate::identity::{IdentityError, Registry, RevocationNotice};
use crate::secrets::engine::RotationEngine;
use crate::secrets::runtime::EngineError;
use crate::secrets::spec::Strategy;
use crate::store::{
    AckUpdate, AgentStatus, EntryFilter, RevocationRecord, RevokedSerialRecord, StoreError,
};
use mayfly_common::clock::{unix, unix_ms};

mod execute;
mod fanout;
mod resolve;

/// How long `revoke` waits for acknowledgements unless told otherwise.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

/// The longest an operator may ask to wait.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Svid {
        serial: String,
    },
    Entry {
        spiffe_id: SpiffeId,
    },
    Selector {
        selector: Selector,
    },
    Agent {
        spiffe_id: SpiffeId,
    },
    Secret {
        name: String,
    },
    /// One credential lease, revoked at its backend.
    Lease {
        id: String,
    },
    /// Every live lease of one credential.
    Credential {
        name: String,
    },
    /// The live leases of one credential whose holders its definition no longer grants:
    /// what redefining it with fewer grants revokes. Not an operator's target.
    Ungranted {
        name: String,
    },
    /// The live leases `agent` holds for `spiffe_id` once no entry has it serve that
    /// identity any more: what deleting the last such entry revokes. Not an operator's
    /// target.
    Unserved {
        spiffe_id: String,
        agent: String,
    },
    /// Everything issued under one elevation, when it ends: what `elevation end` and its
    /// expiry revoke. Not an operator's target (`mayflyd elevation end` is).
    Elevation {
        id: String,
    },
}

impl Target {
    /// Parses the admin API's (kind, target) pair.
    pub fn parse(kind: &str, target: &str) -> Result<Self, RevokeError> {
        let target = target.trim();
        if target.is_empty() {
            return Err(RevokeError::Invalid(format!(
                "revoke {kind}: say what to revoke"
            )));
        }
        let id = |what: &str| {
            SpiffeId::parse(target)
                .map_err(|e| RevokeError::Invalid(format!("{what} `{target}`: {e}")))
        };
        Ok(match kind {
            "svid" => {
                // As openssl prints it (colons) or as the agent does (plain hex).
                // Whole bytes without leading zero bytes, as the daemon stores them.
                let mut serial = target.replace(':', "").to_ascii_lowercase();
                if serial.len() % 2 == 1 {
                    serial.insert(0, '0');
                }
                while serial.len() > 2 && serial.starts_with("00") {
                    serial.drain(..2);
                }
                if !serial.chars().all(|c| c.is_ascii_hexdigit()) || serial.len() > 64 {
                    return Err(RevokeError::Invalid(format!(
                        "serial `{target}` is not a hex serial as `mayfly-agent api fetch` shows it"
                    )));
                }
                Target::Svid { serial }
            }
            "entry" => Target::Entry {
                spiffe_id: id("SPIFFE ID")?,
            },
            "agent" => Target::Agent {
                spiffe_id: id("agent SPIFFE ID")?,
            },
            "selector" => Target::Selector {
                selector: Selector::parse(target)
                    .map_err(|e| RevokeError::Invalid(format!("selector `{target}`: {e}")))?,
            },
            "secret" => Target::Secret {
                name: target.to_string(),
            },
            "lease" => Target::Lease {
                id: target.to_string(),
            },
            "credential" => Target::Credential {
                name: target.to_string(),
            },
            other => {
                return Err(RevokeError::Invalid(format!(
                    "unknown revocation kind `{other}`: use svid, entry, selector, agent, secret, lease or credential"
                )));
            }
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Target::Svid { .. } => "svid",
            Target::Entry { .. } => "entry",
            Target::Selector { .. } => "selector",
            Target::Agent { .. } => "agent",
            Target::Secret { .. } => "secret",
            Target::Lease { .. } => "lease",
            Target::Credential { .. } | Target::Ungranted { .. } => "credential",
            Target::Unserved { .. } => "entry",
            Target::Elevation { .. } => "elevation",
        }
    }

    fn text(&self) -> String {
        match self {
            Target::Svid { serial } => serial.clone(),
            Target::Entry { spiffe_id } | Target::Agent { spiffe_id } => spiffe_id.to_string(),
            Target::Selector { selector } => selector.to_string(),
            Target::Secret { name } | Target::Credential { name } | Target::Ungranted { name } => {
                name.clone()
            }
            Target::Lease { id } | Target::Elevation { id } => id.clone(),
            Target::Unserved { spiffe_id, .. } => spiffe_id.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevokeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Credentials(#[from] crate::creds::CredsError),
}

/// What a revocation covered, kept as the revocation's JSON detail.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Scope {
    #[serde(default)]
    pub entry_ids: Vec<String>,
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Credential leases revoked at their backend.
    #[serde(default)]
    pub lease_ids: Vec<String>,
    #[serde(default)]
    pub everything: bool,
    /// Secrets taken back from workloads an ended elevation gave them to.
    #[serde(default)]
    pub withdrawn: Vec<Withdrawn>,
    /// The CA behind the agents' own SVIDs is tainted: they renew at once.
    #[serde(default)]
    pub renew_agent_svid: bool,
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One secret taken back from workloads of one agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Withdrawn {
    pub secret: String,
    pub agent: String,
    pub spiffe_ids: Vec<String>,
}

/// A resolved revocation, before anything is written.
struct Plan {
    kind: String,
    target: String,
    scope: Scope,
    serials: Vec<RevokedSerialRecord>,
    agents: BTreeSet<String>,
    /// The agent to ban once the revocation is pushed.
    ban: Option<String>,
}

/// One agent's standing on a revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAck {
    pub agent: String,
    pub acked_at: Option<i64>,
    pub detail: String,
}

/// What the operator is shown.
#[derive(Debug, Clone)]
pub struct Report {
    pub record: RevocationRecord,
    pub scope: Scope,
    pub serials: Vec<String>,
    pub agents: Vec<AgentAck>,
    pub elapsed_ms: i64,
}

pub struct Revoker {
    registry: Arc<Registry>,
    secrets: Arc<RotationEngine>,
    /// Revokes credential leases at their backends.
    broker: Arc<crate::creds::Broker>,
    audit: Audit,
    /// What each agent may see, to find those holding a revoked secret.
    view: crate::visibility::Visibility,
    /// Revocations being waited on here: the agents they were sent to, and those that
    /// have acknowledged so far.
    waiting: Mutex<HashMap<String, Waiting>>,
    /// Revocations already pushed to this daemon's streams, with when they were made.
    published: Mutex<HashMap<String, i64>>,
}

struct Waiting {
    expected: Arc<BTreeSet<String>>,
    acked: watch::Sender<BTreeSet<String>>,
}

/// How far back a catch-up looks for other daemons' revocations whose notices were lost.
/// An agent away longer gets its unacknowledged revocations in its full state anyway.
const CATCH_UP_WINDOW: Duration = Duration::from_secs(600);

impl Revoker {
    pub fn new(
        registry: Arc<Registry>,
        secrets: Arc<RotationEngine>,
        broker: Arc<crate::creds::Broker>,
        audit: Audit,
        view: crate::visibility::Visibility,
    ) -> Self {
        Self {
            registry,
            secrets,
            broker,
            audit,
            view,
            waiting: Mutex::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
        }
    }

    /// Revokes, pushes, and waits up to `wait` for every affected agent to acknowledge.
    pub async fn revoke(
        &self,
        target: Target,
        reason: &str,
        actor: &Actor,
        wait: Option<Duration>,
    ) -> Result<Report, RevokeError> {
        let (reason, wait) = checked(reason, wait)?;
        let started = Instant::now();
        let result = self.apply(&target, reason, actor, started, wait).await;
        if let Err(e) = &result {
            self.audit.note(
                Event::new(actor, &format!("revoke.{}", target.kind()), target.text())
                    .failed(e.to_string())
                    .scope(reason.to_string()),
            );
        }
        result
    }

    async fn apply(
        &self,
        target: &Target,
        reason: &str,
        actor: &Actor,
        started: Instant,
        wait: Duration,
    ) -> Result<Report, RevokeError> {
        let plan = self.resolve(target, reason, actor).await?;
        self.execute(plan, reason, actor, started, wait).await
    }
}

fn message(
    record: &RevocationRecord,
    scope: &Scope,
    serials: &[RevokedSerialRecord],
) -> v1::Revocation {
    v1::Revocation {
        id: record.id.clone(),
        kind: record.kind.clone(),
        reason: record.reason.clone(),
        serials: serials
            .iter()
            .map(|s| v1::RevokedSerial {
                serial: s.serial.clone(),
                not_after: s.not_after,
            })
            .collect(),
        entry_ids: scope.entry_ids.clone(),
        spiffe_ids: scope.spiffe_ids.clone(),
        replacements: Vec::new(),
        everything: scope.everything,
        created_at: record.created_at,
        renew_agent_svid: scope.renew_agent_svid,
        lease_ids: scope.lease_ids.clone(),
        withdrawn_secrets: scope
            .withdrawn
            .iter()
            .map(|w| v1::SecretWithdrawal {
                name: w.secret.clone(),
                spiffe_ids: w.spiffe_ids.clone(),
                agent: w.agent.clone(),
            })
            .collect(),
    }
}

/// The reason every revocation must give, trimmed, and how long to wait (capped).
fn checked(reason: &str, wait: Option<Duration>) -> Result<(&str, Duration), RevokeError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(RevokeError::Invalid(
            "--reason is required: say why, for the audit trail".into(),
        ));
    }
    Ok((reason, wait.unwrap_or(DEFAULT_WAIT).min(MAX_WAIT)))
}

/// The report as the admin API returns it.
pub fn report_message(report: &Report) -> v1::RevocationReport {
    let mut by_agent: BTreeMap<&str, &AgentAck> = BTreeMap::new();
    for a in &report.agents {
        by_agent.insert(&a.agent, a);
    }
    v1::RevocationReport {
        id: report.record.id.clone(),
        kind: report.record.kind.clone(),
        target: report.record.target.clone(),
        reason: report.record.reason.clone(),
        actor: report.record.actor.clone(),
        created_at: report.record.created_at,
        serials: report.serials.clone(),
        entry_ids: report.scope.entry_ids.clone(),
        spiffe_ids: report.scope.spiffe_ids.clone(),
        agents: by_agent
            .values()
            .map(|a| v1::AgentAck {
                agent: a.agent.clone(),
                acknowledged: a.acked_at.is_some(),
                acked_at: a.acked_at.unwrap_or(0),
                detail: a.detail.clone(),
            })
            .collect(),
        elapsed_ms: report.elapsed_ms,
        notes: report.scope.notes.clone(),
    }
}
