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
    /// Which of the entries, SPIFFE IDs and serials above each agent holds, where that is
    /// known: an entry is held by its agent, an SVID (with its entry and SPIFFE ID) by the
    /// agent it was signed for. Each agent is sent what it holds and whatever no agent is
    /// known to hold, rather than every agent the whole list (see [`Shares`]). Empty for a
    /// revocation that names nothing agent by agent, or that was recorded before this was
    /// kept: then every agent it reaches is sent everything.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub held: BTreeMap<String, Held>,
}

/// What one agent holds of a revocation's entries, SPIFFE IDs and serials.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Held {
    #[serde(default)]
    pub entry_ids: BTreeSet<String>,
    #[serde(default)]
    pub spiffe_ids: BTreeSet<String>,
    #[serde(default)]
    pub serials: BTreeSet<String>,
}

/// A revocation's message split by agent ([`Scope::held`]), worked out once for every
/// stream that pushes it. Revoking a selector that 1,000 agents' entries carry sent each
/// agent all 1,000 entry IDs and SPIFFE IDs: a million of each to encode, encrypt and
/// send, which made the fan-out's cost grow with the square of the fleet, and told every
/// agent the names of the others' workloads.
#[derive(Debug, Clone, Default)]
pub struct Shares {
    /// Each agent's own part, in the message's order.
    by_agent: HashMap<String, Part>,
    /// What no agent is known to hold: everyone is sent it.
    unheld: Part,
    /// No split is known: everyone is sent everything.
    whole: bool,
}

#[derive(Debug, Clone, Default)]
struct Part {
    entry_ids: Vec<String>,
    spiffe_ids: Vec<String>,
    serials: Vec<v1::RevokedSerial>,
}

impl Shares {
    /// Splits `message`'s lists by what each agent of `held` holds.
    pub fn new(message: &v1::Revocation, held: &BTreeMap<String, Held>) -> Self {
        if held.is_empty() {
            return Self {
                whole: true,
                ..Self::default()
            };
        }
        let mut shares = Self::default();
        shares.split(
            &message.entry_ids,
            held,
            |h| &h.entry_ids,
            String::as_str,
            |p| &mut p.entry_ids,
        );
        shares.split(
            &message.spiffe_ids,
            held,
            |h| &h.spiffe_ids,
            String::as_str,
            |p| &mut p.spiffe_ids,
        );
        shares.split(
            &message.serials,
            held,
            |h| &h.serials,
            |s| s.serial.as_str(),
            |p| &mut p.serials,
        );
        shares
    }

    /// Puts each of `items` in the part of every agent `held` says holds it (`holds`
    /// picks that agent's set, `key` the item's name in it), or in the part everyone is
    /// sent when nobody does; `list` picks the list of a part. Each part keeps the
    /// message's order.
    fn split<T: Clone>(
        &mut self,
        items: &[T],
        held: &BTreeMap<String, Held>,
        holds: fn(&Held) -> &BTreeSet<String>,
        key: fn(&T) -> &str,
        list: fn(&mut Part) -> &mut Vec<T>,
    ) {
        let mut holders: HashMap<&str, Vec<&str>> = HashMap::new();
        for (agent, h) in held {
            for item in holds(h) {
                holders
                    .entry(item.as_str())
                    .or_default()
                    .push(agent.as_str());
            }
        }
        for item in items {
            match holders.get(key(item)) {
                Some(agents) => {
                    for agent in agents {
                        let part = self.by_agent.entry(agent.to_string()).or_default();
                        list(part).push(item.clone());
                    }
                }
                None => list(&mut self.unheld).push(item.clone()),
            }
        }
    }

