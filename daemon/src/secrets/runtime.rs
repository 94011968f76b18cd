//! Turns a secret's definition into the live objects a rotation uses: its store client,
//! its target, and its parsed schedule.

use std::sync::Arc;
use std::time::Duration;

use super::aws::{AwsSecretsManagerStore, AwsStoreConfig};
use super::generator::PolicyError;
use super::local::{LocalStore, SealingKey};
use super::schedule::{Schedule, ScheduleError, Window};
use super::spec::{SecretSpec, SpecError, StoreSpec, TargetSpec};
use super::target::{
    CommandTarget, CommandTargetConfig, DEFAULT_HOOK_TIMEOUT, MysqlTarget, MysqlTargetConfig,
    PostgresTarget, PostgresTargetConfig,
};
use super::vault::{VaultAuth, VaultKvStore, VaultStoreConfig};
use super::{SecretStore, SecretStoreError, SecretValue, Target, TargetError};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("secret {0} does not exist")]
    UnknownSecret(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("secret definition: {0}")]
    Build(String),
    #[error("a rotation of {0} is already running")]
    Busy(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] SecretStoreError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("generating a value: {0}")]
    Generator(#[from] PolicyError),
    #[error("datastore: {0}")]
    Datastore(String),
    #[error("{0}")]
    Internal(String),
}

/// One secret, ready to rotate.
pub struct SecretRuntime {
    pub spec: SecretSpec,
    pub schedule: Schedule,
    pub store: Arc<dyn SecretStore>,
    pub target: Arc<dyn Target>,
}

impl SecretRuntime {
    pub async fn build(
        spec: SecretSpec,
        datastore: &Store,
        key: &Arc<SealingKey>,
    ) -> Result<Self, EngineError> {
        spec.check()?;
        let schedule = spec
            .parsed_schedule()
            .map_err(|e| EngineError::Build(e.to_string()))?;
        let store: Arc<dyn SecretStore> = match &spec.store {
            StoreSpec::Local => {
                Arc::new(LocalStore::new(datastore.clone(), key.clone(), &spec.name))
            }
            StoreSpec::Aws {
                secret_id,
                region,
                endpoint_url,
            } => Arc::new(
                AwsSecretsManagerStore::new(AwsStoreConfig {
                    secret_id: secret_id.clone(),
                    region: region.clone(),
                    endpoint_url: endpoint_url.clone(),
                })
                .await?,
            ),
            StoreSpec::Vault {
                address,
                mount,
                path,
                token,
                approle,
                ca_cert,
            } => {
                let auth = match (token, approle) {
                    (Some(token), _) => VaultAuth::Token(SecretValue::new(token.clone())),
                    (None, Some(role)) => VaultAuth::AppRole {
                        role_id: role.role_id.clone(),
                        secret_id: SecretValue::new(role.secret_id.clone()),
                        mount: role.mount.clone(),
                    },
                    (None, None) => {
                        return Err(EngineError::Build(
                            "vault store needs token or approle".into(),
                        ));
                    }
                };
                let ca_cert_pem = ca_cert
                    .as_ref()
                    .map(|p| {
                        std::fs::read_to_string(p).map_err(|e| {
                            EngineError::Build(format!("ca_cert {}: {e}", p.display()))
                        })
                    })
                    .transpose()?;
                Arc::new(VaultKvStore::new(VaultStoreConfig {
                    address: address.clone(),
                    mount: mount.clone(),
                    path: path.clone(),
                    auth,
                    ca_cert_pem,
                })?)
            }
        };
        let target: Arc<dyn Target> = match &spec.target {
            TargetSpec::Postgres {
                admin_url,
                login_url,
            } => Arc::new(
                PostgresTarget::new(PostgresTargetConfig {
                    admin_url: SecretValue::new(admin_url.clone()),
                    login_url: login_url
                        .clone()
                        .unwrap_or_else(|| without_credentials(admin_url)),
                })
                .map_err(|e| EngineError::Build(e.to_string()))?,
            ),
            TargetSpec::Mysql {
                admin_url,
                login_url,
                host,
            } => Arc::new(
                MysqlTarget::new(MysqlTargetConfig {
                    admin_url: SecretValue::new(admin_url.clone()),
                    login_url: login_url
                        .clone()
                        .unwrap_or_else(|| without_credentials(admin_url)),
                    user_host: Some(host.clone()),
                })
                .map_err(|e| EngineError::Build(e.to_string()))?,
            ),
            TargetSpec::None { hook, test } => Arc::new(
                CommandTarget::new(CommandTargetConfig {
                    set_command: Some(hook.clone()).filter(|c| !c.is_empty()),
                    test_command: Some(test.clone()).filter(|c| !c.is_empty()),
                    timeout: DEFAULT_HOOK_TIMEOUT,
                })
                .map_err(|e| EngineError::Build(e.to_string()))?,
            ),
        };
        Ok(Self {
            spec,
            schedule,
            store,
            target,
        })
    }
}

/// `scheme://user:pass@host:port/db` → `scheme://host:port/db`: the login test must not
/// borrow the admin's credentials.
fn without_credentials(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://{}", &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Parses a window from its definition; used by `SecretSpec::parsed_schedule`.
pub fn window(start: &str, duration: &str) -> Result<Window, ScheduleError> {
    let duration: Duration = humantime::parse_duration(duration)
        .map_err(|e| ScheduleError::Window(format!("duration `{duration}`: {e}")))?;
    Window::new(start, duration)
}
