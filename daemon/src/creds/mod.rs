//! TTL-bound credentials: definitions (daemon.toml's `[[credential]]` or the admin API),
//! the broker that issues one to a workload an agent serves when a grant allows it, and the
//! sweeper that revokes each lease at the backend when it expires. Every issue, refusal and
//! revocation is an audit record; the lease row is written before the backend is asked, so
//! a crash at any point leaves a lease the sweeper finds.
//!
//! Backends: `postgres.rs` (Mayfly's own dynamic PostgreSQL users), `vault.rs` (a
//! Vault/OpenBao dynamic secrets role, with its leases) and `sts.rs` (AWS STS role
//! sessions).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mayfly_common::clock::{Clock, unix};

use crate::audit::{Actor, Audit, Event};
use crate::policy::PolicyDecision;
use crate::secrets::SecretValue;
use crate::secrets::local::SealingKey;
use crate::store::{CredentialLease, CredentialRecord, LeaseFilter, LeaseState, Store, StoreError};
use crate::visibility::{CredentialRefusal, Visibility};

pub mod postgres;
pub mod spec;
pub mod sts;
pub mod vault;

use spec::{BackendSpec, CredentialSpec, CredentialSpecError};

/// How often the sweeper looks for expired leases; the issue's promise is revocation at
/// the backend within 30 s of expiry. `MAYFLY_LEASE_SWEEP_MS` shortens it for tests.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A lease still `issuing` after this long lost its daemon mid-issue: revoke it.
const STALE_ISSUING_SECS: i64 = 120;

/// Leases revoked per sweep, at most; the next sweep takes the rest at once.
const SWEEP_BATCH: i64 = 500;

/// Revocations in flight at once: a backend's pool (PostgreSQL: 4 connections) bounds
/// the real parallelism.
const REVOKE_CONCURRENCY: usize = 8;

/// What a backend issued: its own name for it (kept on the lease) and the values for the
/// workload (never stored).
pub struct Issued {
    pub backend_id: String,
    pub values: Vec<(String, SecretValue)>,
}

/// A credential handed to a workload, as the node API returns it.
pub struct Granted {
    pub lease: CredentialLease,
    pub kind: &'static str,
    pub values: Vec<(String, SecretValue)>,
    pub notice: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    #[error("the backend is not reachable: {0}")]
    Unavailable(String),
    #[error("the backend refused: {0}")]
    Refused(String),
    #[error("the backend is misconfigured: {0}")]
    Config(String),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredsError {
    #[error("no credential named `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Spec(#[from] CredentialSpecError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A lease that cannot be extended: the holder asks for a new one.
    #[error("{0}; ask for a new one")]
    NotRenewable(String),
    #[error("credential `{0}` is defined in daemon.toml; change it there")]
    FromConfig(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

enum Backend {
    Postgres(postgres::PostgresDynamic),
    Vault(Box<vault::VaultDynamic>),
    Sts(Box<sts::AwsSts>),
}

impl Backend {
    async fn build(spec: &CredentialSpec, trust_domain: &str) -> Result<Self, BackendError> {
        match &spec.backend {
            BackendSpec::PostgresDynamic {
                admin_url,
                creation,
                username_prefix,
            } => Ok(Backend::Postgres(postgres::PostgresDynamic::new(
                &SecretValue::new(admin_url.clone()),
                creation.clone(),
                username_prefix.clone(),
            )?)),
            BackendSpec::VaultDynamic {
                address,
                mount,
                role,
                token,
                approle,
                ca_cert,
            } => {
                let login = match (token, approle) {
                    (Some(token), _) => vault::VaultLogin::Token(SecretValue::new(token.clone())),
                    (None, Some(approle)) => vault::VaultLogin::AppRole {
                        role_id: approle.role_id.clone(),
                        secret_id: SecretValue::new(approle.secret_id.clone()),
                        mount: approle.mount.clone(),
                    },
                    (None, None) => {
                        return Err(BackendError::Config(
                            "no token or approle to log in to Vault".into(),
                        ));
                    }
                };
                let pem = match ca_cert {
                    Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                        BackendError::Config(format!("ca_cert {}: {e}", path.display()))
                    })?),
                    None => None,
                };
                Ok(Backend::Vault(Box::new(vault::VaultDynamic::new(
                    address,
                    mount,
                    role,
                    login,
                    pem.as_deref(),
                )?)))
            }
            BackendSpec::AwsSts {
                role_arn,
                region,
                endpoint_url,
                policy,
            } => Ok(Backend::Sts(Box::new(
                sts::AwsSts::new(
                    role_arn,
                    region,
                    endpoint_url.as_deref(),
                    policy.clone(),
                    trust_domain,
                )
                .await?,
            ))),
        }
    }

