//! Long-lived secrets and their rotation: where a secret's versions live (`SecretStore`:
//! AWS Secrets Manager, Vault/OpenBao KV v2, or Mayfly's own encrypted store), the system
//! that checks it (`Target`: PostgreSQL, MariaDB, or none), how new values are made, and
//! when rotations run.

pub mod aws;
pub mod engine;
pub mod generator;
pub mod local;
pub mod runtime;
pub mod schedule;
pub mod spec;
pub mod target;
pub mod vault;

use std::fmt;

use zeroize::Zeroizing;

/// A secret value. Never printed: Debug shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The value itself, for the few places that must hand it on (a store, a target).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(<{} bytes redacted>)", self.0.len())
    }
}

/// A credential as stored: which user it logs in as (for database targets) and its
/// password (or the opaque value, for `none` targets). Serialized as JSON
/// `{"username": …, "password": …}` in every store, like AWS's rotation templates.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: SecretValue,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

/// One version as a store reports it; never carries the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// The rotation token that created it (AWS VersionId / our version id).
    pub id: String,
    /// Any of "current", "previous", "pending".
    pub stages: Vec<String>,
    /// Unix seconds, when the store knows.
    pub created_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretStoreError {
    #[error("secret store unreachable: {0}")]
    Unreachable(String),
    #[error("secret store refused: {0}")]
    Refused(String),
    #[error("secret {0} does not exist in the store")]
    NotFound(String),
    #[error("version {0} does not exist in the store")]
    VersionNotFound(String),
    #[error("stored value is not a credential: {0}")]
    Malformed(String),
    #[error("a concurrent write changed the secret; retry")]
    Conflict,
    /// Another writer changed a secret Mayfly manages: what it saw, and what to do.
    #[error("{0}")]
    OtherWriter(String),
}

/// A value written outside Mayfly that became its current version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// The version id Mayfly gave it.
    pub token: String,
    /// Which version of what, written when: for the audit trail.
    pub detail: String,
}

/// Where a secret's versions live. Every method is idempotent: a rotation that crashed
/// after any call can make the same call again with the same token.
#[tonic::async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// Stores `value` as the pending version `token`. If `token` already exists, leaves it
    /// untouched (the first value written under a token wins).
    async fn put_pending(&self, token: &str, value: &Credential) -> Result<(), SecretStoreError>;
    /// The value of version `token`, whatever its stage.
    async fn get_version(&self, token: &str) -> Result<Option<Credential>, SecretStoreError>;
    /// The current version's id and value, if the secret has one.
    async fn get_current(&self) -> Result<Option<(String, Credential)>, SecretStoreError>;
    /// The previous version's id and value, if any.
    async fn get_previous(&self) -> Result<Option<(String, Credential)>, SecretStoreError>;
    /// Makes `token` current; the version that was current becomes previous; nothing is
    /// left pending. Calling it again once done changes nothing.
    async fn promote(&self, token: &str) -> Result<(), SecretStoreError>;
    /// Every version the store keeps, newest first, without values.
    async fn versions(&self) -> Result<Vec<VersionInfo>, SecretStoreError>;
    /// For a store where a secret can exist without Mayfly's markers (Vault KV written by
    /// hand or another tool): makes its newest value Mayfly's current version, if it has
    /// no current version yet. `None` when there is nothing to adopt. Stores whose current
    /// version needs no marker (AWS's AWSCURRENT) have nothing to do.
    async fn adopt(&self) -> Result<Option<Adopted>, SecretStoreError> {
        Ok(None)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("target unreachable: {0}")]
    Unreachable(String),
    #[error("target refused the change: {0}")]
    Refused(String),
    #[error("login with the new value failed: {0}")]
    LoginFailed(String),
    #[error("hook command failed: {0}")]
    Hook(String),
}

/// The system that checks a secret. `set` and `test` are idempotent.
#[tonic::async_trait]
pub trait Target: Send + Sync + 'static {
    /// Makes `credential` valid for logging in (ALTER ROLE … PASSWORD …, or a hook).
    async fn set(&self, credential: &Credential) -> Result<(), TargetError>;
    /// Logs in with `credential`, proving it works.
    async fn test(&self, credential: &Credential) -> Result<(), TargetError>;
}
