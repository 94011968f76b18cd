//! Sinks: what lets an app that only reads files live without a hardcoded credential.
//! Each `[[sink]]` of agent.toml turns the agent's state (SVIDs, granted secrets, and the
//! TTL-bound credentials its sinks name, obtained as one of its identities) into files, written atomically with their mode and owner, and says what to do when they
//! change. This module owns the typed sink definitions; `render` computes file contents,
//! `runner` writes them and fires the change actions.

mod error;
pub(crate) mod render;
pub mod runner;

use std::ffi::CString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use mayfly_common::SpiffeId;

use crate::credentials::CredentialKey;
use crate::exec::Signal;
use crate::secret_ref::{SecretRef, ValueRef};
use crate::sys;

pub use error::{InvalidEnvName, SinkConfigError, SinkSetError};
pub use render::{RenderError, RenderedFile};
pub use runner::SinkRunner;

/// One `[[sink]]` table as written. Which keys apply depends on `kind`; [`Sink::from_config`]
/// turns it into a [`Sink`] or names the key that is wrong.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// svid, secret, credential, template or env.
    pub kind: SinkKindName,
    /// How templates refer to an svid sink (`svids.NAME.cert_path`); optional elsewhere.
    #[serde(default)]
    pub name: Option<String>,
    // svid
    #[serde(default)]
    pub spiffe_id: Option<String>,
    #[serde(default)]
    pub hint: Option<String>,
    #[serde(default)]
    pub cert_path: Option<PathBuf>,
    #[serde(default)]
    pub key_path: Option<PathBuf>,
    #[serde(default)]
    pub bundle_path: Option<PathBuf>,
    #[serde(default)]
    pub include_intermediates: bool,
    #[serde(default)]
    pub cert_mode: Option<String>,
    // secret, template, env
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub source: Option<PathBuf>,
    #[serde(default)]
    pub vars: Option<std::collections::BTreeMap<String, String>>,
    // credential; template (credentials); credentials in env vars
    #[serde(default)]
    pub credential: Option<String>,
    #[serde(default)]
    pub credentials: Option<Vec<String>>,
    /// One value of the credential (`password`), instead of a whole-credential format.
    #[serde(default)]
    pub field: Option<String>,
    /// json (the default), env or aws (a shared-credentials profile).
    #[serde(default)]
    pub format: Option<String>,
    /// The lease asked for, e.g. "1h"; the credential's default TTL otherwise.
    #[serde(default)]
    pub ttl: Option<String>,
    // every kind
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    /// none, command, signal or restart.
    #[serde(default)]
    pub on_change: Option<String>,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub signal: Option<String>,
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// What happens to the files when what they hold is revoked: remove (the default) or
    /// blank (truncate to empty, for apps that must find the file).
    #[serde(default)]
    pub on_revoke: Option<String>,
    /// The secrets it needs may not be granted yet (they come with an elevation): nothing
    /// is written until they are, and the files go when the grant does. Otherwise a
    /// secret not granted stops the agent at start (a typo, most likely).
    #[serde(default)]
    pub until_granted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKindName {
    Svid,
    Secret,
    Credential,
    Template,
    Env,
}

/// A sink, checked: every path absolute, every reference parsed, the template compiled.
#[derive(Debug, Clone)]
pub struct Sink {
    /// How messages name it: its name, else its first path.
    pub label: String,
    pub name: Option<String>,
    pub kind: SinkKind,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub on_change: OnChange,
    pub on_revoke: OnRevoke,
    /// Waits for its secrets to be granted rather than failing (`until_granted`).
    pub until_granted: bool,
    /// For a sink that writes credentials: whose (one of the agent's SPIFFE IDs) and
    /// for how long.
    pub holder: Option<Holder>,
}

/// Who a sink's credentials are obtained as, and the TTL asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub spiffe_id: SpiffeId,
    /// 0: the credential's default.
    pub ttl_seconds: i64,
}

/// How a credential sink writes its credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialOutput {
    /// One value, as it is (`field = "password"`).
    Field(String),
    Json,
    Env,
    /// `[default]` with aws_access_key_id, aws_secret_access_key, aws_session_token.
    AwsProfile,
}