    /// Whether revoking ends the credential at the backend; an STS session cannot be
    /// ended early, so revoking one only drops Mayfly's copies.
    fn revocable(&self) -> bool {
        !matches!(self, Backend::Sts(_))
    }

    /// The backend's name for a lease's credential when it can be fixed before issuing, so
    /// that a lease recorded but never issued can still be cleaned up. Vault names its
    /// leases itself: one lost between Vault's answer and our record ends at the role's TTL.
    fn backend_id(&self, lease_id: &str) -> String {
        match self {
            Backend::Postgres(pg) => pg.role_name(lease_id),
            Backend::Vault(_) => String::new(),
            // The session name is the lease id; STS's own id for it comes with the answer.
            Backend::Sts(_) => lease_id.to_string(),
        }
    }

    /// Issues for `ttl_secs` from `issued_at`; returns what was issued and its expiry.
    async fn issue(
        &self,
        backend_id: &str,
        holder: &str,
        issued_at: i64,
        ttl_secs: i64,
    ) -> Result<(Issued, i64), BackendError> {
        match self {
            Backend::Postgres(pg) => {
                let expires_at = issued_at + ttl_secs;
                Ok((pg.issue(backend_id, expires_at).await?, expires_at))
            }
            Backend::Vault(vault) => {
                let (issued, duration) = vault.issue(ttl_secs).await?;
                Ok((issued, issued_at + duration))
            }
            Backend::Sts(sts) => sts.issue(backend_id, holder, ttl_secs).await,
        }
    }

    /// Extends the credential to `expires_at`, renewed at `now`; returns the expiry the
    /// backend granted, or `None` where a credential cannot be extended (STS).
    async fn extend(
        &self,
        backend_id: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<Option<i64>, BackendError> {
        match self {
            Backend::Postgres(pg) => {
                pg.extend(backend_id, expires_at).await?;
                Ok(Some(expires_at))
            }
            Backend::Vault(vault) => {
                Ok(Some(now + vault.renew(backend_id, expires_at - now).await?))
            }
            Backend::Sts(_) => Ok(None),
        }
    }

    async fn revoke(&self, backend_id: &str) -> Result<(), BackendError> {
        match self {
            Backend::Postgres(pg) => pg.revoke(backend_id).await,
            Backend::Vault(vault) => vault.revoke(backend_id).await,
            Backend::Sts(_) => Ok(()),
        }
    }
}

struct Loaded {
    sealed: Vec<u8>,
    spec: Arc<CredentialSpec>,
    backend: Arc<Backend>,
}

pub struct Broker {
    store: Store,
    key: Arc<SealingKey>,
    view: Visibility,
    audit: Audit,
    clock: Arc<dyn Clock>,
    /// Named on what backends issue (STS session tags).
    trust_domain: String,
    loaded: Mutex<HashMap<String, Arc<Loaded>>>,
}

impl Broker {
    /// Stores daemon.toml's definitions (replacing their stored copies) and starts the
    /// sweeper, which also finishes what a previous run of the daemon left due.
    pub async fn start(
        store: Store,
        key: Arc<SealingKey>,
        configured: &[CredentialSpec],
        view: Visibility,
        audit: Audit,
        clock: Arc<dyn Clock>,
        trust_domain: &str,
    ) -> Result<Arc<Self>, CredsError> {
        let broker = Arc::new(Self {
            store,
            key,
            view,
            audit,
            clock,
            trust_domain: trust_domain.to_string(),
            loaded: Mutex::new(HashMap::new()),
        });
        for spec in configured {
            spec.check()?;
            broker.save(spec, "config").await?;
        }
        let sweeper = broker.clone();
        tokio::spawn(async move { sweeper.sweep_loop().await });
        Ok(broker)
    }

    fn now(&self) -> i64 {
        unix(self.clock.now())
    }

    fn sealing_context(name: &str) -> String {
        format!("mayfly-credential\0{name}")
    }

