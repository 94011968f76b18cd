//! Who may hold which identity: registration entries, join tokens, agents, and the
//! signing decisions built on them. The node and admin APIs are thin layers over this.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use tokio::sync::{broadcast, watch};

use mayfly_common::{Selector, SpiffeId, TrustDomain};

use mayfly_common::clock::unix;

use crate::ca::manager::CaManager;
use crate::ca::{CaError, IssuedSvid, SvidRequest};
use crate::config::DaemonConfig;
use crate::store::{
    AgentRecord, AgentStatus, EntryFilter, EntryRecord, EntryUpdate, NewEntry, Store, StoreError,
};

mod agents;
mod attestation;
mod entries;
pub mod index;

pub use entries::MAX_ENTRY_BATCH;
mod signing;

/// A change agents must hear about, fanned out to every sync stream.
#[derive(Debug, Clone)]
pub enum Change {
    EntryUpserted(Arc<EntryRecord>),
    EntryDeleted {
        id: String,
        parent_id: String,
    },
    AgentEvicted {
        spiffe_id: String,
        banned: bool,
        reason: String,
    },
    /// An operator revocation, for the agents it names.
    Revoked(Arc<RevocationNotice>),
}

/// A revocation as the sync streams push it.
#[derive(Debug, Clone)]
pub struct RevocationNotice {
    /// Without the secrets' replacement values: each stream adds those its agent may hold.
    pub message: mayfly_proto::v1::Revocation,
    /// The new values of the secrets whose old value was revoked, read once for all.
    pub replacements: Vec<Arc<crate::secrets::engine::Promoted>>,
    /// The agents that must apply and acknowledge it.
    pub agents: std::collections::BTreeSet<String>,
    /// What of `message` each agent is sent.
    pub shares: crate::revoke::Shares,
}

pub use mayfly_common::clock::{Clock, SystemClock};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("entry {0} does not exist")]
    EntryNotFound(String),
    #[error("entry {entry} is not assigned to agent {agent}")]
    EntryNotYours { entry: String, agent: String },
    #[error("a batch may carry at most {max} CSRs; this one has {got}")]
    BatchTooLarge { max: usize, got: usize },
    #[error("CSR for entry {entry}: {source}")]
    Csr { entry: String, source: CaError },
    #[error("join token is not valid: {0}")]
    JoinToken(String),
    #[error("agent {0} is not known; attest with a join token first")]
    UnknownAgent(String),
    #[error("agent {0} has been evicted; it must re-attest with a new join token")]
    AgentEvicted(String),
    #[error("agent {0} is banned")]
    AgentBanned(String),
    #[error("agent {agent} presented SVID serial {presented}, which is no longer its current one")]
    StaleAgentSvid { agent: String, presented: String },
    #[error(transparent)]
    Store(StoreError),
    #[error("signing failed: {0}")]
    Signing(CaError),
    /// The policies denied it; the denial is already on the audit trail.
    #[error("{what}: {reason}")]
    PolicyDenied { what: String, reason: String },
    #[error("the policies do not load: {0}")]
    Policy(String),
}

impl From<StoreError> for IdentityError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { kind: "entry", id } => Self::EntryNotFound(id),
            StoreError::TokenUnknown => Self::JoinToken("unknown token".into()),
            StoreError::TokenExpired { .. } => Self::JoinToken("the token has expired".into()),
            StoreError::TokenAlreadyUsed { .. } => {
                Self::JoinToken("the token was already used".into())
            }
            StoreError::AgentBanned { spiffe_id } => Self::AgentBanned(spiffe_id),
            StoreError::AgentNotActive { spiffe_id, .. } => Self::AgentEvicted(spiffe_id),
            other => Self::Store(other),
        }
    }
}

/// A workload SVID just signed, with the entry it is for.
#[derive(Debug, Clone)]
pub struct SignedSvid {
    pub entry_id: String,
    pub spiffe_id: String,
    pub chain: Vec<Vec<u8>>,
    pub issued: IssuedSvid,
}

/// A freshly generated join token: the only time the token itself exists outside the agent.
pub struct IssuedJoinToken {
    pub token: String,
    pub spiffe_id: SpiffeId,
    pub expires_at: i64,
}

/// What an attested agent receives.
pub struct AgentSvid {
    pub spiffe_id: SpiffeId,
    pub chain: Vec<Vec<u8>>,
    pub serial: String,
    pub expires_at: i64,
}

pub struct Registry {
    store: Store,
    ca: Arc<CaManager>,
    trust_domain: TrustDomain,
    default_x509_ttl: Duration,
    default_jwt_ttl: Duration,
    agent_ttl: Duration,
    join_token_ttl: Duration,
    max_batch: usize,
    clock: Arc<dyn Clock>,
    entries: watch::Sender<crate::visibility::EntryIndex>,
    changes: broadcast::Sender<Change>,
    // Agents seen recently, so each node API call need not read the store. Every change made
    // through this daemon drops the agent's line at once; a change made by another daemon
    // sharing the store is seen within AGENT_CACHE_TTL.
    agent_cache: Mutex<HashMap<String, (AgentRecord, Instant)>>,
    // Agents another daemon evicted or banned whose streams here have been told (by
    // spiffe ID, with the status they were told of), so a catch-up tells each once.
    told_evicted: Mutex<HashMap<String, AgentStatus>>,
    // Set when the daemon stops, so long-lived streams end and shutdown can finish.
    closing: watch::Sender<bool>,
    /// Decides each signing and minting after the entry checks.
    policy: Arc<crate::policy::PolicyEngine>,
}