/// What a sink does with its files when what they hold is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRevoke {
    Remove,
    Blank,
}

#[derive(Debug, Clone)]
pub enum SinkKind {
    Svid {
        select: SvidSelect,
        cert_path: PathBuf,
        key_path: PathBuf,
        bundle_path: Option<PathBuf>,
        /// Intermediates go to the bundle file instead of after the leaf.
        include_intermediates: bool,
        cert_mode: u32,
        key_mode: u32,
    },
    Secret {
        secret: SecretRef,
        path: PathBuf,
        mode: u32,
    },
    Credential {
        name: String,
        output: CredentialOutput,
        path: PathBuf,
        mode: u32,
    },
    Template {
        /// The template's text (from `template`, or read from `source` at start).
        text: String,
        /// The credentials it sees as `credentials[NAME]`.
        credentials: Vec<String>,
        path: PathBuf,
        mode: u32,
    },
    Env {
        vars: Vec<(String, ValueRef)>,
        path: PathBuf,
        mode: u32,
    },
}

/// Which of the agent's entries an svid sink writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvidSelect {
    SpiffeId(SpiffeId),
    Hint(String),
}

/// What happens after a sink's files changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnChange {
    Nothing,
    /// Run this program (argv, no shell), without waiting for it.
    Command(Vec<String>),
    Signal {
        signal: Signal,
        target: PidSource,
    },
    /// Restart the child the agent supervises (`[exec]` in agent.toml).
    Restart,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidSource {
    Pid(i32),
    /// Read at every change, so a restarted app is still found.
    PidFile(PathBuf),
}

/// Secrets and keys are for the app alone; certificates and bundles are public.
const SECRET_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

impl Sink {
    /// Checks one `[[sink]]` table. `has_supervisor` says whether `on_change = "restart"`
    /// has a child to restart.
    pub fn from_config(config: &SinkConfig, has_supervisor: bool) -> Result<Self, SinkConfigError> {
        let kind = kind_of(config)?;
        let label = config.name.clone().unwrap_or_else(|| match &kind {
            SinkKind::Svid { cert_path, .. } => cert_path.display().to_string(),
            SinkKind::Secret { path, .. }
            | SinkKind::Credential { path, .. }
            | SinkKind::Template { path, .. }
            | SinkKind::Env { path, .. } => path.display().to_string(),
        });
        let owner = config
            .owner
            .as_deref()
            .map(|o| resolve_id(o, Lookup::User))
            .transpose()?;
        let group = config
            .group
            .as_deref()
            .map(|g| resolve_id(g, Lookup::Group))
            .transpose()?;
        let on_change = on_change_of(config, has_supervisor)?;
        let on_revoke = match config.on_revoke.as_deref() {
            None | Some("remove") => OnRevoke::Remove,
            Some("blank") => OnRevoke::Blank,
            Some(other) => return Err(SinkConfigError::OnRevoke(other.to_owned())),
        };
        let holder = holder_of(config, &kind)?;
        Ok(Self {
            label,
            name: config.name.clone(),
            kind,
            owner,
            group,
            on_change,
            on_revoke,
            until_granted: config.until_granted,
            holder,
        })
    }

    /// The credentials this sink writes, by name.
    pub fn credential_names(&self) -> Vec<&str> {
        match &self.kind {
            SinkKind::Credential { name, .. } => vec![name.as_str()],
            SinkKind::Template { credentials, .. } => {
                credentials.iter().map(String::as_str).collect()
            }
            SinkKind::Env { vars, .. } => vars
                .iter()
                .filter_map(|(_, r)| match r {
                    ValueRef::Credential(c) => Some(c.name.as_str()),
                    ValueRef::Secret(_) => None,
                })
                .collect(),
            SinkKind::Svid { .. } | SinkKind::Secret { .. } => Vec::new(),
        }
    }

    /// What the credential cache is asked for on this sink's behalf.
    pub fn credential_keys(&self) -> Vec<CredentialKey> {
        let Some(holder) = &self.holder else {
            return Vec::new();
        };
        let mut names = self.credential_names();
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .map(|name| CredentialKey {
                spiffe_id: holder.spiffe_id.clone(),
                name: name.to_string(),
                ttl_seconds: holder.ttl_seconds,
            })
            .collect()
    }