    async fn save(&self, spec: &CredentialSpec, source: &str) -> Result<(), CredsError> {
        let json = serde_json::to_vec(spec).map_err(|e| CredsError::Internal(e.to_string()))?;
        let sealed = self
            .key
            .seal(&Self::sealing_context(&spec.name), &json)
            .map_err(|e| CredsError::Internal(e.to_string()))?;
        let now = self.now();
        let created_at = match self.store.get_credential(&spec.name).await {
            Ok(existing) => existing.created_at,
            Err(_) => now,
        };
        self.store
            .upsert_credential(&CredentialRecord {
                name: spec.name.clone(),
                spec_sealed: sealed,
                source: source.to_string(),
                created_at,
                updated_at: now,
            })
            .await?;
        Ok(())
    }

    /// The definition and its backend, built once per stored version (another daemon may
    /// change it: the sealed bytes tell).
    async fn load(&self, name: &str) -> Result<Arc<Loaded>, CredsError> {
        let record = match self.store.get_credential(name).await {
            Ok(record) => record,
            Err(StoreError::NotFound { .. }) => return Err(CredsError::NotFound(name.into())),
            Err(e) => return Err(e.into()),
        };
        let cached = self.lock().get(name).cloned();
        if let Some(loaded) = cached
            && loaded.sealed == record.spec_sealed
        {
            return Ok(loaded);
        }
        let json = self
            .key
            .open(&Self::sealing_context(name), &record.spec_sealed)
            .map_err(|e| CredsError::Internal(format!("credential {name}: {e}")))?;
        let spec: CredentialSpec = serde_json::from_slice(&json)
            .map_err(|e| CredsError::Internal(format!("credential {name}: {e}")))?;
        let loaded = Arc::new(Loaded {
            sealed: record.spec_sealed,
            backend: Arc::new(Backend::build(&spec, &self.trust_domain).await?),
            spec: Arc::new(spec),
        });
        self.lock().insert(name.to_string(), loaded.clone());
        Ok(loaded)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Loaded>>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- definitions, for operators -----

    pub async fn create(&self, spec: CredentialSpec) -> Result<(), CredsError> {
        spec.check()?;
        if let Ok(existing) = self.store.get_credential(&spec.name).await
            && existing.source == "config"
        {
            return Err(CredsError::FromConfig(spec.name));
        }
        Backend::build(&spec, &self.trust_domain).await?;
        self.save(&spec, "api").await
    }

    /// The definition, its source and how many of its leases are live.
    pub async fn describe(
        &self,
        name: &str,
    ) -> Result<(Arc<CredentialSpec>, String, i64), CredsError> {
        let loaded = self.load(name).await?;
        let record = self.store.get_credential(name).await?;
        let live = self.store.live_lease_count(name).await?;
        Ok((loaded.spec.clone(), record.source, live))
    }

    pub async fn names(&self) -> Result<Vec<String>, CredsError> {
        Ok(self
            .store
            .list_credentials()
            .await?
            .into_iter()
            .map(|r| r.name)
            .collect())
    }

    /// Deletes a definition defined through the API; refused while it has live leases.
    pub async fn delete(&self, name: &str) -> Result<(), CredsError> {
        let record = match self.store.get_credential(name).await {
            Ok(record) => record,
            Err(StoreError::NotFound { .. }) => return Err(CredsError::NotFound(name.into())),
            Err(e) => return Err(e.into()),
        };
        if record.source == "config" {
            return Err(CredsError::FromConfig(name.into()));
        }
        let live = self.store.live_lease_count(name).await?;
        if live > 0 {
            return Err(CredsError::Invalid(format!(
                "credential {name} has {live} live leases: revoke them first (mayflyd revoke credential {name})"
            )));
        }
        self.store.delete_credential(name).await?;
        self.lock().remove(name);
        Ok(())
    }

    pub async fn leases(&self, filter: &LeaseFilter) -> Result<Vec<CredentialLease>, CredsError> {
        Ok(self.store.list_credential_leases(filter).await?)
    }

    pub async fn lease(&self, id: &str) -> Result<CredentialLease, CredsError> {
        match self.store.get_credential_lease(id).await {
            Ok(lease) => Ok(lease),
            Err(StoreError::NotFound { .. }) => {
                Err(CredsError::Invalid(format!("no lease with id {id}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    // ----- issuing -----

    /// Issues credential `name` to `holder`, a workload `agent` serves, for `requested`
    /// (zero: the default). Refused, with an audit record and nothing issued, unless the
    /// definition grants it to `holder` and `agent` has an entry for `holder`.
    pub async fn issue(
        &self,
        agent: &str,
        holder: &str,
        name: &str,
        requested: Duration,
    ) -> Result<Granted, CredsError> {
        let actor = Actor::Spiffe(agent.to_string());
        let refuse = |why: String| {
            self.audit.note_refusal(
                Event::new(&actor, "credential.issue", name)
                    .scope(format!("for {holder}"))
                    .denied(why.clone()),
            );
            CredsError::Denied(why)
        };
        let loaded = match self.load(name).await {
            Ok(loaded) => loaded,
            Err(CredsError::NotFound(_)) => {
                return Err(refuse(format!("no credential named `{name}`")));
            }
            Err(e) => return Err(e),
        };
        let decision = match self.view.credential_decision(
            agent,
            holder,
            &loaded.spec,
            requested.as_secs() as i64,
            "IssueCredential",
        ) {
            Ok(decision) => decision,
            Err(CredentialRefusal::Unserved(why)) => return Err(refuse(why)),
            // On the trail already, with the deciding policies.
            Err(CredentialRefusal::Policy(why)) => {
                return Err(CredsError::Denied(format!(
                    "credential {name} for {holder}: {why}"
                )));
            }
        };
        let (ttl, notice) = loaded.spec.ttl_for(requested);
        let issued_at = self.now();
        let expires_at = issued_at + ttl.as_secs() as i64;
        let id = format!("ls-{}", &uuid::Uuid::new_v4().simple().to_string()[..20]);
        let mut lease = CredentialLease {
            backend_id: loaded.backend.backend_id(&id),
            id,
            credential: name.to_string(),
            holder: holder.to_string(),
            agent_id: agent.to_string(),
            issued_at,
            expires_at,
            state: LeaseState::Issuing,
            revoked_at: None,
            reason: String::new(),
        };
        // On record before the backend creates anything.
        self.store.insert_lease(&lease).await?;
        let (issued, expires_at) = match loaded
            .backend
            .issue(&lease.backend_id, holder, issued_at, expires_at - issued_at)
            .await
        {
            Ok(issued) => issued,
            Err(e) => {
                // It may have been half created: the sweeper cleans up what exists.
                let _ = self
                    .store
                    .set_lease_state(&lease.id, LeaseState::RevokeFailed, None, &e.to_string())
                    .await;
                self.audit.note(
                    Event::new(&actor, "credential.issue", name)
                        .scope(format!("lease {} for {holder}", lease.id))
                        .failed(e.to_string()),
                );
                return Err(e.into());
            }
        };
        let notice = match notice {
            None if expires_at < lease.expires_at => Some(format!(
                "the backend granted {} s, not the {} s asked",
                expires_at - issued_at,
                lease.expires_at - issued_at
            )),
            notice => notice,
        };
        lease.state = LeaseState::Active;
        lease.backend_id = issued.backend_id.clone();
        lease.expires_at = expires_at;
        self.store
            .activate_lease(&lease.id, &lease.backend_id, expires_at)
            .await?;
        self.record_grant(
            "credential.issue",
            &actor,
            &lease,
            expires_at - issued_at,
            &notice,
            &decision,
        )
        .await?;
        tracing::info!(lease = %lease.id, credential = %name, %holder, ttl_secs = expires_at - issued_at, "credential issued");
        Ok(Granted {
            kind: loaded.spec.kind(),
            lease,
            values: issued.values,
            notice,
        })
    }

    /// Extends lease `lease_id`, held by `agent`, for `requested` from now (zero: the
    /// default), up to the definition's max TTL from its issue. Refused, with an audit
    /// record, unless `agent` holds it, still serves its holder and the definition still
    /// grants it; `NotRenewable` when it is revoked, expired, at its max TTL or an STS
    /// session. Returns the lease as extended, when (unix seconds), and a notice when it
    /// got less than asked.
    pub async fn renew(
        &self,
        agent: &str,
        lease_id: &str,
        requested: Duration,
    ) -> Result<(CredentialLease, i64, Option<String>), CredsError> {
        let actor = Actor::Spiffe(agent.to_string());
        let refuse = |what: &str, why: String| {
            self.audit.note_refusal(
                Event::new(&actor, "credential.renew", what)
                    .scope(format!("lease {lease_id}"))
                    .denied(why.clone()),
            );
            CredsError::Denied(why)
        };
        let mut lease = match self.store.get_credential_lease(lease_id).await {
            Ok(lease) => lease,
            Err(StoreError::NotFound { .. }) => {
                return Err(refuse("", format!("no lease with id {lease_id}")));
            }
            Err(e) => return Err(e.into()),
        };
        if lease.agent_id != agent {
            return Err(refuse(
                &lease.credential,
                format!("lease {lease_id} is not held by agent {agent}"),
            ));
        }
        let now = self.now();
        if lease.state != LeaseState::Active || lease.expires_at <= now {
            return Err(CredsError::NotRenewable(format!(
                "lease {lease_id} is {}",
                if lease.state == LeaseState::Active {
                    "expired"
                } else {
                    lease.state.as_str()
                }
            )));
        }
        let loaded = self.load(&lease.credential).await?;
        let holder = lease.holder.clone();
        let decision = match self.view.credential_decision(
            agent,
            &holder,
            &loaded.spec,
            requested.as_secs() as i64,
            "RenewCredential",
        ) {
            Ok(decision) => decision,
            Err(CredentialRefusal::Unserved(why)) => return Err(refuse(&lease.credential, why)),
            Err(CredentialRefusal::Policy(why)) => {
                return Err(CredsError::Denied(format!(
                    "credential {} for {holder}: {why}",
                    lease.credential
                )));
            }
        };
        let (ttl, _) = loaded.spec.ttl_for(requested);
        let wanted = now + ttl.as_secs() as i64;
        let cap = lease.issued_at + loaded.spec.max().as_secs() as i64;
        let target = wanted.min(cap);
        if target <= lease.expires_at {
            // Never shortened: OpenBao would cut a lease renewed with less than it has.
            return Err(CredsError::NotRenewable(if cap <= lease.expires_at {
                format!(
                    "lease {lease_id} has reached the max TTL of credential {} ({})",
                    lease.credential,
                    humantime::format_duration(loaded.spec.max())
                )
            } else {
                format!(
                    "lease {lease_id} already lasts longer than the {} asked",
                    humantime::format_duration(ttl)
                )
            }));
        }
        let Some(expires_at) = loaded
            .backend
            .extend(&lease.backend_id, now, target)
            .await?
        else {
            return Err(CredsError::NotRenewable(format!(
                "lease {lease_id} is an STS session, which cannot be extended"
            )));
        };
        // The backend may grant less (Vault's role max); never record less than before.
        let expires_at = expires_at.max(lease.expires_at);
        if !self.store.extend_lease(lease_id, expires_at, now).await? {
            return Err(CredsError::NotRenewable(format!(
                "lease {lease_id} was revoked meanwhile"
            )));
        }
        let notice = (expires_at < wanted).then(|| {
            format!(
                "extended {} s, not the {} s asked: {}",
                expires_at - now,
                wanted - now,
                if target < wanted {
                    "the credential's max TTL"
                } else {
                    "the backend's limit"
                }
            )
        });
        self.record_grant(
            "credential.renew",
            &actor,
            &lease,
            expires_at - now,
            &notice,
            &decision,
        )
        .await?;
        tracing::info!(lease = %lease_id, credential = %lease.credential, %holder, ttl_secs = expires_at - now, "lease renewed");
        lease.expires_at = expires_at;
        Ok((lease, now, notice))
    }

    /// The audit record of a grant (`action`: an issue or a renewal) of `ttl_secs`,
    /// committed before the agent hears of it.
    async fn record_grant(
        &self,
        action: &str,
        actor: &Actor,
        lease: &CredentialLease,
        ttl_secs: i64,
        notice: &Option<String>,
        decision: &PolicyDecision,
    ) -> Result<(), CredsError> {
        let mut event = Event::new(actor, action, &lease.credential)
            .scope(format!(
                "lease {} for {} as {}",
                lease.id, lease.holder, lease.backend_id
            ))
            .ttl_secs(ttl_secs)
            .detail(serde_json::json!({
                "policy_set": decision.hash,
                "deciding": decision.policies,
            }));
        if let Some(notice) = notice {
            event = event.reason(notice.clone());
        }
        self.audit
            .record(event)
            .await
            .map(|_| ())
            .map_err(|e| CredsError::Internal(e.to_string()))
    }

    // ----- revoking -----

    /// Revokes a lease at its backend and records why; idempotent.
    pub async fn revoke_lease(
        &self,
        lease: &CredentialLease,
        actor: &Actor,
        why: &str,
    ) -> Result<(), CredsError> {
        if lease.state == LeaseState::Revoked {
            return Ok(());
        }
        let mut why = why.to_string();
        let outcome = match self.load(&lease.credential).await {
            // Recorded but never issued by a backend that names its own leases: nothing
            // there to revoke.
            Ok(_) if lease.backend_id.is_empty() => Ok(()),
            Ok(loaded) => {
                if !loaded.backend.revocable() {
                    why.push_str("; the STS session itself lasts until its expiry");
                }
                loaded
                    .backend
                    .revoke(&lease.backend_id)
                    .await
                    .map_err(CredsError::from)
            }
            Err(e) => Err(e),
        };
        let why = why.as_str();
        let now = self.now();
        let scope = format!(
            "lease {} of {} for {} as {}",
            lease.id, lease.credential, lease.holder, lease.backend_id
        );
        match outcome {
            Ok(()) => {
                self.store
                    .set_lease_state(&lease.id, LeaseState::Revoked, Some(now), why)
                    .await?;
                self.audit.note(
                    Event::new(actor, "lease.revoke", &lease.holder)
                        .scope(scope)
                        .reason(why),
                );
                tracing::info!(lease = %lease.id, credential = %lease.credential, %why, "lease revoked at the backend");
                Ok(())
            }
            Err(e) => {
                let reason = format!("{why}; revoking at the backend failed: {e}");
                self.store
                    .set_lease_state(&lease.id, LeaseState::RevokeFailed, None, &reason)
                    .await?;
                self.audit.note_refusal(
                    Event::new(actor, "lease.revoke", &lease.holder)
                        .scope(scope)
                        .failed(e.to_string()),
                );
                tracing::warn!(lease = %lease.id, error = %e, "could not revoke a lease; the sweeper retries");
                Err(e)
            }
        }
    }

    /// Revokes the leases due now (expired, failed before, or stuck issuing); returns how
    /// many were revoked.
    pub async fn sweep(&self) -> Result<usize, CredsError> {
        let now = self.now();
        let due = self
            .store
            .leases_due(now, now - STALE_ISSUING_SECS, SWEEP_BATCH)
            .await?;
        Ok(self.revoke_many(due, &Actor::Daemon, None).await.0)
    }

    /// Revokes `leases`, several at once (each backend call waits on the network), with
    /// `why` or, without one, the reason each lease is due. Returns how many were revoked
    /// and the errors of those that were not.
    pub async fn revoke_many(
        &self,
        leases: Vec<CredentialLease>,
        actor: &Actor,
        why: Option<&str>,
    ) -> (usize, Vec<(String, CredsError)>) {
        use futures::StreamExt as _;
        let now = self.now();
        let outcomes: Vec<_> = futures::stream::iter(leases)
            .map(|lease| async move {
                let why = why.unwrap_or(match lease.state {
                    LeaseState::Issuing if lease.expires_at > now => "never finished issuing",
                    LeaseState::RevokeFailed => "retrying a failed revocation",
                    _ => "expired",
                });
                let outcome = self.revoke_lease(&lease, actor, why).await;
                (lease.id, outcome)
            })
            .buffer_unordered(REVOKE_CONCURRENCY)
            .collect()
            .await;
        let mut revoked = 0;
        let mut failed = Vec::new();
        for (id, outcome) in outcomes {
            match outcome {
                Ok(()) => revoked += 1,
                Err(e) => failed.push((id, e)),
            }
        }
        (revoked, failed)
    }

    async fn sweep_loop(self: Arc<Self>) {
        let interval = std::env::var("MAYFLY_LEASE_SWEEP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(SWEEP_INTERVAL);
        let mut timer = tokio::time::interval(interval);
        loop {
            timer.tick().await;
            loop {
                match self.sweep().await {
                    // A full batch: more may be due.
                    Ok(n) if n as i64 >= SWEEP_BATCH => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "lease sweep failed");
                        break;
                    }
                }
            }
        }
    }
}