const AGENT_CACHE_TTL: Duration = Duration::from_secs(1);

impl Registry {
    pub async fn load(
        store: Store,
        ca: Arc<CaManager>,
        config: &DaemonConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, IdentityError> {
        let all = store.list_entries(&EntryFilter::default()).await?;
        let (entries, _) = watch::channel(Arc::new(index::Entries::new(all)));
        let (changes, _) = broadcast::channel(4096);
        let policy = crate::policy::PolicyEngine::load(
            crate::policy::PolicyConfig::default(),
            clock.clone(),
        )
        .map_err(|e| IdentityError::Policy(e.to_string()))?;
        Ok(Self {
            store,
            ca,
            trust_domain: config.trust_domain.clone(),
            default_x509_ttl: config.svid.x509_ttl,
            default_jwt_ttl: config.svid.jwt_ttl,
            agent_ttl: config.svid.agent_ttl,
            join_token_ttl: config.svid.join_token_ttl,
            max_batch: config.svid.max_csr_batch,
            clock,
            entries,
            changes,
            agent_cache: Mutex::new(HashMap::new()),
            told_evicted: Mutex::new(HashMap::new()),
            closing: watch::channel(false).0,
            policy: Arc::new(policy),
        })
    }

    /// Decides signing and minting with `policy` (the built-in policies until then).
    pub fn with_policy(mut self, policy: Arc<crate::policy::PolicyEngine>) -> Self {
        self.policy = policy;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The hash of the policy set deciding now, for the records of what it granted.
    pub fn policy_set(&self) -> String {
        self.policy.current().hash.clone()
    }

    pub fn ca(&self) -> &Arc<CaManager> {
        &self.ca
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Ends every sync stream; called once when the daemon shuts down.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub fn subscribe_changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// The in-memory entry index, as it changes (`crate::visibility` reads it).
    pub fn entries(&self) -> watch::Receiver<crate::visibility::EntryIndex> {
        self.entries.subscribe()
    }

    pub fn default_jwt_ttl(&self) -> Duration {
        self.default_jwt_ttl
    }

    // ----- entries -----

    /// Pushes a revocation to the sync streams of the agents it names.
    pub fn publish_revocation(&self, notice: RevocationNotice) {
        let _ = self.changes.send(Change::Revoked(Arc::new(notice)));
    }
}

/// What an operator supplies to create an entry, before validation.
#[derive(Debug, Clone, Default)]
pub struct EntryInput {
    pub spiffe_id: String,
    pub parent_id: String,
    pub selectors: Vec<String>,
    pub x509_svid_ttl: i64,
    pub jwt_svid_ttl: i64,
    pub dns_names: Vec<String>,
    pub hint: String,
    pub sets: Vec<String>,
    /// Unix seconds after which the entry signs nothing; 0 for never.
    pub expires_at: i64,
}

/// What an operator supplies to change an entry; `None` keeps the field.
#[derive(Debug, Clone, Default)]
pub struct EntryChange {
    pub spiffe_id: Option<String>,
    pub parent_id: Option<String>,
    pub selectors: Option<Vec<String>>,
    pub x509_svid_ttl: Option<i64>,
    pub jwt_svid_ttl: Option<i64>,
    pub dns_names: Option<Vec<String>>,
    pub hint: Option<String>,
    pub sets: Option<Vec<String>>,
}

/// Join tokens are stored only as their SHA-256.
pub fn token_hash(token: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ))
}

fn invalid(field: &'static str, message: impl Into<String>) -> IdentityError {
    IdentityError::InvalidArgument {
        field,
        message: message.into(),
    }
}

fn check_selectors(list: &[String]) -> Result<Vec<String>, IdentityError> {
    let mut parsed = list
        .iter()
        .map(|s| {
            Selector::parse(s)
                .map(|sel| sel.to_string())
                .map_err(|e| invalid("selectors", format!("`{s}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    parsed.sort();
    parsed.dedup();
    Ok(parsed)
}

fn check_ttl(field: &'static str, seconds: i64) -> Result<i64, IdentityError> {
    if !(0..=366 * 24 * 3600).contains(&seconds) {
        return Err(invalid(
            field,
            "must be between 0 (the daemon's default) and one year, in seconds",
        ));
    }
    Ok(seconds)
}

fn check_dns_names(names: &[String]) -> Result<Vec<String>, IdentityError> {
    for name in names {
        let ok = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
            });
        if !ok {
            return Err(invalid(
                "dns_names",
                format!("`{name}` is not a valid DNS name"),
            ));
        }
    }
    Ok(names.to_vec())
}

fn check_sets(sets: &[String]) -> Result<Vec<String>, IdentityError> {
    mayfly_common::policy::check_set_names(sets).map_err(|e| invalid("sets", e))
}

fn check_hint(hint: &str) -> Result<String, IdentityError> {
    if hint.len() > 256 || hint.chars().any(char::is_control) {
        return Err(invalid(
            "hint",
            "at most 256 characters, no control characters",
        ));
    }
    Ok(hint.to_string())
}