    /// Every file this sink writes.
    pub fn paths(&self) -> Vec<&Path> {
        match &self.kind {
            SinkKind::Svid {
                cert_path,
                key_path,
                bundle_path,
                ..
            } => {
                let mut paths = vec![cert_path.as_path(), key_path.as_path()];
                paths.extend(bundle_path.as_deref());
                paths
            }
            SinkKind::Secret { path, .. }
            | SinkKind::Credential { path, .. }
            | SinkKind::Template { path, .. }
            | SinkKind::Env { path, .. } => vec![path.as_path()],
        }
    }
}

/// Checks every sink and what they have in common: unique names, no two writing one file.
pub fn check_all(configs: &[SinkConfig], has_supervisor: bool) -> Result<Vec<Sink>, SinkSetError> {
    let mut sinks = Vec::with_capacity(configs.len());
    for (i, config) in configs.iter().enumerate() {
        let sink =
            Sink::from_config(config, has_supervisor).map_err(|source| SinkSetError::Sink {
                number: i + 1,
                source,
            })?;
        sinks.push(sink);
    }
    let mut seen_paths = std::collections::BTreeMap::new();
    let mut seen_names = std::collections::BTreeSet::new();
    for sink in &sinks {
        if let Some(name) = &sink.name
            && !seen_names.insert(name.clone())
        {
            return Err(SinkSetError::DuplicateName(name.clone()));
        }
        for path in sink.paths() {
            if let Some(other) = seen_paths.insert(path.to_path_buf(), sink.label.clone()) {
                return Err(SinkSetError::SamePath {
                    first: other,
                    second: sink.label.clone(),
                    path: path.to_path_buf(),
                });
            }
        }
    }
    // Templates see every svid sink's paths; compile them now against that context's shape.
    for sink in &sinks {
        if let SinkKind::Template { text, .. } = &sink.kind {
            render::compile_check(&sink.label, text).map_err(SinkSetError::Template)?;
        }
    }
    Ok(sinks)
}

