//! daemon.toml: the one typed configuration of `mayflyd`. Unknown keys are an error, and
//! a broken file is reported with its path, line and key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use mayfly_common::TrustDomain;
use mayfly_common::process::duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The trust domain every SPIFFE ID this daemon issues belongs to.
    pub trust_domain: TrustDomain,
    /// Where the CA keys and the default SQLite datastore live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Empty: SQLite in data_dir. `postgres://…`: a shared PostgreSQL.
    #[serde(default)]
    pub datastore_url: String,
    /// The node API (agents, mTLS).
    #[serde(default = "default_node_listen")]
    pub node_listen: SocketAddr,
    /// The names and addresses agents reach the node API at. The daemon's certificate
    /// names them, and an agent refuses a daemon whose certificate does not name the
    /// address it dialed. Empty: localhost, 127.0.0.1, ::1, this host's name, the listen
    /// address, and when listening on all addresses every address of this host.
    #[serde(default)]
    pub server_names: Vec<String>,
    /// The admin API's Unix socket (mode 0600).
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Largest gRPC message the node API accepts.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Where to serve Prometheus metrics over plain HTTP; off when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    #[serde(default)]
    pub ca: CaConfig,
    #[serde(default)]
    pub svid: SvidConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Secrets rotated on schedule (`[[secret]]` tables).
    #[serde(default, rename = "secret")]
    pub secrets: Vec<crate::secrets::spec::SecretSpec>,
    /// TTL-bound credentials issued to workloads (`[[credential]]` tables).
    #[serde(default, rename = "credential")]
    pub credentials: Vec<crate::creds::spec::CredentialSpec>,
    /// Runtime authorization: where the operator's Cedar policies are, shadow mode.
    #[serde(default)]
    pub policy: crate::policy::PolicyConfig,
    /// Just-in-time elevation: its socket, how long a request waits, the longest one.
    #[serde(default)]
    pub elevation: ElevationConfig,
    /// Webhooks told of each elevation step (`[[notify]]` tables).
    #[serde(default, rename = "notify")]
    pub notify: Vec<crate::elevation::notify::NotifyConfig>,
}

/// `[elevation]` in daemon.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElevationConfig {
    /// The socket every local user may reach to ask for, review and end elevations
    /// (default: `elevation.sock` beside the admin socket).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// How long a request waits for its reviews before it expires.
    #[serde(default = "default_pending_ttl", deserialize_with = "duration")]
    pub pending_ttl: Duration,
    /// The longest elevation anybody may ask for, whatever the policies say.
    #[serde(default = "default_elevation_max_ttl", deserialize_with = "duration")]
    pub max_ttl: Duration,
    /// A workload whose entries on its agent are in this entry set is an AI agent
    /// (`context.requester_kind == "ai_agent"`).
    #[serde(default = "default_ai_agent_set")]
    pub ai_agent_set: String,
    /// Pending requests one requester may have at once: a local user cannot fill the
    /// datastore (or the reviewers' queue) with requests.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
}

impl Default for ElevationConfig {
    fn default() -> Self {
        Self {
            socket: None,
            pending_ttl: default_pending_ttl(),
            max_ttl: default_elevation_max_ttl(),
            ai_agent_set: default_ai_agent_set(),
            max_pending: default_max_pending(),
        }
    }
}

fn default_pending_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_elevation_max_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}

fn default_max_pending() -> usize {
    10
}

fn default_ai_agent_set() -> String {
    "ai-agents".to_string()
}

