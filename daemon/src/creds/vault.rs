//! `vault_dynamic`: a Vault or OpenBao dynamic secrets role (the database engine issuing
//! PostgreSQL users is the case we test; any engine whose `creds` endpoint returns a lease
//! works). Issuing reads `<mount>/creds/<role>` and at once renews the new lease to the
//! TTL Mayfly granted, so Vault's own expiry is Mayfly's (should the daemon be gone, Vault
//! still revokes on time); while the holder still asks, its agent renews the lease
//! (`sys/leases/renew`) up to the definition's max TTL; revoking is `sys/leases/revoke` with `sync`, which Vault answers
//! 204 for a lease it no longer knows, so it is idempotent.
//!
//! Which client does what: these calls go through Mayfly's own small Vault HTTP client
//! (`secrets/vault/client.rs`, shared with the KV v2 store), not vaultrs: vaultrs 0.8 drops
//! `lease_id` from dynamic credentials (its issue 144) and has no `sys/leases` calls, and
//! without the lease id nothing could be renewed or revoked.

use http::Method;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{BackendError, Issued};
use crate::secrets::vault::client::{Login, VaultHttp, status_error};
use crate::secrets::{SecretStoreError, SecretValue};

pub struct VaultDynamic {
    http: VaultHttp,
    login: Login,
    /// `/v1/<mount>/creds/<role>`.
    creds_path: String,
}

/// How the backend logs in; Debug never shows a token.
pub enum VaultLogin {
    Token(SecretValue),
    AppRole {
        role_id: String,
        secret_id: SecretValue,
        mount: String,
    },
}

impl VaultDynamic {
    pub fn new(
        address: &str,
        mount: &str,
        role: &str,
        login: VaultLogin,
        ca_cert_pem: Option<&str>,
    ) -> Result<Self, BackendError> {
        for (what, value) in [("mount", mount), ("role", role)] {
            let ok = !value.is_empty()
                && !value.starts_with('/')
                && !value.ends_with('/')
                && !value
                    .split('/')
                    .any(|p| p.is_empty() || p == "." || p == "..")
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            if !ok {
                return Err(BackendError::Config(format!(
                    "backend.{what} `{value}` is not a plain Vault path"
                )));
            }
        }
        let http = VaultHttp::new(address, ca_cert_pem).map_err(backend_error)?;
        let login = match login {
            VaultLogin::Token(token) => Login::Token(token),
            VaultLogin::AppRole {
                role_id,
                secret_id,
                mount,
            } => Login::AppRole {
                role_id,
                secret_id,
                login_path: format!("/v1/auth/{mount}/login"),
                cached: Mutex::new(None),
            },
        };
        Ok(Self {
            http,
            login,
            creds_path: format!("/v1/{mount}/creds/{role}"),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Value, BackendError> {
        let resp = self
            .login
            .send(&self.http, method, path, body)
            .await
            .map_err(backend_error)?;
        if !resp.status.is_success() {
            return Err(backend_error(status_error(resp.status, &resp, what)));
        }
        resp.json().map_err(backend_error)
    }

    /// A new credential with a lease of `ttl_secs` (or less, if the role's max is lower);
    /// returns it with the lease's real duration.
    pub async fn issue(&self, ttl_secs: i64) -> Result<(Issued, i64), BackendError> {
        let answer = self
            .call(Method::GET, &self.creds_path, None, &self.creds_path)
            .await?;
        let lease_id = answer
            .get("lease_id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                BackendError::Refused(format!(
                    "{} answered without a lease: not a dynamic secrets role",
                    self.creds_path
                ))
            })?
            .to_string();
        let values: Vec<(String, SecretValue)> = answer
            .get("data")
            .and_then(Value::as_object)
            .map(|data| {
                data.iter()
                    .filter_map(|(k, v)| Some((k.clone(), SecretValue::new(v.as_str()?))))
                    .collect()
            })
            .unwrap_or_default();
        let issued = Issued {
            backend_id: lease_id.clone(),
            values,
        };
        // The lease to the TTL granted: Vault revokes it then even without us.
        let duration = match self.renew(&lease_id, ttl_secs).await {
            Ok(duration) => duration,
            Err(e) => {
                // Unusable without a known end: give it back rather than hand it out.
                let _ = self.revoke(&lease_id).await;
                return Err(e);
            }
        };
        Ok((issued, duration))
    }

    /// Renews `lease_id` to `increment_secs` from now (OpenBao shortens a lease renewed
    /// with less than it has left, so callers ask only for more); returns the duration
    /// Vault granted, which the role's max TTL may cut.
    pub async fn renew(&self, lease_id: &str, increment_secs: i64) -> Result<i64, BackendError> {
        let answer = self
            .call(
                Method::PUT,
                "/v1/sys/leases/renew",
                Some(&json!({ "lease_id": lease_id, "increment": increment_secs })),
                "sys/leases/renew",
            )
            .await?;
        Ok(answer
            .get("lease_duration")
            .and_then(Value::as_i64)
            .unwrap_or(increment_secs)
            .min(increment_secs))
    }

    /// Revokes the lease and waits until Vault has (`sync`). Vault answers 204 for a lease
    /// it does not know, so a second revocation is a success too.
    pub async fn revoke(&self, lease_id: &str) -> Result<(), BackendError> {
        self.call(
            Method::PUT,
            "/v1/sys/leases/revoke",
            Some(&json!({ "lease_id": lease_id, "sync": true })),
            "sys/leases/revoke",
        )
        .await
        .map(|_| ())
    }
}

fn backend_error(e: SecretStoreError) -> BackendError {
    match e {
        SecretStoreError::Unreachable(m) => BackendError::Unavailable(format!("Vault: {m}")),
        SecretStoreError::Refused(m) | SecretStoreError::Malformed(m) => {
            BackendError::Refused(format!("Vault: {m}"))
        }
        other => BackendError::Refused(format!("Vault: {other}")),
    }
}