fn kind_of(c: &SinkConfig) -> Result<SinkKind, SinkConfigError> {
    let only_for = |key: &'static str, present: bool, kinds: &'static str| {
        if present {
            Err(SinkConfigError::OnlyForKind { key, kinds })
        } else {
            Ok(())
        }
    };
    // spiffe_id also names who obtains a sink's credentials (holder_of).
    let svid_keys = c.hint.is_some()
        || c.cert_path.is_some()
        || c.key_path.is_some()
        || c.bundle_path.is_some()
        || c.include_intermediates
        || c.cert_mode.is_some();
    if c.kind != SinkKindName::Svid {
        only_for(
            "hint/cert_path/key_path/bundle_path/include_intermediates/cert_mode",
            svid_keys,
            "\"svid\"",
        )?;
    }
    if c.kind != SinkKindName::Credential {
        only_for(
            "credential/field/format",
            c.credential.is_some() || c.field.is_some() || c.format.is_some(),
            "\"credential\"",
        )?;
    }
    if c.kind != SinkKindName::Secret {
        only_for("secret", c.secret.is_some(), "\"secret\"")?;
    }
    if c.kind != SinkKindName::Template {
        only_for(
            "template/source/credentials",
            c.template.is_some() || c.source.is_some() || c.credentials.is_some(),
            "\"template\"",
        )?;
    }
    if c.kind != SinkKindName::Env {
        only_for("vars", c.vars.is_some(), "\"env\"")?;
    }
    let mode = parse_mode(c.mode.as_deref(), SECRET_MODE)?;
    let file_path = || -> Result<PathBuf, SinkConfigError> {
        let path = c.path.clone().ok_or(SinkConfigError::PathRequired)?;
        absolute("path", path)
    };
    match c.kind {
        SinkKindName::Svid => {
            only_for(
                "path",
                c.path.is_some(),
                "secret, credential, template or env (svid sinks take cert_path, key_path and bundle_path)",
            )?;
            let select = match (&c.spiffe_id, &c.hint) {
                (Some(id), None) => SvidSelect::SpiffeId(
                    SpiffeId::parse(id).map_err(|source| SinkConfigError::SpiffeId { source })?,
                ),
                (None, Some(hint)) if !hint.is_empty() => SvidSelect::Hint(hint.clone()),
                _ => return Err(SinkConfigError::SvidSelect),
            };
            Ok(SinkKind::Svid {
                select,
                cert_path: absolute(
                    "cert_path",
                    c.cert_path
                        .clone()
                        .ok_or(SinkConfigError::Required("cert_path"))?,
                )?,
                key_path: absolute(
                    "key_path",
                    c.key_path
                        .clone()
                        .ok_or(SinkConfigError::Required("key_path"))?,
                )?,
                bundle_path: c
                    .bundle_path
                    .clone()
                    .map(|p| absolute("bundle_path", p))
                    .transpose()?,
                include_intermediates: c.include_intermediates,
                cert_mode: parse_mode(c.cert_mode.as_deref(), CERT_MODE)?,
                key_mode: mode,
            })
        }
        SinkKindName::Secret => {
            let name = c
                .secret
                .as_deref()
                .ok_or(SinkConfigError::Required("secret"))?;
            // `secret = "orders-db"` and `secret = "secret:orders-db:username"` both work.
            let reference = if name.starts_with("secret:") {
                name.to_string()
            } else {
                format!("secret:{name}")
            };
            let secret = reference
                .parse()
                .map_err(|source| SinkConfigError::Secret { source })?;
            Ok(SinkKind::Secret {
                secret,
                path: file_path()?,
                mode,
            })
        }
        SinkKindName::Credential => {
            let name = c
                .credential
                .clone()
                .ok_or(SinkConfigError::Required("credential"))?;
            check_credential_name(&name)?;
            let output = match (c.field.as_deref(), c.format.as_deref()) {
                (Some(_), Some(_)) => return Err(SinkConfigError::FieldAndFormat),
                (Some(field), None) => {
                    format!("credential:{name}:{field}")
                        .parse::<crate::secret_ref::CredentialRef>()
                        .map_err(|_| SinkConfigError::Field(field.to_owned()))?;
                    CredentialOutput::Field(field.to_owned())
                }
                (None, None | Some("json")) => CredentialOutput::Json,
                (None, Some("env")) => CredentialOutput::Env,
                (None, Some("aws")) => CredentialOutput::AwsProfile,
                (None, Some(other)) => return Err(SinkConfigError::Format(other.to_owned())),
            };
            Ok(SinkKind::Credential {
                name,
                output,
                path: file_path()?,
                mode,
            })
        }
        SinkKindName::Template => {
            let text = match (&c.template, &c.source) {
                (Some(text), None) => text.clone(),
                (None, Some(path)) => std::fs::read_to_string(path).map_err(|source| {
                    SinkConfigError::TemplateSource {
                        path: path.clone(),
                        source,
                    }
                })?,
                _ => return Err(SinkConfigError::TemplateText),
            };
            let credentials = c.credentials.clone().unwrap_or_default();
            for name in &credentials {
                check_credential_name(name)?;
            }
            Ok(SinkKind::Template {
                text,
                credentials,
                path: file_path()?,
                mode,
            })
        }
        SinkKindName::Env => {
            let vars = c.vars.as_ref().ok_or(SinkConfigError::Required("vars"))?;
            if vars.is_empty() {
                return Err(SinkConfigError::NoVars);
            }
            let vars = vars
                .iter()
                .map(|(key, reference)| {
                    check_env_name(key)?;
                    let reference = reference.parse::<ValueRef>().map_err(|source| {
                        SinkConfigError::VarReference {
                            key: key.clone(),
                            source,
                        }
                    })?;
                    Ok((key.clone(), reference))
                })
                .collect::<Result<Vec<_>, SinkConfigError>>()?;
            Ok(SinkKind::Env {
                vars,
                path: file_path()?,
                mode,
            })
        }
    }
}

fn check_credential_name(name: &str) -> Result<(), SinkConfigError> {
    format!("credential:{name}:value")
        .parse::<crate::secret_ref::CredentialRef>()
        .map(|_| ())
        .map_err(|_| SinkConfigError::CredentialName(name.to_owned()))
}

