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
    /// Without the secrets' replacement values: each stream adds those for its agent.
    pub message: mayfly_proto::v1::Revocation,
    /// The secrets whose old value was revoked.
    pub secrets: Vec<String>,
    /// The agents that must apply and acknowledge it.
    pub agents: std::collections::BTreeSet<String>,
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
    entries: watch::Sender<Arc<HashMap<String, Arc<EntryRecord>>>>,
    changes: broadcast::Sender<Change>,
    // Agents seen recently, so each node API call need not read the store. Every change made
    // through this daemon drops the agent's line at once; a change made by another daemon
    // sharing the store is seen within AGENT_CACHE_TTL.
    agent_cache: Mutex<HashMap<String, (AgentRecord, Instant)>>,
    // Set when the daemon stops, so long-lived streams end and shutdown can finish.
    closing: watch::Sender<bool>,
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
        let index = all
            .into_iter()
            .map(|e| (e.id.clone(), Arc::new(e)))
            .collect::<HashMap<_, _>>();
        let (entries, _) = watch::channel(Arc::new(index));
        let (changes, _) = broadcast::channel(4096);
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
            closing: watch::channel(false).0,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
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

    /// Entries whose parent is `agent`, from the in-memory index.
    pub fn entries_for(&self, agent: &str) -> Vec<Arc<EntryRecord>> {
        let mut list: Vec<_> = self
            .entries
            .borrow()
            .values()
            .filter(|e| e.parent_id == agent)
            .cloned()
            .collect();
        list.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id).then(a.id.cmp(&b.id)));
        list
    }

    pub fn default_jwt_ttl(&self) -> Duration {
        self.default_jwt_ttl
    }

    // ----- entries -----

    pub async fn create_entry(&self, input: EntryInput) -> Result<EntryRecord, IdentityError> {
        let new = self.check_entry_input(input)?;
        let record = self.store.create_entry(&new, unix(self.now())).await?;
        self.publish_upsert(record.clone());
        Ok(record)
    }

    pub async fn update_entry(
        &self,
        id: &str,
        change: EntryChange,
    ) -> Result<EntryRecord, IdentityError> {
        let before = self.store.get_entry(id).await?;
        let update = self.check_entry_change(change)?;
        let after = self
            .store
            .update_entry(id, &update, unix(self.now()))
            .await?;
        if before.parent_id != after.parent_id {
            // The old parent must drop it; the new one gets it as an upsert.
            let _ = self.changes.send(Change::EntryDeleted {
                id: before.id.clone(),
                parent_id: before.parent_id.clone(),
            });
        }
        self.publish_upsert(after.clone());
        Ok(after)
    }

    pub async fn delete_entry(&self, id: &str) -> Result<EntryRecord, IdentityError> {
        let deleted = self.store.delete_entry(id).await?;
        self.entries.send_modify(|index| {
            let mut next = HashMap::clone(index);
            next.remove(&deleted.id);
            *index = Arc::new(next);
        });
        let _ = self.changes.send(Change::EntryDeleted {
            id: deleted.id.clone(),
            parent_id: deleted.parent_id.clone(),
        });
        Ok(deleted)
    }

    /// Drops entries a revocation deleted from the in-memory index. Agents hear of it
    /// through the revocation itself (which also says to remove their files), not as
    /// ordinary deletions.
    pub fn forget_revoked_entries(&self, ids: &[String]) {
        self.entries.send_modify(|index| {
            let mut next = HashMap::clone(index);
            for id in ids {
                next.remove(id);
            }
            *index = Arc::new(next);
        });
    }

    /// Pushes a revocation to the sync streams of the agents it names.
    pub fn publish_revocation(&self, notice: RevocationNotice) {
        let _ = self.changes.send(Change::Revoked(Arc::new(notice)));
    }

    /// Of `specs`, the secrets granted to `agent` itself or to a SPIFFE ID it serves,
    /// with the IDs each goes to.
    pub fn granted(
        &self,
        specs: &[crate::secrets::spec::SecretSpec],
        agent: &str,
    ) -> Vec<(String, Vec<String>)> {
        let ids: std::collections::BTreeSet<String> = self
            .entries_for(agent)
            .iter()
            .map(|e| e.spiffe_id.clone())
            .collect();
        specs
            .iter()
            .filter_map(|spec| {
                let to: Vec<String> = spec
                    .grants
                    .iter()
                    .filter(|g| ids.contains(*g) || g.as_str() == agent)
                    .cloned()
                    .collect();
                (!to.is_empty()).then(|| (spec.name.clone(), to))
            })
            .collect()
    }

    pub async fn get_entry(&self, id: &str) -> Result<EntryRecord, IdentityError> {
        Ok(self.store.get_entry(id).await?)
    }

    pub async fn list_entries(
        &self,
        filter: &EntryFilter,
    ) -> Result<Vec<EntryRecord>, IdentityError> {
        Ok(self.store.list_entries(filter).await?)
    }

    fn publish_upsert(&self, record: EntryRecord) {
        let record = Arc::new(record);
        self.entries.send_modify(|index| {
            let mut next = HashMap::clone(index);
            next.insert(record.id.clone(), record.clone());
            *index = Arc::new(next);
        });
        let _ = self.changes.send(Change::EntryUpserted(record));
    }

    fn check_entry_input(&self, input: EntryInput) -> Result<NewEntry, IdentityError> {
        let spiffe_id = self.workload_id("spiffe_id", &input.spiffe_id)?;
        let parent_id = self.member_id("parent_id", &input.parent_id)?;
        let selectors = check_selectors(&input.selectors)?;
        if selectors.is_empty() {
            return Err(invalid(
                "selectors",
                "an entry needs at least one selector, e.g. unix:uid:1000",
            ));
        }
        Ok(NewEntry {
            spiffe_id: spiffe_id.to_string(),
            parent_id: parent_id.to_string(),
            selectors,
            x509_svid_ttl: check_ttl("x509_svid_ttl", input.x509_svid_ttl)?,
            jwt_svid_ttl: check_ttl("jwt_svid_ttl", input.jwt_svid_ttl)?,
            dns_names: check_dns_names(&input.dns_names)?,
            hint: check_hint(&input.hint)?,
        })
    }

    fn check_entry_change(&self, change: EntryChange) -> Result<EntryUpdate, IdentityError> {
        Ok(EntryUpdate {
            spiffe_id: change
                .spiffe_id
                .map(|s| self.workload_id("spiffe_id", &s).map(|id| id.to_string()))
                .transpose()?,
            parent_id: change
                .parent_id
                .map(|s| self.member_id("parent_id", &s).map(|id| id.to_string()))
                .transpose()?,
            selectors: match change.selectors {
                Some(list) if !list.is_empty() => Some(check_selectors(&list)?),
                _ => None,
            },
            x509_svid_ttl: change
                .x509_svid_ttl
                .map(|t| check_ttl("x509_svid_ttl", t))
                .transpose()?,
            jwt_svid_ttl: change
                .jwt_svid_ttl
                .map(|t| check_ttl("jwt_svid_ttl", t))
                .transpose()?,
            dns_names: change.dns_names.map(|d| check_dns_names(&d)).transpose()?,
            hint: change.hint.map(|h| check_hint(&h)).transpose()?,
        })
    }

    fn member_id(&self, field: &'static str, text: &str) -> Result<SpiffeId, IdentityError> {
        let id = SpiffeId::parse(text).map_err(|e| invalid(field, e.to_string()))?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(invalid(
                field,
                format!(
                    "{id} is not in this daemon's trust domain {}",
                    self.trust_domain
                ),
            ));
        }
        Ok(id)
    }

    fn workload_id(&self, field: &'static str, text: &str) -> Result<SpiffeId, IdentityError> {
        let id = self.member_id(field, text)?;
        if !id.has_path() {
            return Err(invalid(
                field,
                "a workload SPIFFE ID needs a path, e.g. spiffe://example.org/web",
            ));
        }
        Ok(id)
    }

    // ----- join tokens and agents -----

    pub async fn generate_join_token(
        &self,
        spiffe_id: &str,
        ttl: Option<Duration>,
    ) -> Result<IssuedJoinToken, IdentityError> {
        let spiffe_id = self.workload_id("spiffe_id", spiffe_id)?;
        let ttl = ttl.unwrap_or(self.join_token_ttl);
        if ttl.is_zero() || ttl > Duration::from_secs(30 * 24 * 3600) {
            return Err(invalid("ttl", "a join token lives between 1 s and 30 days"));
        }
        let mut raw = [0u8; 32];
        rand::fill(&mut raw);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let now = unix(self.now());
        let expires_at = now + ttl.as_secs() as i64;
        self.store
            .create_join_token(&token_hash(&token), spiffe_id.as_str(), expires_at, now)
            .await?;
        Ok(IssuedJoinToken {
            token,
            spiffe_id,
            expires_at,
        })
    }

    /// Trades a join token and a CSR for the agent's SVID. Nothing is written unless the
    /// token is valid and the CSR is acceptable.
    pub async fn attest(&self, token: &str, csr: &[u8]) -> Result<AgentSvid, IdentityError> {
        let hash = token_hash(token);
        let now = self.now();
        let pending = self.store.get_join_token(&hash, unix(now)).await?;
        let spiffe_id = self.member_id("join token", &pending.spiffe_id)?;
        if let Some(existing) = self.store.get_agent(spiffe_id.as_str()).await?
            && existing.status == AgentStatus::Banned
        {
            return Err(IdentityError::AgentBanned(spiffe_id.to_string()));
        }
        let signed = self.sign_agent(&spiffe_id, csr, now)?;
        let token_record = self.store.consume_join_token(&hash, unix(now)).await?;
        self.store
            .upsert_attested_agent(&AgentRecord {
                spiffe_id: spiffe_id.to_string(),
                serial: signed.serial.clone(),
                status: AgentStatus::Active,
                attested_at: unix(now),
                svid_expires_at: signed.expires_at,
                last_seen: unix(now),
                token_hash: token_record.hash,
            })
            .await?;
        self.forget_agent(spiffe_id.as_str());
        tracing::info!(agent = %spiffe_id, serial = %signed.serial, "agent attested");
        Ok(signed)
    }

    /// Checks the client certificate of a node API call against the store.
    pub async fn authenticate_agent(
        &self,
        peer: &mayfly_common::tls::PeerIdentity,
    ) -> Result<AgentRecord, IdentityError> {
        self.authenticate(peer, false).await
    }

    /// As [`Self::authenticate_agent`], but a banned agent still holding its last SVID
    /// passes: it may report what it did about its own revocation, nothing else.
    pub async fn authenticate_banned_agent(
        &self,
        peer: &mayfly_common::tls::PeerIdentity,
    ) -> Result<AgentRecord, IdentityError> {
        self.authenticate(peer, true).await
    }

    async fn authenticate(
        &self,
        peer: &mayfly_common::tls::PeerIdentity,
        banned_ok: bool,
    ) -> Result<AgentRecord, IdentityError> {
        let id = peer.spiffe_id.as_str();
        let agent = match self.cached_agent(id) {
            Some(agent) => agent,
            None => {
                let agent = self
                    .store
                    .get_agent(id)
                    .await?
                    .ok_or_else(|| IdentityError::UnknownAgent(id.to_string()))?;
                self.agent_cache()
                    .insert(id.to_string(), (agent.clone(), Instant::now()));
                agent
            }
        };
        match agent.status {
            AgentStatus::Active => {}
            AgentStatus::Evicted => return Err(IdentityError::AgentEvicted(id.to_string())),
            AgentStatus::Banned if banned_ok => {}
            AgentStatus::Banned => return Err(IdentityError::AgentBanned(id.to_string())),
        }
        if agent.serial != peer.serial {
            return Err(IdentityError::StaleAgentSvid {
                agent: id.to_string(),
                presented: peer.serial.clone(),
            });
        }
        Ok(agent)
    }

    fn agent_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (AgentRecord, Instant)>> {
        self.agent_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cached_agent(&self, id: &str) -> Option<AgentRecord> {
        let cache = self.agent_cache();
        cache
            .get(id)
            .filter(|(_, at)| at.elapsed() < AGENT_CACHE_TTL)
            .map(|(agent, _)| agent.clone())
    }

    fn forget_agent(&self, id: &str) {
        self.agent_cache().remove(id);
    }

    pub async fn renew_agent(
        &self,
        agent: &AgentRecord,
        csr: &[u8],
    ) -> Result<AgentSvid, IdentityError> {
        let spiffe_id = self.member_id("agent", &agent.spiffe_id)?;
        let now = self.now();
        let signed = self.sign_agent(&spiffe_id, csr, now)?;
        self.store
            .update_agent_svid(spiffe_id.as_str(), &signed.serial, signed.expires_at)
            .await?;
        self.forget_agent(spiffe_id.as_str());
        Ok(signed)
    }

    pub async fn set_agent_status(
        &self,
        spiffe_id: &str,
        status: AgentStatus,
        reason: &str,
    ) -> Result<AgentRecord, IdentityError> {
        let id = self.member_id("spiffe_id", spiffe_id)?;
        let record = self
            .store
            .set_agent_status(id.as_str(), status)
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => IdentityError::UnknownAgent(id.to_string()),
                other => other.into(),
            })?;
        self.forget_agent(id.as_str());
        let _ = self.changes.send(Change::AgentEvicted {
            spiffe_id: id.to_string(),
            banned: status == AgentStatus::Banned,
            reason: reason.to_string(),
        });
        Ok(record)
    }

    fn sign_agent(
        &self,
        spiffe_id: &SpiffeId,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<AgentSvid, IdentityError> {
        let authorities = self.ca.current();
        let issued = authorities
            .x509
            .sign_svid(
                csr,
                &SvidRequest {
                    spiffe_id: spiffe_id.as_str(),
                    dns_names: &[],
                    ip_addresses: &[],
                    ttl: self.agent_ttl,
                },
                now,
            )
            .map_err(|source| IdentityError::Csr {
                entry: "agent".into(),
                source,
            })?;
        Ok(AgentSvid {
            spiffe_id: spiffe_id.clone(),
            chain: vec![issued.cert_der.clone()],
            serial: issued.serial_hex.clone(),
            expires_at: issued.not_after,
        })
    }

    // ----- workload SVIDs -----

    /// Signs each CSR for its entry. The whole batch is refused if any entry is not the
    /// caller's or any CSR is unacceptable, so a caller never gets a partial answer.
    pub fn sign_batch(
        &self,
        agent: &str,
        csrs: &[(String, Vec<u8>)],
    ) -> Result<Vec<SignedSvid>, IdentityError> {
        if csrs.len() > self.max_batch {
            return Err(IdentityError::BatchTooLarge {
                max: self.max_batch,
                got: csrs.len(),
            });
        }
        let index = self.entries.borrow().clone();
        let authorities = self.ca.current();
        let now = self.now();
        let mut out = Vec::with_capacity(csrs.len());
        for (entry_id, csr) in csrs {
            let entry = index
                .get(entry_id)
                .ok_or_else(|| IdentityError::EntryNotFound(entry_id.clone()))?;
            if entry.parent_id != agent {
                return Err(IdentityError::EntryNotYours {
                    entry: entry_id.clone(),
                    agent: agent.to_string(),
                });
            }
            let ttl = match entry.x509_svid_ttl {
                t if t > 0 => Duration::from_secs(t as u64),
                _ => self.default_x509_ttl,
            };
            let issued = authorities
                .x509
                .sign_svid(
                    csr,
                    &SvidRequest {
                        spiffe_id: &entry.spiffe_id,
                        dns_names: &entry.dns_names,
                        ip_addresses: &[],
                        ttl,
                    },
                    now,
                )
                .map_err(|source| IdentityError::Csr {
                    entry: entry_id.clone(),
                    source,
                })?;
            out.push(SignedSvid {
                entry_id: entry.id.clone(),
                spiffe_id: entry.spiffe_id.clone(),
                chain: vec![issued.cert_der.clone()],
                issued,
            });
        }
        Ok(out)
    }

    /// Mints a JWT-SVID for one of the caller's entries.
    pub fn mint_jwt(
        &self,
        agent: &str,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, String, i64), IdentityError> {
        if audience.is_empty() || audience.iter().any(|a| a.is_empty()) {
            return Err(invalid(
                "audience",
                "at least one non-empty audience is required",
            ));
        }
        let index = self.entries.borrow().clone();
        let entry = index
            .get(entry_id)
            .ok_or_else(|| IdentityError::EntryNotFound(entry_id.to_string()))?;
        if entry.parent_id != agent {
            return Err(IdentityError::EntryNotYours {
                entry: entry_id.to_string(),
                agent: agent.to_string(),
            });
        }
        let ttl = match entry.jwt_svid_ttl {
            t if t > 0 => Duration::from_secs(t as u64),
            _ => self.default_jwt_ttl,
        };
        let now = self.now();
        let token = self
            .ca
            .current()
            .jwt
            .sign(&entry.spiffe_id, audience, ttl, now)
            .map_err(IdentityError::Signing)?;
        Ok((
            entry.spiffe_id.clone(),
            token,
            unix(now) + ttl.as_secs() as i64,
        ))
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

fn check_hint(hint: &str) -> Result<String, IdentityError> {
    if hint.len() > 256 || hint.chars().any(char::is_control) {
        return Err(invalid(
            "hint",
            "at most 256 characters, no control characters",
        ));
    }
    Ok(hint.to_string())
}
