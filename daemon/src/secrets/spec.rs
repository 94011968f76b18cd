//! A secret's definition, as written in daemon.toml (`[[secret]]`) or given to
//! `mayflyd secret create --file`: where it lives, what checks it, how values are made,
//! when it rotates and who may receive it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::generator::PasswordPolicy;
use super::schedule::Schedule;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// Unique name: letters, digits, `-`, `_`, `.`; at most 128 characters.
    pub name: String,
    pub store: StoreSpec,
    pub target: TargetSpec,
    #[serde(default)]
    pub strategy: Strategy,
    /// The database user(s) whose password rotates: one for `single-user`, two for
    /// `alternating-users`. For a `none` target, an optional label.
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub generator: PasswordPolicy,
    /// Cron (5 or 6 fields, seconds first when 6), `@daily`, `@hourly`, or `rate(12h)`.
    pub schedule: String,
    /// Rotations may only start inside this daily UTC window.
    #[serde(default)]
    pub window: Option<WindowSpec>,
    /// Attempts per step before the rotation is marked failed.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// SPIFFE IDs that may receive the value through their agent.
    #[serde(default)]
    pub grants: Vec<String>,
    /// The policy sets (`Mayfly::SecretSet`) it is in, for policies about groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// "HH:MM", UTC.
    pub start: String,
    /// e.g. "2h".
    pub duration: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    SingleUser,
    AlternatingUsers,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreSpec {
    /// Mayfly's own store, sealed with the data_dir key.
    Local,
    /// AWS Secrets Manager (the secret must exist, like AWS's own rotation requires).
    Aws {
        secret_id: String,
        region: String,
        #[serde(default)]
        endpoint_url: Option<String>,
    },
    /// A KV v2 secret on Vault or OpenBao.
    Vault {
        address: String,
        #[serde(default = "default_kv_mount")]
        mount: String,
        path: String,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        approle: Option<AppRoleSpec>,
        #[serde(default)]
        ca_cert: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRoleSpec {
    pub role_id: String,
    pub secret_id: String,
    #[serde(default = "default_approle_mount")]
    pub mount: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TargetSpec {
    /// PostgreSQL: `ALTER ROLE … PASSWORD` over `admin_url`, tested by logging in at
    /// `login_url` (default: admin_url without its credentials).
    Postgres {
        admin_url: String,
        #[serde(default)]
        login_url: Option<String>,
    },
    /// MariaDB / MySQL: `ALTER USER 'user'@'host' IDENTIFIED BY …`.
    Mysql {
        admin_url: String,
        #[serde(default)]
        login_url: Option<String>,
        #[serde(default = "default_mysql_host")]
        host: String,
    },
    /// An opaque value (API key, token), optionally installed and checked by commands
    /// that read it on stdin.
    None {
        #[serde(default)]
        hook: Vec<String>,
        #[serde(default)]
        test: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    #[error("secret `{name}`: {message}")]
    Invalid { name: String, message: String },
    #[error("secret definition: {0}")]
    Parse(String),
}

impl SecretSpec {
    /// Parses one secret from TOML (the body of a `[[secret]]` table).
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec: Self = toml::from_str(text).map_err(|e| SpecError::Parse(e.to_string()))?;
        spec.check()?;
        Ok(spec)
    }

    /// Checks everything that can be checked without talking to the store or target.
    pub fn check(&self) -> Result<(), SpecError> {
        let fail = |message: String| SpecError::Invalid {
            name: self.name.clone(),
            message,
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 128
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(fail(
                "name must be 1-128 characters of letters, digits, '-', '_' or '.'".into(),
            ));
        }
        self.parsed_schedule()
            .map_err(|e| fail(format!("schedule: {e}")))?;
        self.generator
            .validate()
            .map_err(|e| fail(format!("generator: {e}")))?;
        let database = !matches!(self.target, TargetSpec::None { .. });
        match (self.strategy, self.users.len(), database) {
            (Strategy::SingleUser, 1, true) | (Strategy::AlternatingUsers, 2, true) => {}
            (Strategy::SingleUser, 0 | 1, false) => {}
            (Strategy::AlternatingUsers, _, false) => {
                return Err(fail("alternating-users needs a database target".into()));
            }
            (Strategy::SingleUser, n, _) => {
                return Err(fail(format!("single-user takes exactly one user, got {n}")));
            }
            (Strategy::AlternatingUsers, n, _) => {
                return Err(fail(format!(
                    "alternating-users takes exactly two users, got {n}"
                )));
            }
        }
        if database
            && self
                .users
                .iter()
                .any(|u| u.is_empty() || !u.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(fail(
                "database user names may hold only letters, digits and '_'".into(),
            ));
        }
        if self.strategy == Strategy::AlternatingUsers && self.users[0] == self.users[1] {
            return Err(fail("alternating-users needs two different users".into()));
        }
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return Err(fail("max_attempts must be between 1 and 100".into()));
        }
        if let StoreSpec::Vault { token, approle, .. } = &self.store
            && token.is_none() == approle.is_none()
        {
            return Err(fail(
                "a vault store needs exactly one of `token` or `approle`".into(),
            ));
        }
        for grant in &self.grants {
            mayfly_common::SpiffeId::parse(grant)
                .map_err(|e| fail(format!("grant {grant}: {e}")))?;
        }
        mayfly_common::policy::check_set_names(&self.sets).map_err(fail)?;
        Ok(())
    }

    pub fn parsed_schedule(&self) -> Result<Schedule, super::schedule::ScheduleError> {
        let mut schedule = Schedule::parse(&self.schedule)?;
        if let Some(window) = &self.window {
            schedule =
                schedule.with_window(super::runtime::window(&window.start, &window.duration)?);
        }
        Ok(schedule)
    }

    /// Which store kind, for listings.
    pub fn store_kind(&self) -> &'static str {
        match self.store {
            StoreSpec::Local => "local",
            StoreSpec::Aws { .. } => "aws",
            StoreSpec::Vault { .. } => "vault",
        }
    }

    pub fn target_kind(&self) -> &'static str {
        match self.target {
            TargetSpec::Postgres { .. } => "postgres",
            TargetSpec::Mysql { .. } => "mysql",
            TargetSpec::None { .. } => "none",
        }
    }
}

fn default_attempts() -> u32 {
    5
}

fn default_kv_mount() -> String {
    "secret".into()
}

fn default_approle_mount() -> String {
    "approle".into()
}

fn default_mysql_host() -> String {
    "%".into()
}