/// Who the sink's credentials are obtained as: `spiffe_id` (one of the agent's
/// identities), required exactly when the sink names a credential; and `ttl`.
fn holder_of(c: &SinkConfig, kind: &SinkKind) -> Result<Option<Holder>, SinkConfigError> {
    let uses_credentials = match kind {
        SinkKind::Svid { .. } => return Ok(None),
        SinkKind::Credential { .. } => true,
        SinkKind::Template { credentials, .. } => !credentials.is_empty(),
        SinkKind::Env { vars, .. } => vars
            .iter()
            .any(|(_, r)| matches!(r, ValueRef::Credential(_))),
        SinkKind::Secret { .. } => false,
    };
    match (&c.spiffe_id, uses_credentials) {
        (None, false) => {
            if c.ttl.is_some() {
                return Err(SinkConfigError::TtlWithoutCredential);
            }
            Ok(None)
        }
        (Some(_), false) => Err(SinkConfigError::HolderWithoutCredential),
        (None, true) => Err(SinkConfigError::HolderRequired),
        (Some(id), true) => {
            let spiffe_id =
                SpiffeId::parse(id).map_err(|source| SinkConfigError::SpiffeId { source })?;
            let ttl_seconds = match c.ttl.as_deref() {
                None => 0,
                Some(text) => {
                    let ttl = crate::credentials::parse_ttl(text)
                        .map_err(|e| SinkConfigError::Ttl(e.to_string()))?;
                    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)
                }
            };
            Ok(Some(Holder {
                spiffe_id,
                ttl_seconds,
            }))
        }
    }
}

fn on_change_of(c: &SinkConfig, has_supervisor: bool) -> Result<OnChange, SinkConfigError> {
    let what = c.on_change.as_deref().unwrap_or("none");
    let unused = |key: &'static str, present: bool| {
        if present {
            Err(SinkConfigError::NeedsOnChange {
                key,
                needs: match key {
                    "command" => "command",
                    _ => "signal",
                },
            })
        } else {
            Ok(())
        }
    };
    if what != "command" {
        unused("command", c.command.is_some())?;
    }
    if what != "signal" {
        unused("signal", c.signal.is_some())?;
        unused("pid", c.pid.is_some())?;
        unused("pid_file", c.pid_file.is_some())?;
    }
    match what {
        "none" => Ok(OnChange::Nothing),
        "command" => {
            let command = c
                .command
                .clone()
                .filter(|argv| !argv.is_empty() && !argv[0].is_empty())
                .ok_or(SinkConfigError::CommandMissing)?;
            Ok(OnChange::Command(command))
        }
        "signal" => {
            let signal = c
                .signal
                .as_deref()
                .ok_or(SinkConfigError::SignalMissing)?
                .parse::<Signal>()?;
            let target = match (c.pid, &c.pid_file) {
                (Some(pid), None) if pid > 0 => PidSource::Pid(pid),
                (None, Some(file)) => PidSource::PidFile(absolute("pid_file", file.clone())?),
                _ => return Err(SinkConfigError::SignalTarget),
            };
            Ok(OnChange::Signal { signal, target })
        }
        "restart" if has_supervisor => Ok(OnChange::Restart),
        "restart" => Err(SinkConfigError::NoChildToRestart),
        other => Err(SinkConfigError::OnChange(other.to_owned())),
    }
}

fn absolute(key: &'static str, path: PathBuf) -> Result<PathBuf, SinkConfigError> {
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(SinkConfigError::NotAbsolute { key, path });
    }
    Ok(path)
}

/// Octal, as chmod takes it: "0600", "640".
fn parse_mode(text: Option<&str>, default: u32) -> Result<u32, SinkConfigError> {
    let Some(text) = text else {
        return Ok(default);
    };
    match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(SinkConfigError::Mode(text.to_owned())),
    }
}