    /// `message` as `agent` is sent it: its own entries, SPIFFE IDs and serials and those
    /// nobody is known to hold, and only its own withdrawn secrets.
    pub fn message_for(&self, agent: &str, message: &v1::Revocation) -> v1::Revocation {
        let withdrawn_secrets = message
            .withdrawn_secrets
            .iter()
            .filter(|w| w.agent == agent)
            .cloned()
            .collect();
        if self.whole {
            return v1::Revocation {
                withdrawn_secrets,
                ..message.clone()
            };
        }
        let own = self.by_agent.get(agent);
        // The agent's own items, then those nobody is known to hold.
        fn joined<T: Clone>(own: Option<&Part>, unheld: &Part, list: fn(&Part) -> &[T]) -> Vec<T> {
            own.map_or(&[][..], list)
                .iter()
                .chain(list(unheld))
                .cloned()
                .collect()
        }
        v1::Revocation {
            id: message.id.clone(),
            kind: message.kind.clone(),
            reason: message.reason.clone(),
            serials: joined(own, &self.unheld, |p| &p.serials),
            entry_ids: joined(own, &self.unheld, |p| &p.entry_ids),
            spiffe_ids: joined(own, &self.unheld, |p| &p.spiffe_ids),
            replacements: message.replacements.clone(),
            everything: message.everything,
            created_at: message.created_at,
            renew_agent_svid: message.renew_agent_svid,
            lease_ids: message.lease_ids.clone(),
            withdrawn_secrets,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn revocation(entries: &[&str], ids: &[&str], serials: &[&str]) -> v1::Revocation {
        v1::Revocation {
            id: "rv-1".into(),
            kind: "selector".into(),
            reason: "test".into(),
            serials: serials
                .iter()
                .map(|s| v1::RevokedSerial {
                    serial: s.to_string(),
                    not_after: 9,
                })
                .collect(),
            entry_ids: entries.iter().map(|s| s.to_string()).collect(),
            spiffe_ids: ids.iter().map(|s| s.to_string()).collect(),
            lease_ids: vec!["lease-1".into()],
            withdrawn_secrets: vec![
                v1::SecretWithdrawal {
                    name: "db".into(),
                    spiffe_ids: vec!["spiffe://t/w".into()],
                    agent: "a".into(),
                },
                v1::SecretWithdrawal {
                    name: "db".into(),
                    spiffe_ids: vec!["spiffe://t/w".into()],
                    agent: "b".into(),
                },
            ],
            ..Default::default()
        }
    }

    fn held(entries: &[&str], ids: &[&str], serials: &[&str]) -> Held {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Held {
            entry_ids: set(entries),
            spiffe_ids: set(ids),
            serials: set(serials),
        }
    }

    #[test]
    fn each_agent_is_sent_what_it_holds_and_what_nobody_is_known_to_hold() {
        let message = revocation(
            &["e-a", "e-b", "e-moved", "e-unknown"],
            &["spiffe://t/a", "spiffe://t/b", "spiffe://t/moved"],
            &["s-a", "s-b", "s-old", "s-unknown"],
        );
        let shares = Shares::new(
            &message,
            &BTreeMap::from([
                ("a".to_string(), held(&["e-a"], &["spiffe://t/a"], &["s-a"])),
                // b holds its own entry, and an SVID of an entry that moved to c.
                (
                    "b".to_string(),
                    held(
                        &["e-b", "e-moved"],
                        &["spiffe://t/b", "spiffe://t/moved"],
                        &["s-b", "s-old"],
                    ),
                ),
                (
                    "c".to_string(),
                    held(&["e-moved"], &["spiffe://t/moved"], &[]),
                ),
            ]),
        );
        let serials = |m: &v1::Revocation| -> Vec<String> {
            m.serials.iter().map(|s| s.serial.clone()).collect()
        };

        let a = shares.message_for("a", &message);
        assert_eq!(a.entry_ids, ["e-a", "e-unknown"]);
        assert_eq!(a.spiffe_ids, ["spiffe://t/a"]);
        assert_eq!(serials(&a), ["s-a", "s-unknown"]);
        assert_eq!(a.withdrawn_secrets.len(), 1);
        assert_eq!(a.withdrawn_secrets[0].agent, "a");
        // What is not split goes as it is.
        assert_eq!((a.id.as_str(), a.lease_ids.len()), ("rv-1", 1));

        let b = shares.message_for("b", &message);
        assert_eq!(b.entry_ids, ["e-b", "e-moved", "e-unknown"]);
        assert_eq!(b.spiffe_ids, ["spiffe://t/b", "spiffe://t/moved"]);
        assert_eq!(serials(&b), ["s-b", "s-old", "s-unknown"]);

        let c = shares.message_for("c", &message);
        assert_eq!(c.entry_ids, ["e-moved", "e-unknown"]);
        assert!(c.withdrawn_secrets.is_empty());

        // An agent the revocation reaches for something else (a lease) holds none of them.
        let d = shares.message_for("d", &message);
        assert_eq!(d.entry_ids, ["e-unknown"]);
        assert!(d.spiffe_ids.is_empty());
        assert_eq!(serials(&d), ["s-unknown"]);
        assert_eq!(d.lease_ids, ["lease-1"]);
    }

    #[test]
    fn without_a_split_every_agent_is_sent_everything_but_others_withdrawals() {
        let message = revocation(&["e-1", "e-2"], &["spiffe://t/1"], &["s-1"]);
        let shares = Shares::new(&message, &BTreeMap::new());
        let b = shares.message_for("b", &message);
        assert_eq!(b.entry_ids, message.entry_ids);
        assert_eq!(b.spiffe_ids, message.spiffe_ids);
        assert_eq!(b.serials, message.serials);
        assert_eq!(b.withdrawn_secrets.len(), 1);
        assert_eq!(b.withdrawn_secrets[0].agent, "b");
    }

    #[test]
    fn a_scope_recorded_before_the_split_was_kept_still_reads() {
        let scope: Scope =
            serde_json::from_str(r#"{"entry_ids":["e-1"],"spiffe_ids":["spiffe://t/1"]}"#).unwrap();
        assert!(scope.held.is_empty());
        // And one without a split is written as it was.
        assert!(!serde_json::to_string(&scope).unwrap().contains("held"));
        let mut split = scope.clone();
        split
            .held
            .insert("a".into(), held(&["e-1"], &["spiffe://t/1"], &[]));
        let back: Scope = serde_json::from_str(&serde_json::to_string(&split).unwrap()).unwrap();
        assert_eq!(back, split);
    }
}
