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

/// How long `revoke` waits for acknowledgements unless told otherwise.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

/// The longest an operator may ask to wait.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Svid { serial: String },
    Entry { spiffe_id: SpiffeId },
    Selector { selector: Selector },
    Agent { spiffe_id: SpiffeId },
    Secret { name: String },
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
            other => {
                return Err(RevokeError::Invalid(format!(
                    "unknown revocation kind `{other}`: use svid, entry, selector, agent or secret"
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
        }
    }

    fn text(&self) -> String {
        match self {
            Target::Svid { serial } => serial.clone(),
            Target::Entry { spiffe_id } | Target::Agent { spiffe_id } => spiffe_id.to_string(),
            Target::Selector { selector } => selector.to_string(),
            Target::Secret { name } => name.clone(),
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
    #[serde(default)]
    pub everything: bool,
    /// The CA behind the agents' own SVIDs is tainted: they renew at once.
    #[serde(default)]
    pub renew_agent_svid: bool,
    #[serde(default)]
    pub notes: Vec<String>,
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
    audit: Audit,
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

/// How often a daemon looks for revocations made by another daemon on the same store.
const WATCH_EVERY: Duration = Duration::from_millis(500);

impl Revoker {
    pub fn new(registry: Arc<Registry>, secrets: Arc<RotationEngine>, audit: Audit) -> Self {
        Self {
            registry,
            secrets,
            audit,
            waiting: Mutex::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
        }
    }

    fn published_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.published.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pushes revocations that another daemon sharing the datastore made to the agents
    /// connected here, within [`WATCH_EVERY`]; their acknowledgements land in the store,
    /// where the revoking daemon looks for them.
    pub async fn watch_other_daemons(self: Arc<Self>) {
        let started = unix_ms(self.registry.now());
        let mut timer = tokio::time::interval(WATCH_EVERY);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing = self.registry.closing();
        loop {
            tokio::select! {
                _ = timer.tick() => {}
                _ = closing.wait_for(|c| *c) => return,
            }
            // Clocks of daemons differ a little; look back a few seconds, and remember
            // what has been pushed for a minute.
            let now = unix_ms(self.registry.now());
            let since = (now - 5_000).max(started - 5_000);
            self.published_map().retain(|_, at| *at >= now - 60_000);
            let records = match self.registry.store().revocations_since(since).await {
                Ok(records) => records,
                Err(e) => {
                    tracing::warn!(error = %e, "could not look for other daemons' revocations");
                    continue;
                }
            };
            for record in records {
                if self.published_map().contains_key(&record.id) {
                    continue;
                }
                if let Err(e) = self.publish_stored(&record).await {
                    tracing::warn!(revocation = %record.id, error = %e, "could not push another daemon's revocation");
                    continue;
                }
                self.published_map()
                    .insert(record.id.clone(), record.created_at);
            }
        }
    }

    async fn publish_stored(&self, record: &RevocationRecord) -> Result<(), RevokeError> {
        let store = self.registry.store();
        let scope: Scope = serde_json::from_str(&record.detail).unwrap_or_default();
        let serials = store.revocation_serials(&record.id).await?;
        let agents: BTreeSet<String> = store
            .revocation_acks(&record.id)
            .await?
            .into_iter()
            .filter(|a| a.acked_at.is_none())
            .map(|a| a.agent_id)
            .collect();
        self.registry.forget_revoked_entries(&scope.entry_ids);
        tracing::info!(revocation = %record.id, kind = %record.kind, agents = agents.len(), "pushing a revocation made by another daemon");
        self.registry.publish_revocation(RevocationNotice {
            message: message(record, &scope, &serials),
            secrets: scope.secrets.clone(),
            agents,
        });
        Ok(())
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
        let plan = self.resolve(target).await?;
        self.execute(plan, reason, actor, started, wait).await
    }

    /// What revoking `target` covers, from the store; changes nothing (but a secret's
    /// replacement rotations, which must succeed before its old value can be revoked).
    async fn resolve(&self, target: &Target) -> Result<Plan, RevokeError> {
        let now_s = unix(self.registry.now());
        let store = self.registry.store();
        let mut scope = Scope::default();
        let mut serials: Vec<RevokedSerialRecord> = Vec::new();
        let mut agents: BTreeSet<String> = BTreeSet::new();
        let mut ban: Option<String> = None;
        match target {
            Target::Svid { serial } => {
                let issued = store.issued_svid(serial).await?.ok_or_else(|| {
                    RevokeError::NotFound(format!(
                        "serial {serial} was not issued by this trust domain's daemon, or it \
                         expired and has been forgotten"
                    ))
                })?;
                if issued.not_after <= now_s {
                    return Err(RevokeError::Invalid(format!(
                        "serial {serial} ({}) already expired; nothing to revoke",
                        issued.spiffe_id
                    )));
                }
                if issued.entry_id.is_empty() {
                    return Err(RevokeError::Invalid(format!(
                        "serial {serial} is agent {}'s own SVID: revoke the agent with \
                         `mayflyd revoke agent --id {}`",
                        issued.agent_id, issued.agent_id
                    )));
                }
                // The entry's current parent holds it; if the entry moved, the old one may too.
                agents.insert(issued.agent_id.clone());
                if let Ok(entry) = self.registry.get_entry(&issued.entry_id).await {
                    agents.insert(entry.parent_id);
                }
                scope.notes.push(format!(
                    "the entry stays: agents get a fresh SVID for {} under a new key",
                    issued.spiffe_id
                ));
                serials.push(RevokedSerialRecord {
                    serial: issued.serial,
                    not_after: issued.not_after,
                });
            }
            Target::Entry { .. } | Target::Selector { .. } => {
                // From the store, not this daemon's index: another daemon sharing the
                // store may have made the entries.
                let (filter, wanted, none) = match target {
                    Target::Entry { spiffe_id } => (
                        EntryFilter {
                            spiffe_id: Some(spiffe_id.to_string()),
                            ..EntryFilter::default()
                        },
                        None,
                        format!("no entry gives {spiffe_id}; `mayflyd entry list` shows them"),
                    ),
                    Target::Selector { selector } => (
                        EntryFilter::default(),
                        Some(selector.to_string()),
                        format!("no entry has the selector {selector}"),
                    ),
                    _ => unreachable!("matched above"),
                };
                let entries: Vec<_> = self
                    .registry
                    .list_entries(&filter)
                    .await?
                    .into_iter()
                    .filter(|e| wanted.as_ref().is_none_or(|w| e.selectors.contains(w)))
                    .collect();
                if entries.is_empty() {
                    return Err(RevokeError::NotFound(none));
                }
                self.cover_entries(&entries, &mut scope, &mut agents, &mut serials, now_s)
                    .await?;
            }
            Target::Agent { spiffe_id } => {
                let agent = store.get_agent(spiffe_id.as_str()).await?.ok_or_else(|| {
                    RevokeError::NotFound(format!(
                        "agent {spiffe_id} is not known; `mayflyd agent list` shows them"
                    ))
                })?;
                if agent.status == AgentStatus::Banned {
                    return Err(RevokeError::Invalid(format!(
                        "agent {spiffe_id} is already banned"
                    )));
                }
                for svid in store
                    .live_serials_for_agent(&agent.spiffe_id, now_s)
                    .await?
                {
                    serials.push(RevokedSerialRecord {
                        serial: svid.serial,
                        not_after: svid.not_after,
                    });
                }
                if agent.svid_expires_at > now_s {
                    serials.push(RevokedSerialRecord {
                        serial: agent.serial.clone(),
                        not_after: agent.svid_expires_at,
                    });
                }
                scope.everything = true;
                scope.spiffe_ids = store
                    .entries_for_parent(&agent.spiffe_id)
                    .await?
                    .iter()
                    .map(|e| e.spiffe_id.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                scope.notes.push(format!(
                    "agent {spiffe_id} is banned: it may not attest again"
                ));
                agents.insert(agent.spiffe_id.clone());
                ban = Some(agent.spiffe_id);
            }
            Target::Secret { name } => {
                let spec = self.secrets.spec(name).await?;
                // Rotate first: until a new value works on the target, the old one is
                // still the only one, and revoking it would only break the apps.
                let rounds = match spec.strategy {
                    Strategy::SingleUser => 1,
                    // The other user keeps the previous value valid for zero-downtime
                    // rotation; a second rotation gives that user a fresh one too.
                    Strategy::AlternatingUsers => 2,
                };
                for round in 0..rounds {
                    let outcome = self.secrets.rotate_now(name, "revoke").await?;
                    if outcome.job.state != "promoted" {
                        return Err(RevokeError::Failed(format!(
                            "the rotation that replaces secret {name} failed ({}); the old value \
                             is still valid",
                            outcome.job.last_error
                        )));
                    }
                    scope.notes.push(format!(
                        "rotation {} of {rounds} promoted version {} for user {}",
                        round + 1,
                        outcome.job.token,
                        outcome.job.username
                    ));
                }
                scope.secrets.push(name.clone());
                let specs = [spec];
                for agent in store.list_agents().await? {
                    if agent.status == AgentStatus::Active
                        && !self.registry.granted(&specs, &agent.spiffe_id).is_empty()
                    {
                        agents.insert(agent.spiffe_id);
                    }
                }
            }
        }

        Ok(Plan {
            kind: target.kind().to_string(),
            target: target.text(),
            scope,
            serials,
            agents,
            ban,
        })
    }

    /// Records the revocation and its audit record, pushes it, and waits for the agents.
    async fn execute(
        &self,
        plan: Plan,
        reason: &str,
        actor: &Actor,
        started: Instant,
        wait: Duration,
    ) -> Result<Report, RevokeError> {
        let Plan {
            kind,
            target,
            scope,
            serials,
            agents,
            ban,
        } = plan;
        let now = self.registry.now();
        let store = self.registry.store();
        let record = RevocationRecord {
            id: format!("rv-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
            kind,
            target,
            reason: reason.to_string(),
            actor: actor.to_string(),
            created_at: unix_ms(now),
            detail: serde_json::to_string(&scope).unwrap_or_default(),
        };
        let agent_list: Vec<String> = agents.iter().cloned().collect();
        // Known here before it is in the store, so the watch on other daemons' revocations
        // does not push it a second time.
        self.published_map()
            .insert(record.id.clone(), record.created_at);
        let deleted = store
            .create_revocation(&record, &serials, &agent_list, &scope.entry_ids)
            .await?;
        let deleted: Vec<String> = deleted.into_iter().map(|e| e.id).collect();
        self.registry.forget_revoked_entries(&deleted);
        self.audit
            .record(
                Event::new(actor, &format!("revoke.{}", record.kind), &record.target)
                    .reason(reason)
                    .scope(format!("revocation {}", record.id))
                    .detail(serde_json::json!({
                        "revocation": record.id,
                        "serials": serials.iter().map(|s| &s.serial).collect::<Vec<_>>(),
                        "entry_ids": scope.entry_ids,
                        "spiffe_ids": scope.spiffe_ids,
                        "secrets": scope.secrets,
                        "agents": agent_list,
                    })),
            )
            .await
            .map_err(|e| RevokeError::Failed(e.to_string()))?;

        // Waiting starts before the push so no acknowledgement is missed.
        let (acked_tx, mut acked_rx) = watch::channel(BTreeSet::new());
        self.waiting_map().insert(
            record.id.clone(),
            Waiting {
                expected: Arc::new(agents.clone()),
                acked: acked_tx,
            },
        );
        self.registry.publish_revocation(RevocationNotice {
            message: message(&record, &scope, &serials),
            secrets: scope.secrets.clone(),
            agents: agents.clone(),
        });
        if let Some(agent) = &ban {
            self.registry
                .set_agent_status(agent, AgentStatus::Banned, reason)
                .await?;
        }
        tracing::warn!(revocation = %record.id, kind = %record.kind, target = %record.target, agents = agents.len(), serials = serials.len(), %reason, "revoked");

        let deadline = tokio::time::Instant::now() + wait;
        let mut last_ack = started.elapsed();
        loop {
            let acked = acked_rx.borrow_and_update().len();
            if acked >= agents.len() {
                last_ack = started.elapsed();
                break;
            }
            tokio::select! {
                changed = acked_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                // Acknowledgements that reached another daemon sharing the store.
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    let stored = store.revocation_acks(&record.id).await?;
                    let done: BTreeSet<String> = stored
                        .into_iter()
                        .filter(|a| a.acked_at.is_some())
                        .map(|a| a.agent_id)
                        .collect();
                    self.mark(&record.id, done);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    last_ack = started.elapsed();
                    break;
                }
            }
        }
        self.waiting_map().remove(&record.id);
        // The acknowledgements seen here are committed with their records; wait for that.
        self.audit
            .flush()
            .await
            .map_err(|e| RevokeError::Failed(e.to_string()))?;
        let mut report = self.report(&record.id).await?;
        report.elapsed_ms = last_ack.as_millis() as i64;
        Ok(report)
    }

    async fn cover_entries(
        &self,
        entries: &[crate::store::EntryRecord],
        scope: &mut Scope,
        agents: &mut BTreeSet<String>,
        serials: &mut Vec<RevokedSerialRecord>,
        now_s: i64,
    ) -> Result<(), RevokeError> {
        let mut ids = BTreeSet::new();
        for entry in entries {
            scope.entry_ids.push(entry.id.clone());
            ids.insert(entry.spiffe_id.clone());
            agents.insert(entry.parent_id.clone());
        }
        scope.spiffe_ids = ids.into_iter().collect();
        for svid in self
            .registry
            .store()
            .live_serials_for_entries(&scope.entry_ids, now_s)
            .await?
        {
            // An entry that moved between agents: the old parent may still hold an SVID.
            agents.insert(svid.agent_id);
            serials.push(RevokedSerialRecord {
                serial: svid.serial,
                not_after: svid.not_after,
            });
        }
        Ok(())
    }

    fn waiting_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiting>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark(&self, id: &str, agents: BTreeSet<String>) {
        if let Some(waiting) = self.waiting_map().get(id) {
            waiting.acked.send_if_modified(|set| {
                let before = set.len();
                set.extend(agents);
                set.len() != before
            });
        }
    }

    /// `mayflyd ca taint`: a new CA signs from now on, and every agent re-signs what the
    /// old one signed (its workloads' SVIDs, under new keys, and its own), acknowledging
    /// like any revocation. The old CA stays in the bundle until `revoke_ca`.
    pub async fn taint_ca(
        &self,
        reason: &str,
        actor: &Actor,
        wait: Option<Duration>,
    ) -> Result<Report, RevokeError> {
        let (reason, wait) = checked(reason, wait)?;
        let started = Instant::now();
        let now = self.registry.now();
        let old = self
            .registry
            .ca()
            .taint(now)
            .await
            .map_err(|e| RevokeError::Failed(format!("preparing the new CA: {e}")))?;
        let new = self.registry.ca().current().active_slot.clone();
        let store = self.registry.store();
        let mut serials = Vec::new();
        for svid in store.live_serials_for_slot(&old, unix(now)).await? {
            if !svid.entry_id.is_empty() {
                serials.push(RevokedSerialRecord {
                    serial: svid.serial,
                    not_after: svid.not_after,
                });
            }
        }
        let agents: BTreeSet<String> = store
            .list_agents()
            .await?
            .into_iter()
            .filter(|a| a.status == AgentStatus::Active)
            .map(|a| a.spiffe_id)
            .collect();
        let scope = Scope {
            renew_agent_svid: true,
            notes: vec![format!(
                "CA {old} is tainted and CA {new} signs from now on; `mayflyd ca revoke` takes \
                 {old} out of the bundle once every agent has acknowledged"
            )],
            ..Scope::default()
        };
        let plan = Plan {
            kind: "ca".into(),
            target: old,
            scope,
            serials,
            agents,
            ban: None,
        };
        self.execute(plan, reason, actor, started, wait).await
    }

    /// `mayflyd ca revoke`: removes a retired CA from the bundle, refusing (and naming
    /// them) while any unexpired SVID it signed is not deny-listed, any agent still holds
    /// its own SVID from it, or any agent has not acknowledged its taint.
    pub async fn revoke_ca(
        &self,
        slot: Option<&str>,
        actor: &Actor,
    ) -> Result<String, RevokeError> {
        let store = self.registry.store();
        let slot = match slot.filter(|s| !s.is_empty()) {
            Some(slot) => slot.to_string(),
            None => store
                .list_revocations(1000)
                .await?
                .into_iter()
                .find(|r| r.kind == "ca")
                .map(|r| r.target)
                .ok_or_else(|| {
                    RevokeError::NotFound(
                        "no CA has been tainted; name the retired slot with --slot".into(),
                    )
                })?,
        };
        let now_s = unix(self.registry.now());
        let denied: BTreeSet<String> = store
            .deny_list(now_s)
            .await?
            .into_iter()
            .map(|s| s.serial)
            .collect();
        let live = store.live_serials_for_slot(&slot, now_s).await?;
        let agent_serials: BTreeSet<&str> = live
            .iter()
            .filter(|s| s.entry_id.is_empty())
            .map(|s| s.serial.as_str())
            .collect();
        let workloads = live
            .iter()
            .filter(|s| !s.entry_id.is_empty() && !denied.contains(&s.serial))
            .count();
        let mut on_old = Vec::new();
        for agent in store.list_agents().await? {
            if agent.status == AgentStatus::Active && agent_serials.contains(agent.serial.as_str())
            {
                on_old.push(agent.spiffe_id);
            }
        }
        let mut unacked = BTreeSet::new();
        for revocation in store.list_revocations(1000).await? {
            if revocation.kind == "ca" && revocation.target == slot {
                for ack in store.revocation_acks(&revocation.id).await? {
                    if ack.acked_at.is_none() {
                        unacked.insert(ack.agent_id);
                    }
                }
            }
        }
        let mut problems = Vec::new();
        if workloads > 0 {
            problems.push(format!(
                "{workloads} unexpired SVIDs it signed are not revoked (run `mayflyd ca taint` first)"
            ));
        }
        if !on_old.is_empty() {
            problems.push(format!(
                "agents still on an SVID it signed: {}",
                on_old.join(", ")
            ));
        }
        if !unacked.is_empty() {
            problems.push(format!(
                "agents that have not acknowledged its taint: {}",
                unacked.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        if !problems.is_empty() {
            let why = format!("CA {slot} is still depended on: {}", problems.join("; "));
            self.audit
                .note(Event::new(actor, "ca.revoke", &slot).failed(why.clone()));
            return Err(RevokeError::Failed(why));
        }
        self.registry
            .ca()
            .remove(&slot, self.registry.now())
            .await
            .map_err(|e| RevokeError::Failed(e.to_string()))?;
        self.audit
            .record(Event::new(actor, "ca.revoke", &slot).reason("removed from the bundle"))
            .await
            .map_err(|e| RevokeError::Failed(e.to_string()))?;
        Ok(slot)
    }

    /// Records an agent's acknowledgement (from its node API call).
    pub async fn acknowledge(
        &self,
        agent: &str,
        ack: &v1::RevocationAck,
    ) -> Result<(), RevokeError> {
        let detail = serde_json::json!({
            "dropped_serials": ack.dropped_serials,
            "reissued": ack.reissued,
            "files_removed": ack.files_removed,
            "files_blanked": ack.files_blanked,
            "actions": ack.actions,
            "errors": ack.errors,
        });
        let at_ms = unix_ms(self.registry.now());
        // While the revoking call waits, this daemon knows whom it was sent to and who
        // has answered; otherwise (a late or repeated acknowledgement, another daemon's
        // revocation) the store does.
        let in_memory = self
            .waiting_map()
            .get(&ack.revocation_id)
            .map(|w| (w.expected.contains(agent), w.acked.borrow().contains(agent)));
        let (sent, already) = match in_memory {
            Some(known) => known,
            None => match self
                .registry
                .store()
                .revocation_ack(&ack.revocation_id, agent)
                .await?
            {
                Some(row) => (true, row.acked_at.is_some()),
                None => (false, false),
            },
        };
        if !sent {
            return Err(RevokeError::NotFound(format!(
                "revocation {} was not sent to agent {agent}",
                ack.revocation_id
            )));
        }
        if !already {
            let outcome = if ack.errors.is_empty() {
                crate::audit::OK
            } else {
                crate::audit::FAILED
            };
            // The acknowledgement and its record commit together, grouped with whatever
            // else is being recorded: a fan-out to a thousand agents is a few commits.
            self.audit.note_ack(
                Event::new(
                    &Actor::Spiffe(agent.to_string()),
                    "revoke.ack",
                    &ack.revocation_id,
                )
                .outcome(outcome)
                .reason(ack.errors.join("; "))
                .detail(detail.clone()),
                AckUpdate {
                    revocation_id: ack.revocation_id.clone(),
                    agent_id: agent.to_string(),
                    at_ms,
                    detail: detail.to_string(),
                },
            );
        }
        self.mark(&ack.revocation_id, BTreeSet::from([agent.to_string()]));
        Ok(())
    }

    /// The revocation's record and who has acknowledged it.
    pub async fn report(&self, id: &str) -> Result<Report, RevokeError> {
        let store = self.registry.store();
        let record = store.get_revocation(id).await.map_err(|e| match e {
            StoreError::NotFound { .. } => RevokeError::NotFound(format!(
                "no revocation {id}; `mayflyd revoke list` shows them"
            )),
            other => other.into(),
        })?;
        let scope: Scope = serde_json::from_str(&record.detail).unwrap_or_default();
        let serials = store
            .revocation_serials(id)
            .await?
            .into_iter()
            .map(|s| s.serial)
            .collect();
        let acks = store.revocation_acks(id).await?;
        let last = acks.iter().filter_map(|a| a.acked_at).max();
        Ok(Report {
            elapsed_ms: last.map(|at| (at - record.created_at).max(0)).unwrap_or(0),
            agents: acks
                .into_iter()
                .map(|a| AgentAck {
                    agent: a.agent_id,
                    acked_at: a.acked_at,
                    detail: a.detail,
                })
                .collect(),
            record,
            scope,
            serials,
        })
    }

    pub async fn list(&self, limit: i64) -> Result<Vec<Report>, RevokeError> {
        let mut out = Vec::new();
        for record in self.registry.store().list_revocations(limit).await? {
            out.push(self.report(&record.id).await?);
        }
        Ok(out)
    }

    /// What a reconnecting agent must apply before anything else: its unacknowledged
    /// revocations (without secret replacements, which the caller adds) and the deny list.
    pub async fn pending_for(
        &self,
        agent: &str,
    ) -> Result<(Vec<(v1::Revocation, Vec<String>)>, Vec<v1::RevokedSerial>), RevokeError> {
        let store = self.registry.store();
        let mut pending = Vec::new();
        for record in store.pending_revocations(agent).await? {
            let scope: Scope = serde_json::from_str(&record.detail).unwrap_or_default();
            let serials = store.revocation_serials(&record.id).await?;
            pending.push((message(&record, &scope, &serials), scope.secrets.clone()));
        }
        let deny = store
            .deny_list(unix(self.registry.now()))
            .await?
            .into_iter()
            .map(|s| v1::RevokedSerial {
                serial: s.serial,
                not_after: s.not_after,
            })
            .collect();
        Ok((pending, deny))
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