/// The names systemd's EnvironmentFile= and shells accept.
pub fn check_env_name(name: &str) -> Result<(), InvalidEnvName> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(InvalidEnvName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Lookup {
    User,
    Group,
}

/// A numeric id, or a user or group name looked up now (a sink for a user that does not
/// exist is a configuration error, not something to retry).
fn resolve_id(text: &str, lookup: Lookup) -> Result<u32, SinkConfigError> {
    if let Ok(id) = text.parse::<u32>() {
        return Ok(id);
    }
    let (key, kind) = match lookup {
        Lookup::User => ("owner", "user"),
        Lookup::Group => ("group", "group"),
    };
    let name = CString::new(text).map_err(|_| SinkConfigError::NotAName {
        key,
        text: text.to_owned(),
    })?;
    let found = match lookup {
        Lookup::User => sys::user_id(&name),
        Lookup::Group => sys::group_id(&name),
    };
    // A failed lookup (NSS unreachable, say) is reported as the name not being found, as
    // the agent cannot start without knowing who owns the files either way.
    found
        .ok()
        .flatten()
        .ok_or_else(|| SinkConfigError::NoSuchId {
            key,
            text: text.to_owned(),
            kind,
        })
}

/// `[[sink]]` tables from TOML text, checked, for the tests of this module and its children.
#[cfg(test)]
pub(crate) fn parse_for_tests(toml_text: &str) -> Result<Vec<Sink>, SinkSetError> {
    #[derive(Deserialize)]
    struct File {
        sink: Vec<SinkConfig>,
    }
    // Every test writes valid TOML; what it checks is what `check_all` makes of it.
    let file: File = toml::from_str(toml_text).unwrap_or_else(|e| panic!("test TOML: {e}"));
    check_all(&file.sink, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_sinks_say_whose_credential_and_take_one_form() {
        let app = "spiffe://example.org/app";
        let ok = parse_for_tests(&format!(
            "[[sink]]\nkind = \"credential\"\ncredential = \"orders-db\"\nspiffe_id = \"{app}\"\nttl = \"30m\"\npath = \"/x/db\"\n"
        ))
        .unwrap();
        let keys = ok[0].credential_keys();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].ttl_seconds, 1800);
        assert_eq!(keys[0].spiffe_id.as_str(), app);
        let cases = [
            (
                "kind = \"credential\"\ncredential = \"orders-db\"\npath = \"/x/db\"".to_string(),
                "`spiffe_id` must say",
            ),
            (
                format!("kind = \"credential\"\ncredential = \"orders-db\"\nspiffe_id = \"{app}\"\nfield = \"password\"\nformat = \"env\"\npath = \"/x/db\""),
                "not both",
            ),
            (
                format!("kind = \"credential\"\ncredential = \"orders-db\"\nspiffe_id = \"{app}\"\nformat = \"yaml\"\npath = \"/x/db\""),
                "format `yaml`",
            ),
            (
                format!("kind = \"credential\"\ncredential = \"orders-db\"\nspiffe_id = \"{app}\"\nttl = \"500ms\"\npath = \"/x/db\""),
                "whole seconds",
            ),
            (
                format!("kind = \"secret\"\nsecret = \"db\"\nspiffe_id = \"{app}\"\npath = \"/x/db\""),
                "writes none",
            ),
            (
                "kind = \"env\"\npath = \"/x/db\"\nvars = { U = \"credential:orders-db:username\" }".to_string(),
                "`spiffe_id` must say",
            ),
            (
                "kind = \"env\"\npath = \"/x/db\"\nvars = { U = \"credential:orders-db\" }".to_string(),
                "credential:NAME:FIELD",
            ),
            (
                "kind = \"secret\"\ncredential = \"orders-db\"\nsecret = \"db\"\npath = \"/x/db\"".to_string(),
                "only for kind = \"credential\"",
            ),
        ];
        for (table, expected) in cases {
            let err = parse_for_tests(&format!("[[sink]]\n{table}\n"))
                .err()
                .unwrap_or_else(|| panic!("accepted: {table}"))
                .to_string();
            assert!(err.contains(expected), "{table}: {err}");
        }
    }

    fn parse(toml_text: &str) -> Result<Vec<Sink>, SinkSetError> {
        parse_for_tests(toml_text)
    }

    #[test]
    fn every_kind_parses_with_its_defaults() {
        let sinks = parse(
            r#"
            [[sink]]
            kind = "svid"
            name = "web"
            spiffe_id = "spiffe://example.org/web"
            cert_path = "/tmp/x/svid.pem"
            key_path = "/tmp/x/svid.key"
            bundle_path = "/tmp/x/bundle.pem"
            [[sink]]
            kind = "secret"
            secret = "orders-db"
            path = "/tmp/x/pw"
            on_change = "signal"
            signal = "HUP"
            pid_file = "/run/app.pid"
            [[sink]]
            kind = "template"
            template = "{{ secrets['orders-db'].username }}"
            path = "/tmp/x/t"
            mode = "0640"
            owner = "0"
            group = "root"
            [[sink]]
            kind = "env"
            path = "/tmp/x/env"
            vars = { DB_PASSWORD = "secret:orders-db", DB_USER = "secret:orders-db:username" }
            on_change = "command"
            command = ["/bin/true"]
            "#,
        )
        .unwrap();
        assert_eq!(sinks.len(), 4);
        assert!(matches!(
            sinks[0].kind,
            SinkKind::Svid {
                cert_mode: 0o644,
                key_mode: 0o600,
                ..
            }
        ));
        assert!(matches!(
            sinks[1].kind,
            SinkKind::Secret { mode: 0o600, .. }
        ));
        assert!(matches!(
            sinks[2].kind,
            SinkKind::Template { mode: 0o640, .. }
        ));
        assert_eq!((sinks[2].owner, sinks[2].group), (Some(0), Some(0)));
        assert_eq!(
            sinks[1].on_change,
            OnChange::Signal {
                signal: Signal::HUP,
                target: PidSource::PidFile("/run/app.pid".into())
            }
        );
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (
                "kind = \"secret\"\nsecret = \"a\"\npath = \"rel/pw\"",
                "absolute path",
            ),
            (
                "kind = \"secret\"\npath = \"/x/pw\"",
                "`secret` is required",
            ),
            (
                "kind = \"secret\"\nsecret = \"a\"\npath = \"/x/pw\"\ncert_path = \"/x/c\"",
                "only for kind = \"svid\"",
            ),
            (
                "kind = \"template\"\ntemplate = \"{{ oops\"\npath = \"/x/t\"",
                "template",
            ),
            (
                "kind = \"env\"\npath = \"/x/e\"\nvars = { 1X = \"secret:a\" }",
                "not an environment variable name",
            ),
            (
                "kind = \"env\"\npath = \"/x/e\"\nvars = { X = \"a\" }",
                "is neither secret:NAME[:FIELD] nor credential:NAME:FIELD",
            ),
            (
                "kind = \"secret\"\nsecret = \"a\"\npath = \"/x/pw\"\nmode = \"999\"",
                "octal",
            ),
            (
                "kind = \"secret\"\nsecret = \"a\"\npath = \"/x/pw\"\nowner = \"no-such-user-here\"",
                "no such user",
            ),
            (
                "kind = \"secret\"\nsecret = \"a\"\npath = \"/x/pw\"\non_change = \"restart\"",
                "[exec]",
            ),
            (
                "kind = \"secret\"\nsecret = \"a\"\npath = \"/x/pw\"\non_change = \"signal\"\nsignal = \"HUP\"",
                "pid",
            ),
            (
                "kind = \"secret\"\nsecret = \"a\"\npath = \"/x/pw\"\nsignal = \"HUP\"",
                "needs on_change = \"signal\"",
            ),
            (
                "kind = \"svid\"\ncert_path = \"/x/c\"\nkey_path = \"/x/k\"",
                "exactly one of `spiffe_id` or `hint`",
            ),
        ];
        for (body, expected) in cases {
            let err = parse(&format!("[[sink]]\n{body}\n")).unwrap_err();
            assert!(err.to_string().contains(expected), "{body}: {err}");
        }
        let err = parse(
            "[[sink]]\nkind = \"secret\"\nsecret = \"a\"\npath = \"/x/pw\"\n[[sink]]\nkind = \"secret\"\nsecret = \"b\"\npath = \"/x/pw\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("both write /x/pw"), "{err}");
    }
}
