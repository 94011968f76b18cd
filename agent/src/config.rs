//! agent.toml: the one typed configuration of `mayfly-agent`. Unknown keys are an error,
//! and a broken file is reported with its path, line and key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use mayfly_common::TrustDomain;

use crate::exec::{ChangeActionError, UnknownSignal};
use crate::secret_ref::SecretRefError;
use crate::sinks::{InvalidEnvName, SinkSetError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The trust domain the daemon serves.
    pub trust_domain: TrustDomain,
    /// The daemon's node API, "host:port"; with several daemons on one datastore, all of
    /// them separated by commas ("a:8081,b:8081,c:8081"), or a name that resolves to
    /// several addresses: a lost connection is replaced by one to the next that answers.
    #[serde(default = "default_daemon_address")]
    pub daemon_address: String,
    /// PEM CA certificates to trust for the first connection (`mayflyd bundle show`).
    /// After attestation the agent keeps the daemon's bundle in data_dir and follows it.
    #[serde(default)]
    pub trust_bundle_path: Option<PathBuf>,
    /// A single-use join token, if not given by `--join-token`, `join_token_file` or
    /// MAYFLY_JOIN_TOKEN. Needed only for the first attestation.
    #[serde(default)]
    pub join_token: Option<String>,
    /// A file holding the join token (read each time the agent must attest).
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// Where the agent keeps its own SVID, key and bundle (mode 0700; files 0600).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The SPIFFE Workload API socket.
    #[serde(default = "default_socket_path")]
    pub socket_path: PathBuf,
    /// Most CSRs sent in one signing call.
    #[serde(default = "default_batch")]
    pub max_csr_batch: usize,
    #[serde(default)]
    pub log: LogConfig,
    /// Where to serve /metrics, /healthz and /readyz over plain HTTP; off when absent.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Workload API connections one uid may hold open at once (more are closed at accept).
    #[serde(default = "default_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// Workload API connections all uids together may hold open.
    #[serde(default = "default_connections")]
    pub max_connections: usize,
    /// A Workload API connection that has sent no request by then is closed.
    #[serde(
        default = "default_first_request_timeout",
        deserialize_with = "mayfly_common::process::duration"
    )]
    pub first_request_timeout: std::time::Duration,
    /// Files kept up to date with SVIDs and granted secrets (`[[sink]]`).
    #[serde(default, rename = "sink")]
    pub sinks: Vec<crate::sinks::SinkConfig>,
    /// A child process the agent runs with granted secrets in its environment (`[exec]`).
    #[serde(default)]
    pub exec: Option<ExecConfig>,
}

/// `[exec]`: the agent supervises one app, like `mayfly-agent exec` but from agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Variable name to `secret:NAME[:username|:version]`, `credential:NAME:FIELD` or a
    /// literal value.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Whose the `credential:` values are: a SPIFFE ID of one of this agent's entries.
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// The TTL asked for those credentials ("1h"); default: the definition's.
    #[serde(default)]
    pub ttl: Option<String>,
    /// On a new version of a secret in `env`: "restart", "none" or "signal:HUP".
    #[serde(default = "default_exec_on_change")]
    pub on_change: String,
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    #[serde(
        default = "default_stop_timeout",
        deserialize_with = "mayfly_common::process::duration"
    )]
    pub stop_timeout: std::time::Duration,
}

fn default_connections_per_uid() -> usize {
    crate::workload_api::ConnectionLimits::default().per_uid
}

fn default_connections() -> usize {
    crate::workload_api::ConnectionLimits::default().total
}

fn default_first_request_timeout() -> std::time::Duration {
    crate::workload_api::ConnectionLimits::default().first_request
}

impl AgentConfig {
    /// The Workload API's connection caps, as configured.
    pub fn connection_limits(&self) -> crate::workload_api::ConnectionLimits {
        crate::workload_api::ConnectionLimits {
            per_uid: self.max_connections_per_uid.max(1),
            total: self.max_connections.max(1),
            first_request: self.first_request_timeout,
        }
    }
}

pub use mayfly_common::process::ConfigError;
pub use mayfly_common::process::{LogConfig, LogFormat};

