//! Why sinks cannot be used, checked once at start: one table's mistake (naming the key to
//! fix), or how the tables clash. Rendering (and compiling templates) fails with `RenderError`.

use std::io;
use std::path::PathBuf;

use mayfly_common::SpiffeIdError;

use super::RenderError;
use crate::exec::UnknownSignal;
use crate::secret_ref::SecretRefError;

/// Why one `[[sink]]` table cannot be used; each message names the key to fix. Only keys,
/// paths and references are quoted, never a secret's value.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SinkConfigError {
    #[error("key `{key}` is only for kind = {kinds}")]
    OnlyForKind {
        key: &'static str,
        kinds: &'static str,
    },
    #[error("key `{0}` is required")]
    Required(&'static str),
    #[error("key `path` is required for this kind")]
    PathRequired,
    #[error("key `{key}`: {} must be an absolute path to a file", .path.display())]
    NotAbsolute { key: &'static str, path: PathBuf },
    #[error("mode `{0}` is not an octal file mode such as \"0600\"")]
    Mode(String),
    #[error("key `spiffe_id`: {source}")]
    SpiffeId { source: SpiffeIdError },
    #[error("an svid sink needs exactly one of `spiffe_id` or `hint`")]
    SvidSelect,
    #[error("key `secret`: {source}")]
    Secret { source: SecretRefError },
    #[error("credential `{0}`: a credential name is 1-128 letters, digits, '-', '_' or '.'")]
    CredentialName(String),
    #[error(
        "field `{0}`: name one value of the credential (username, password, access_key_id, lease_id, expires_at, …)"
    )]
    Field(String),
    #[error("format `{0}`: use \"json\", \"env\" or \"aws\" (a shared-credentials profile)")]
    Format(String),
    #[error(
        "a credential sink takes `field` (one value) or `format` (the whole credential), not both"
    )]
    FieldAndFormat,
    #[error(
        "this sink writes a credential: `spiffe_id` must say which of this agent's identities obtains it"
    )]
    HolderRequired,
    #[error(
        "key `spiffe_id` names who obtains a sink's credentials, and this sink writes none (an svid sink takes it too)"
    )]
    HolderWithoutCredential,
    #[error("key `ttl` is the lease asked for a sink's credentials, and this sink writes none")]
    TtlWithoutCredential,
    #[error("key `ttl`: {0}")]
    Ttl(String),
    #[error("key `source`: cannot read {}: {source}", .path.display())]
    TemplateSource { path: PathBuf, source: io::Error },
    #[error("a template sink needs exactly one of `template` (inline) or `source` (a file)")]
    TemplateText,
    #[error("key `vars`: name at least one variable")]
    NoVars,
    #[error(transparent)]
    EnvName(#[from] InvalidEnvName),
    #[error("vars.{key}: {source}")]
    VarReference { key: String, source: SecretRefError },
    #[error("key `{key}` needs on_change = \"{needs}\"")]
    NeedsOnChange {
        key: &'static str,
        needs: &'static str,
    },
    #[error("on_change = \"command\" needs `command = [\"program\", \"arg\", …]`")]
    CommandMissing,
    #[error("on_change = \"signal\" needs `signal` (HUP, USR1, TERM, …)")]
    SignalMissing,
    #[error(transparent)]
    Signal(#[from] UnknownSignal),
    #[error("on_change = \"signal\" needs exactly one of `pid` (> 0) or `pid_file`")]
    SignalTarget,
    #[error(
        "on_change = \"restart\" restarts the child of the agent's [exec] table, and there is none"
    )]
    NoChildToRestart,
    #[error("key `on_change`: `{0}` is not one of none, command, signal, restart")]
    OnChange(String),
    #[error("on_revoke = \"{0}\": use \"remove\" or \"blank\"")]
    OnRevoke(String),
    /// `owner` or `group` holds a NUL byte.
    #[error("{key} `{text}` is not a name")]
    NotAName { key: &'static str, text: String },
    /// `owner` or `group` names no user or group this node knows.
    #[error("{key} `{text}`: no such {kind}")]
    NoSuchId {
        key: &'static str,
        text: String,
        kind: &'static str,
    },
}

/// Why the `[[sink]]` tables together cannot be used: one of them, or how they clash.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SinkSetError {
    /// `number` counts from 1, in the order of agent.toml.
    #[error("sink #{number}: {source}")]
    Sink {
        number: usize,
        source: SinkConfigError,
    },
    #[error("two sinks are named `{0}`")]
    DuplicateName(String),
    #[error("sinks `{first}` and `{second}` both write {}", .path.display())]
    SamePath {
        first: String,
        second: String,
        path: PathBuf,
    },
    /// A template that does not compile.
    #[error(transparent)]
    Template(RenderError),
}

/// A variable name systemd's EnvironmentFile= or a shell would refuse.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{name}` is not an environment variable name (letters, digits and '_', not starting with a digit)"
)]
pub struct InvalidEnvName {
    pub name: String,
}
