//! A credential's definition, as written in daemon.toml (`[[credential]]`) or given to
//! `mayflyd credential create --file`: which backend issues it, who may obtain it, and for
//! how long.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest any credential may live: a day. Longer is a standing credential, which is
/// what this is here to remove.
pub const LONGEST_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    pub name: String,
    pub backend: BackendSpec,
    /// SPIFFE IDs that may obtain it.
    #[serde(default)]
    pub grants: Vec<String>,
    /// The policy sets (`Mayfly::CredentialSet`) it is in, for policies about groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<String>,
    /// When the request names none. Default 1 h.
    #[serde(default = "default_ttl", with = "humantime_serde_compat")]
    pub default_ttl: Duration,
    /// Longer requests are clamped to it (and told so). Default 24 h.
    #[serde(default = "max_ttl", with = "humantime_serde_compat")]
    pub max_ttl: Duration,
    /// How bad its leak would be: "low", "medium" (default), "high" or "critical"; the
    /// blast-radius report weighs live exposure by it.
    #[serde(default = "default_sensitivity")]
    pub sensitivity: String,
}

/// The sensitivities a definition may have, least first; each weighs twice the one before.
pub const SENSITIVITIES: [&str; 4] = ["low", "medium", "high", "critical"];

fn default_sensitivity() -> String {
    "medium".to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendSpec {
    /// Mayfly creates a PostgreSQL role per lease and drops it at the end, no Vault needed.
    PostgresDynamic {
        /// A superuser or CREATEROLE login, `postgres://admin:pw@host:port/db`. Objects the
        /// role comes to own in this database are reassigned to this user when it is dropped.
        admin_url: String,
        /// The statements that create the role, run in one transaction as the admin:
        /// `{{name}}`, `{{password}}` and `{{expiration}}` (an ISO 8601 UTC timestamp) are
        /// replaced. Default: `CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}'
        /// VALID UNTIL '{{expiration}}'`; add GRANTs for what the role may do.
        #[serde(default = "default_creation")]
        creation: Vec<String>,
        /// Role names are `<prefix><lease id>`. Default `mayfly_`.
        #[serde(default = "default_prefix")]
        username_prefix: String,
    },
    /// A Vault/OpenBao dynamic secrets role: `<mount>/creds/<role>` issues, the lease is
    /// renewed to the TTL granted, `sys/leases/revoke` revokes.
    VaultDynamic {
        /// `https://vault.example:8200` (or `http://` for a local dev server).
        address: String,
        /// The secrets engine's mount, e.g. `database`.
        #[serde(default = "default_vault_mount")]
        mount: String,
        role: String,
        /// A token allowed to read the role's creds and renew and revoke its leases.
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        approle: Option<crate::secrets::spec::AppRoleSpec>,
        /// PEM CA certificates to trust for https, instead of the Mozilla roots.
        #[serde(default)]
        ca_cert: Option<std::path::PathBuf>,
    },
    /// AWS STS `AssumeRole`: one role session per lease, with the daemon's own AWS
    /// credentials from the standard chain.
    AwsSts {
        role_arn: String,
        #[serde(default = "default_region")]
        region: String,
        /// Another endpoint than AWS's own (a VPC endpoint; moto in tests).
        #[serde(default)]
        endpoint_url: Option<String>,
        /// An inline session policy (JSON) narrowing what the role allows.
        #[serde(default)]
        policy: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialSpecError {
    #[error("credential `{name}`: {message}")]
    Invalid { name: String, message: String },
    #[error("credential definition: {0}")]
    Parse(String),
}

impl CredentialSpec {
    /// Parses one credential from TOML (the body of a `[[credential]]` table).
    pub fn from_toml(text: &str) -> Result<Self, CredentialSpecError> {
        let spec: Self =
            toml::from_str(text).map_err(|e| CredentialSpecError::Parse(e.to_string()))?;
        spec.check()?;
        Ok(spec)
    }

    /// The definition as the policies see it (`Mayfly::Credential`).
    pub fn policy_resource(&self) -> mayfly_common::policy::Resource<'_> {
        mayfly_common::policy::Resource::Credential {
            name: &self.name,
            kind: self.kind(),
            grants: &self.grants,
            sets: &self.sets,
            max_ttl_seconds: self.max().as_secs() as i64,
        }
    }

    /// Checks everything that can be checked without talking to the backend.
    pub fn check(&self) -> Result<(), CredentialSpecError> {
        let fail = |message: String| CredentialSpecError::Invalid {
            name: self.name.clone(),
            message,
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(fail(
                "name must be 1-64 characters of letters, digits, '-', '_' or '.'".into(),
            ));
        }
        for grant in &self.grants {
            mayfly_common::SpiffeId::parse(grant)
                .map_err(|e| fail(format!("grant {grant}: {e}")))?;
        }
        mayfly_common::policy::check_set_names(&self.sets).map_err(fail)?;
        if !SENSITIVITIES.contains(&self.sensitivity.as_str()) {
            return Err(fail(format!(
                "sensitivity `{}`: use low, medium, high or critical",
                self.sensitivity
            )));
        }
        if self.default_ttl < Duration::from_secs(1) || self.max_ttl < Duration::from_secs(1) {
            return Err(fail("default_ttl and max_ttl must be at least 1s".into()));
        }
        if self.default_ttl > self.max_ttl {
            return Err(fail(format!(
                "default_ttl {} is longer than max_ttl {}",
                humantime::format_duration(self.default_ttl),
                humantime::format_duration(self.max_ttl)
            )));
        }
        if self.max_ttl > LONGEST_TTL {
            return Err(fail(format!(
                "max_ttl {} is longer than a day; a credential that lives longer is a standing one",
                humantime::format_duration(self.max_ttl)
            )));
        }
        match &self.backend {
            BackendSpec::PostgresDynamic {
                admin_url,
                creation,
                username_prefix,
            } => {
                if !(admin_url.starts_with("postgres://") || admin_url.starts_with("postgresql://"))
                {
                    return Err(fail("backend.admin_url must be a postgres:// URL".into()));
                }
                if creation.is_empty() || !creation.iter().any(|s| s.contains("{{name}}")) {
                    return Err(fail(
                        "backend.creation must create the role: a statement naming {{name}}".into(),
                    ));
                }
                let prefix_ok = !username_prefix.is_empty()
                    && username_prefix.len() <= 24
                    && username_prefix
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !prefix_ok {
                    return Err(fail(
                        "backend.username_prefix must be 1-24 characters of a-z, 0-9 or '_'".into(),
                    ));
                }
            }
            BackendSpec::VaultDynamic {
                address,
                token,
                approle,
                ..
            } => {
                if !(address.starts_with("http://") || address.starts_with("https://")) {
                    return Err(fail(
                        "backend.address must be an http:// or https:// URL".into(),
                    ));
                }
                if token.is_some() == approle.is_some() {
                    return Err(fail(
                        "backend needs exactly one of token or approle to log in to Vault".into(),
                    ));
                }
            }
            BackendSpec::AwsSts {
                role_arn, policy, ..
            } => {
                if !(role_arn.starts_with("arn:") && role_arn.contains(":role/")) {
                    return Err(fail(format!(
                        "backend.role_arn `{role_arn}` is not a role ARN (arn:aws:iam::ACCOUNT:role/NAME)"
                    )));
                }
                if self.default_ttl < super::sts::MIN_TTL {
                    return Err(fail(
                        "default_ttl must be at least 15m: STS grants no shorter session".into(),
                    ));
                }
                if let Some(policy) = policy
                    && serde_json::from_str::<serde_json::Value>(policy).is_err()
                {
                    return Err(fail("backend.policy must be a JSON policy document".into()));
                }
            }
        }
        Ok(())
    }

    pub fn kind(&self) -> &'static str {
        match self.backend {
            BackendSpec::PostgresDynamic { .. } => "postgres_dynamic",
            BackendSpec::VaultDynamic { .. } => "vault_dynamic",
            BackendSpec::AwsSts { .. } => "aws_sts",
        }
    }

    /// The TTL a request gets, and a notice when it was changed or is unwise.
    pub fn ttl_for(&self, requested: Duration) -> (Duration, Option<String>) {
        let (ttl, notice) = self.clamped(requested);
        if matches!(self.backend, BackendSpec::AwsSts { .. }) {
            if ttl < super::sts::MIN_TTL {
                return (
                    super::sts::MIN_TTL,
                    Some(format!(
                        "ttl {} raised to 15m, STS's shortest session",
                        humantime::format_duration(ttl)
                    )),
                );
            }
            if ttl < super::sts::ADVISED_TTL && notice.is_none() {
                return (
                    ttl,
                    Some(
                        "below 30m, botocore refreshes these credentials on nearly every call"
                            .into(),
                    ),
                );
            }
        }
        (ttl, notice)
    }

    /// The longest TTL granted: `max_ttl`, and for STS no more than its 12 h.
    pub fn max(&self) -> Duration {
        match self.backend {
            BackendSpec::AwsSts { .. } => self.max_ttl.min(super::sts::MAX_TTL),
            _ => self.max_ttl,
        }
    }

    fn clamped(&self, requested: Duration) -> (Duration, Option<String>) {
        if requested.is_zero() {
            return (self.default_ttl, None);
        }
        if requested > self.max() {
            return (
                self.max(),
                Some(format!(
                    "ttl {} clamped to the maximum {}",
                    humantime::format_duration(requested),
                    humantime::format_duration(self.max())
                )),
            );
        }
        (requested, None)
    }
}

fn default_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn max_ttl() -> Duration {
    LONGEST_TTL
}

fn default_creation() -> Vec<String> {
    vec![
        "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'"
            .into(),
    ]
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_vault_mount() -> String {
    "database".into()
}

fn default_prefix() -> String {
    "mayfly_".into()
}

/// Durations as operators write them (`90s`, `1h 30m`), both ways.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("`{text}`: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name = \"orders\"\ngrants = [\"spiffe://example.org/orders\"]\n\
        [backend]\nkind = \"postgres_dynamic\"\nadmin_url = \"postgres://postgres@127.0.0.1/db\"\n";

    #[test]
    fn a_definition_gets_defaults_and_clamps_long_requests() {
        let spec = CredentialSpec::from_toml(BASE).unwrap();
        assert_eq!(spec.kind(), "postgres_dynamic");
        assert_eq!(spec.ttl_for(Duration::ZERO), (default_ttl(), None));
        let (ttl, notice) = spec.ttl_for(Duration::from_secs(48 * 3600));
        assert_eq!(ttl, LONGEST_TTL);
        assert!(notice.unwrap().contains("clamped"));
    }

    #[test]
    fn bad_definitions_name_the_problem() {
        for (extra, problem) in [
            ("default_ttl = \"2d\"\n", "longer than max_ttl"),
            ("max_ttl = \"2d\"\n", "longer than a day"),
            ("default_ttl = \"soon\"\n", "soon"),
        ] {
            let text = format!("{extra}{BASE}");
            let e = CredentialSpec::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains(problem), "{extra}: {e}");
        }
        let e = CredentialSpec::from_toml(&BASE.replace("orders\"\ngrants", "bad name\"\ngrants"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("name must be"), "{e}");
        let e = CredentialSpec::from_toml(&format!("{BASE}creation = [\"SELECT 1\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("must create the role"), "{e}");
        let e = CredentialSpec::from_toml(&format!("{BASE}username_prefix = \"Bad-\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("username_prefix"), "{e}");
    }
}
