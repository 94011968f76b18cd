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

mod grant;
pub mod postgres;
pub mod spec;
pub mod sts;
mod sweep;
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
    /// The definition as the agent's policies see it, narrowed to the holder.
    pub facts: mayfly_proto::v1::CredentialFacts,
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
        elevation: &str,
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
            Backend::Sts(sts) => sts.issue(backend_id, holder, ttl_secs, elevation).await,
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

    /// Every definition, read and opened in one pass (no backend is built): what the
    /// blast-radius report decides over.
    pub async fn specs(&self) -> Result<Vec<Arc<CredentialSpec>>, CredsError> {
        let mut specs = Vec::new();
        for record in self.store.list_credentials().await? {
            let cached = self.lock().get(&record.name).cloned();
            if let Some(loaded) = cached
                && loaded.sealed == record.spec_sealed
            {
                specs.push(loaded.spec.clone());
                continue;
            }
            let json = self
                .key
                .open(&Self::sealing_context(&record.name), &record.spec_sealed)
                .map_err(|e| CredsError::Internal(format!("credential {}: {e}", record.name)))?;
            let spec: CredentialSpec = serde_json::from_slice(&json)
                .map_err(|e| CredsError::Internal(format!("credential {}: {e}", record.name)))?;
            specs.push(Arc::new(spec));
        }
        Ok(specs)
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
}