/// What is wrong with an agent.toml that parsed: the key to fix, and why.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("key `max_csr_batch`: must be at least 1")]
    ZeroBatch,
    #[error(transparent)]
    Sinks(#[from] SinkSetError),
    #[error("[exec]: {0}")]
    Exec(#[source] ExecConfigError),
}

/// Why the `[exec]` table does not describe a child that can be run.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ExecConfigError {
    #[error("key `command`: name the program to run")]
    NoProgram,
    #[error("env: {0}")]
    EnvName(#[source] InvalidEnvName),
    /// Quotes the `secret:` reference, never a literal value (which may be a secret).
    #[error("env.{key}: {source}")]
    EnvValue { key: String, source: SecretRefError },
    #[error("key `on_change`: {0}")]
    OnChange(#[source] ChangeActionError),
    #[error("key `stop_signal`: {0}")]
    StopSignal(#[source] UnknownSignal),
    #[error(
        "env names a credential: add `spiffe_id`, the SPIFFE ID whose credential it is (one of this agent's entries)"
    )]
    HolderRequired,
    #[error("keys `spiffe_id` and `ttl` are for `credential:` values in env, and it has none")]
    HolderWithoutCredential,
    #[error("key `spiffe_id`: {0}")]
    SpiffeId(#[source] mayfly_common::SpiffeIdError),
    #[error("key `ttl`: {0}")]
    Ttl(#[source] crate::credentials::TtlError),
}

impl AgentConfig {
    // The shared loader reports a failed check as text beside the file's path, so the
    // typed error becomes its message there and nowhere else.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        mayfly_common::process::load_toml(path, |c: &Self| c.check().map_err(|e| e.to_string()))
    }

    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        mayfly_common::process::parse_toml(text, origin, |c: &Self| {
            c.check().map_err(|e| e.to_string())
        })
    }

    /// What the types cannot say: batch sizes, the sinks, the `[exec]` child.
    fn check(&self) -> Result<(), AgentConfigError> {
        if self.max_csr_batch == 0 {
            return Err(AgentConfigError::ZeroBatch);
        }
        crate::sinks::check_all(&self.sinks, self.exec.is_some())?;
        if let Some(exec) = &self.exec {
            exec.child_spec(&self.socket_path)
                .map_err(AgentConfigError::Exec)?;
        }
        Ok(())
    }

    /// The checked sinks (`check` has already refused bad ones at load).
    pub fn checked_sinks(&self) -> Result<Vec<crate::sinks::Sink>, SinkSetError> {
        crate::sinks::check_all(&self.sinks, self.exec.is_some())
    }

    /// The configuration `mayflyd dev` runs its agent with.
    pub fn dev(trust_domain: TrustDomain, daemon_address: String, data_dir: PathBuf) -> Self {
        Self {
            trust_domain,
            daemon_address,
            trust_bundle_path: None,
            join_token: None,
            join_token_file: None,
            socket_path: data_dir.join("api.sock"),
            data_dir,
            max_csr_batch: default_batch(),
            log: LogConfig::default(),
            metrics_listen: None,
            max_connections_per_uid: default_connections_per_uid(),
            max_connections: default_connections(),
            first_request_timeout: default_first_request_timeout(),
            sinks: Vec::new(),
            exec: None,
        }
    }
}

impl ExecConfig {
    /// What the supervisor runs; every reference and name checked.
    pub fn child_spec(&self, socket: &Path) -> Result<crate::exec::ChildSpec, ExecConfigError> {
        use crate::exec::{ChangeAction, EnvValue};
        let (program, args) = self
            .command
            .split_first()
            .filter(|(p, _)| !p.is_empty())
            .ok_or(ExecConfigError::NoProgram)?;
        let mut vars = Vec::with_capacity(self.env.len());
        for (key, value) in &self.env {
            crate::sinks::check_env_name(key).map_err(ExecConfigError::EnvName)?;
            let value = EnvValue::parse(value).map_err(|source| ExecConfigError::EnvValue {
                key: key.clone(),
                source,
            })?;
            vars.push((key.clone(), value));
        }
        self.credential_keys_of(&vars)?;
        let on_change: ChangeAction = self.on_change.parse().map_err(ExecConfigError::OnChange)?;
        Ok(crate::exec::ChildSpec {
            program: program.clone(),
            args: args.to_vec(),
            vars,
            endpoint: Some(crate::cli::endpoint::WorkloadEndpoint::Unix(
                socket.to_path_buf(),
            )),
            on_change,
            stop_signal: self
                .stop_signal
                .parse()
                .map_err(ExecConfigError::StopSignal)?,
            stop_timeout: self.stop_timeout,
            // The agent has its state once synced; a secret missing then is a mistake.
            first_wait: std::time::Duration::from_secs(30),
        })
    }
}

impl ExecConfig {
    /// The credentials the child's environment names, as the agent's cache keys them.
    pub fn credential_keys(
        &self,
        socket: &Path,
    ) -> Result<Vec<crate::credentials::CredentialKey>, ExecConfigError> {
        let spec = self.child_spec(socket)?;
        self.credential_keys_of(&spec.vars)
    }

    fn credential_keys_of(
        &self,
        vars: &[(String, crate::exec::EnvValue)],
    ) -> Result<Vec<crate::credentials::CredentialKey>, ExecConfigError> {
        let names = crate::exec::credential_names(vars);
        let spiffe_id = match (&self.spiffe_id, names.is_empty()) {
            (None, true) if self.ttl.is_none() => return Ok(Vec::new()),
            (_, true) => return Err(ExecConfigError::HolderWithoutCredential),
            (None, false) => return Err(ExecConfigError::HolderRequired),
            (Some(id), false) => {
                mayfly_common::SpiffeId::parse(id).map_err(ExecConfigError::SpiffeId)?
            }
        };
        let ttl_seconds = match self.ttl.as_deref() {
            None => 0,
            Some(text) => crate::credentials::parse_ttl(text)
                .map(|ttl| i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX))
                .map_err(ExecConfigError::Ttl)?,
        };
        Ok(names
            .into_iter()
            .map(|name| crate::credentials::CredentialKey {
                spiffe_id: spiffe_id.clone(),
                name,
                ttl_seconds,
            })
            .collect())
    }
}