impl DaemonConfig {
    /// The elevation socket: configured, or beside the admin socket.
    pub fn elevation_socket(&self) -> PathBuf {
        self.elevation
            .socket
            .clone()
            .unwrap_or_else(|| self.admin_socket.with_file_name("elevation.sock"))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    #[serde(default)]
    pub key_type: KeyType,
    #[serde(default = "default_ca_ttl", deserialize_with = "duration")]
    pub ttl: Duration,
    /// How often the CA's age is checked for prepare/activate.
    #[serde(default = "default_rotation_check", deserialize_with = "duration")]
    pub rotation_check_interval: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    #[default]
    EcP256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvidConfig {
    #[serde(default = "default_x509_ttl", deserialize_with = "duration")]
    pub x509_ttl: Duration,
    #[serde(default = "default_jwt_ttl", deserialize_with = "duration")]
    pub jwt_ttl: Duration,
    /// TTL of the agents' own SVIDs.
    #[serde(default = "default_x509_ttl", deserialize_with = "duration")]
    pub agent_ttl: Duration,
    #[serde(default = "default_join_token_ttl", deserialize_with = "duration")]
    pub join_token_ttl: Duration,
    /// Most CSRs one SignSvids call may carry.
    #[serde(default = "default_max_batch")]
    pub max_csr_batch: usize,
}

/// Which of several daemons sharing a datastore runs scheduled rotations: the one holding
/// the scheduler lease. Jobs are claimed for the same duration, renewed as often.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// How long a lease (and a job claim) holds without renewal: the longest a lost
    /// daemon's work waits before another daemon takes it over.
    #[serde(default = "default_lease_ttl", deserialize_with = "duration")]
    pub lease_ttl: Duration,
    /// How often the lease and the claims are renewed.
    #[serde(default = "default_lease_renewal", deserialize_with = "duration")]
    pub lease_renewal: Duration,
    /// Who holds leases and claims; empty means `<hostname>:<data_dir>`, which a restarted
    /// daemon shares with its previous run, so it resumes its own work at once.
    #[serde(default)]
    pub holder_id: String,
}

pub use mayfly_common::process::ConfigError;
pub use mayfly_common::process::{LogConfig, LogFormat};

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        mayfly_common::process::load_toml(path, Self::check)
    }

    /// `origin` only names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        mayfly_common::process::parse_toml(text, origin, Self::check)
    }

    /// The defaults `mayflyd dev` runs on.
    pub fn dev(data_dir: PathBuf, trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            admin_socket: data_dir.join("admin.sock"),
            data_dir,
            datastore_url: String::new(),
            node_listen: default_node_listen(),
            server_names: Vec::new(),
            max_message_bytes: default_max_message_bytes(),
            metrics_listen: None,
            scheduler: SchedulerConfig::default(),
            ca: CaConfig::default(),
            svid: SvidConfig::default(),
            log: LogConfig::default(),
            secrets: Vec::new(),
            credentials: Vec::new(),
            policy: crate::policy::PolicyConfig::default(),
            elevation: ElevationConfig::default(),
            notify: Vec::new(),
        }
    }

    fn check(&self) -> Result<(), ConfigProblem> {
        let ttl_rules = [
            ("ca.ttl", self.ca.ttl, Duration::from_secs(60)),
            ("svid.x509_ttl", self.svid.x509_ttl, Duration::from_secs(10)),
            ("svid.jwt_ttl", self.svid.jwt_ttl, Duration::from_secs(10)),
            (
                "svid.agent_ttl",
                self.svid.agent_ttl,
                Duration::from_secs(10),
            ),
            (
                "svid.join_token_ttl",
                self.svid.join_token_ttl,
                Duration::from_secs(1),
            ),
        ];
        for (key, value, min) in ttl_rules {
            if value < min {
                return Err(ConfigProblem::TooShort {
                    key,
                    value: humantime::format_duration(value).to_string(),
                    min: humantime::format_duration(min).to_string(),
                });
            }
        }
        for name in &self.server_names {
            let valid = name.parse::<std::net::IpAddr>().is_ok()
                || rustls_pki_types::DnsName::try_from(name.as_str()).is_ok();
            if !valid {
                return Err(ConfigProblem::key(
                    "server_names",
                    format!("{name:?} is neither a DNS name nor an IP address"),
                ));
            }
        }
        if self.svid.max_csr_batch == 0 {
            return Err(ConfigProblem::key(
                "svid.max_csr_batch",
                "must be at least 1",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for secret in &self.secrets {
            secret.check()?;
            if !names.insert(secret.name.as_str()) {
                return Err(ConfigProblem::SecretTwice(secret.name.clone()));
            }
        }
        let mut names = std::collections::HashSet::new();
        for credential in &self.credentials {
            credential.check()?;
            if !names.insert(credential.name.as_str()) {
                return Err(ConfigProblem::CredentialTwice(credential.name.clone()));
            }
        }
        let scheduler = &self.scheduler;
        if scheduler.lease_ttl < Duration::from_secs(1) {
            return Err(ConfigProblem::key(
                "scheduler.lease_ttl",
                "must be at least 1s",
            ));
        }
        if scheduler.lease_renewal.is_zero() || scheduler.lease_renewal * 2 > scheduler.lease_ttl {
            return Err(ConfigProblem::key(
                "scheduler.lease_renewal",
                format!(
                    "{} must be more than zero and at most half of `scheduler.lease_ttl` ({}), \
                     so one missed renewal does not lose the lease",
                    humantime::format_duration(scheduler.lease_renewal),
                    humantime::format_duration(scheduler.lease_ttl)
                ),
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err(ConfigProblem::key(
                "max_message_bytes",
                "must be at least 1024",
            ));
        }
        Ok(())
    }
}

/// What daemon.toml gets wrong; the file's name is put in front (`ConfigError::Invalid`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigProblem {
    #[error("key `{key}`: {value} is shorter than the minimum {min}")]
    TooShort {
        key: &'static str,
        value: String,
        min: String,
    },
    #[error("key `{key}`: {message}")]
    Key { key: &'static str, message: String },
    #[error(transparent)]
    Secret(#[from] crate::secrets::spec::SpecError),
    #[error("secret `{0}` is defined twice")]
    SecretTwice(String),
    #[error(transparent)]
    Credential(#[from] crate::creds::spec::CredentialSpecError),
    #[error("credential `{0}` is defined twice")]
    CredentialTwice(String),
}

impl ConfigProblem {
    fn key(key: &'static str, message: impl Into<String>) -> Self {
        Self::Key {
            key,
            message: message.into(),
        }
    }
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            key_type: KeyType::default(),
            ttl: default_ca_ttl(),
            rotation_check_interval: default_rotation_check(),
        }
    }
}

impl Default for SvidConfig {
    fn default() -> Self {
        Self {
            x509_ttl: default_x509_ttl(),
            jwt_ttl: default_jwt_ttl(),
            agent_ttl: default_x509_ttl(),
            join_token_ttl: default_join_token_ttl(),
            max_csr_batch: default_max_batch(),
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            lease_ttl: default_lease_ttl(),
            lease_renewal: default_lease_renewal(),
            holder_id: String::new(),
        }
    }
}

impl SchedulerConfig {
    /// The configured holder id, or `<hostname>:<data_dir>`.
    pub fn holder(&self, data_dir: &Path) -> String {
        if !self.holder_id.is_empty() {
            return self.holder_id.clone();
        }
        let host = crate::sys::hostname().unwrap_or_else(|| "unknown-host".into());
        let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        format!("{host}:{}", dir.display())
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/mayfly")
}

fn default_node_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}

fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/mayfly/admin.sock")
}

fn default_max_message_bytes() -> usize {
    4 * 1024 * 1024
}

fn default_ca_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_rotation_check() -> Duration {
    Duration::from_secs(10)
}

fn default_x509_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_jwt_ttl() -> Duration {
    Duration::from_secs(300)
}

fn default_join_token_ttl() -> Duration {
    Duration::from_secs(600)
}

fn default_max_batch() -> usize {
    1000
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(15)
}

fn default_lease_renewal() -> Duration {
    Duration::from_secs(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DaemonConfig, ConfigError> {
        DaemonConfig::parse(text, Path::new("daemon.toml"))
    }

    #[test]
    fn minimal_file_takes_every_default() {
        let config = parse("trust_domain = \"example.org\"\n").unwrap();
        assert_eq!(config.trust_domain.as_str(), "example.org");
        assert_eq!(config.svid.x509_ttl, Duration::from_secs(3600));
        assert_eq!(config.svid.jwt_ttl, Duration::from_secs(300));
        assert_eq!(config.ca.ttl, Duration::from_secs(86400));
        assert_eq!(config.svid.join_token_ttl, Duration::from_secs(600));
        assert!(config.datastore_url.is_empty());
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.scheduler.lease_ttl, Duration::from_secs(15));
        assert_eq!(config.scheduler.lease_renewal, Duration::from_secs(5));
    }

    #[test]
    fn lease_renewal_must_fit_the_lease_twice() {
        let err = parse(
            "trust_domain = \"example.org\"\n[scheduler]\nlease_ttl = \"10s\"\nlease_renewal = \"6s\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("scheduler.lease_renewal"), "{err}");
        let config = parse(
            "trust_domain = \"example.org\"\nmetrics_listen = \"127.0.0.1:9464\"\n[scheduler]\nlease_ttl = \"3s\"\nlease_renewal = \"1s\"\nholder_id = \"d1\"\n",
        )
        .unwrap();
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(config.scheduler.holder(Path::new("/nowhere")), "d1");
        let err = parse("trust_domain = \"example.org\"\nmetrics_listen = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn credentials_are_read_from_their_tables_and_checked() {
        let table = "[[credential]]\nname = \"orders-db\"\ngrants = [\"spiffe://example.org/orders\"]\n\
            [credential.backend]\nkind = \"postgres_dynamic\"\nadmin_url = \"postgres://a@127.0.0.1/db\"\n";
        let config = parse(&format!("trust_domain = \"example.org\"\n{table}")).unwrap();
        assert_eq!(config.credentials.len(), 1);
        assert_eq!(config.credentials[0].kind(), "postgres_dynamic");
        let err = parse(&format!("trust_domain = \"example.org\"\n{table}{table}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("credential `orders-db` is defined twice"),
            "{err}"
        );
        let err = parse(&format!(
            "trust_domain = \"example.org\"\n{}",
            table.replace("spiffe://example.org/orders", "orders")
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("grant orders"), "{err}");
    }

    #[test]
    fn default_holder_names_host_and_data_dir() {
        let holder = SchedulerConfig::default().holder(Path::new("/var/lib/mayfly-x"));
        assert!(holder.ends_with(":/var/lib/mayfly-x"), "{holder}");
        assert!(holder.len() > ":/var/lib/mayfly-x".len(), "{holder}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("trust_domain = \"example.org\"\n\n[svid]\nx509_tll = \"1h\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("daemon.toml: line 4"), "{err}");
        assert!(err.contains("x509_tll"), "{err}");
    }

    #[test]
    fn bad_duration_is_explained() {
        let err = parse("trust_domain = \"example.org\"\n[ca]\nttl = \"forever\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("not a duration"), "{err}");
    }

    #[test]
    fn invalid_trust_domain_is_rejected() {
        let err = parse("trust_domain = \"Example.ORG\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../config/daemon.toml");
        parse(text).unwrap();
    }
}