fn default_exec_on_change() -> String {
    "restart".into()
}

fn default_stop_signal() -> String {
    "TERM".into()
}

fn default_stop_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

fn default_daemon_address() -> String {
    "127.0.0.1:8081".into()
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/mayfly-agent")
}

fn default_socket_path() -> PathBuf {
    PathBuf::from("/run/mayfly-agent/api.sock")
}

fn default_batch() -> usize {
    100
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = AgentConfig::parse(
            "trust_domain = \"example.org\"\nsocket_pth = \"/tmp/x\"\n",
            Path::new("agent.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("agent.toml: line 2"), "{err}");
        assert!(err.contains("socket_pth"), "{err}");
    }

    #[test]
    fn the_shipped_example_parses() {
        AgentConfig::parse(
            include_str!("../../config/agent.toml"),
            Path::new("agent.toml"),
        )
        .unwrap();
    }

    #[test]
    fn metrics_listen_is_an_address_and_off_by_default() {
        let parse = |extra: &str| {
            AgentConfig::parse(
                &format!("trust_domain = \"example.org\"\n{extra}"),
                Path::new("agent.toml"),
            )
        };
        assert_eq!(parse("").unwrap().metrics_listen, None);
        assert_eq!(
            parse("metrics_listen = \"127.0.0.1:9465\"\n")
                .unwrap()
                .metrics_listen,
            Some("127.0.0.1:9465".parse().unwrap())
        );
        let err = parse("metrics_listen = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        // The line names the key; the message says what an address looks like.
        assert!(
            err.contains("line 2") && err.contains("socket address"),
            "{err}"
        );
    }

    #[test]
    fn exec_credentials_say_whose_they_are() {
        let parse = |exec: &str| {
            AgentConfig::parse(
                &format!(
                    "trust_domain = \"example.org\"\n[exec]\ncommand = [\"/bin/true\"]\n{exec}"
                ),
                Path::new("agent.toml"),
            )
        };
        let err = parse("env = { PGPASSWORD = \"credential:orders-db:password\" }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("add `spiffe_id`"), "{err}");
        let err = parse("spiffe_id = \"spiffe://example.org/orders\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("has none"), "{err}");
        let config = parse(
            "env = { PGPASSWORD = \"credential:orders-db:password\", U = \"credential:orders-db:username\" }\n\
             spiffe_id = \"spiffe://example.org/orders\"\nttl = \"15m\"\n",
        )
        .unwrap();
        let keys = config
            .exec
            .unwrap()
            .credential_keys(Path::new("/run/api.sock"))
            .unwrap();
        assert_eq!(keys.len(), 1, "one lease for both values: {keys:?}");
        assert_eq!(keys[0].ttl_seconds, 900);
    }
}
