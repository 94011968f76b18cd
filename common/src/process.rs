//! What both binaries do the same way at their edges: load a TOML config file (reporting
//! a broken one with its path, line and key), set up logging, and wait for the signal to
//! stop.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The `[log]` table of daemon.toml and agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter, e.g. "info" or "mayfly_daemon=debug"; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// A config file that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Reads and parses `path`, then runs `check` on the result.
pub fn load_toml<T: DeserializeOwned, E: std::fmt::Display>(
    path: &Path,
    check: impl Fn(&T) -> Result<(), E>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, path, check)
}

/// Parses `text`; `origin` only names the file in errors.
pub fn parse_toml<T: DeserializeOwned, E: std::fmt::Display>(
    text: &str,
    origin: &Path,
    check: impl Fn(&T) -> Result<(), E>,
) -> Result<T, ConfigError> {
    let value: T = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_path_buf(),
        message: describe_toml_error(text, &e),
    })?;
    check(&value).map_err(|problem| ConfigError::Invalid {
        path: origin.to_path_buf(),
        message: problem.to_string(),
    })?;
    Ok(value)
}

/// toml's message with the line number first, so it survives being shown on one line.
pub fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().to_string();
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let snippet = text
                .get(span.clone())
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.len() <= 80)
                .map(|s| format!(" (at `{s}`)"))
                .unwrap_or_default();
            format!("line {line}: {message}{snippet}")
        }
        None => message,
    }
}

/// Replaces the running log filter; set once by [`init_logging`].
type FilterReload = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;
static FILTER_RELOAD: std::sync::OnceLock<FilterReload> = std::sync::OnceLock::new();

/// Logs to stderr as text or JSON; `RUST_LOG` overrides `level`. The level can be changed
/// later with [`reload_log_level`].
pub fn init_logging(json: bool, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    if json {
        let builder = tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = FILTER_RELOAD.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    } else {
        // Colours only on a terminal: a journal or a log file gets plain text.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = FILTER_RELOAD.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    }
}

/// What a log level reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogReload {
    Applied,
    /// `RUST_LOG` is set and keeps governing the filter.
    OverriddenByEnv,
}

/// Applies `level` (a tracing filter) to the running logger. A filter that does not parse
/// is refused with the parser's reason, and the running one stays.
pub fn reload_log_level(level: &str) -> Result<LogReload, String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("log.level {level:?} is not a valid filter: {e}"))?;
    if tracing_subscriber::EnvFilter::try_from_default_env().is_ok() {
        return Ok(LogReload::OverriddenByEnv);
    }
    let reload = FILTER_RELOAD
        .get()
        .ok_or_else(|| "logging was not set up to be reloaded".to_string())?;
    reload(filter).map(|()| LogReload::Applied)
}

/// The keys whose values differ between two TOML documents, dotted below the top level
/// for tables (`log.level`) and whole for arrays of tables (`sink`). A document that does
/// not parse compares as empty.
pub fn changed_keys(before: &str, after: &str) -> std::collections::BTreeSet<String> {
    fn walk(
        prefix: &str,
        a: Option<&toml::Value>,
        b: Option<&toml::Value>,
        out: &mut std::collections::BTreeSet<String>,
    ) {
        match (a, b) {
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                for key in a.keys().chain(b.keys()) {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, a.get(key), b.get(key), out);
                }
            }
            (a, b) if a != b => {
                out.insert(prefix.to_string());
            }
            _ => {}
        }
    }
    let parse = |text: &str| {
        toml::from_str::<toml::Table>(text)
            .map(toml::Value::Table)
            .unwrap_or_else(|_| toml::Value::Table(toml::Table::new()))
    };
    let mut out = std::collections::BTreeSet::new();
    walk("", Some(&parse(before)), Some(&parse(after)), &mut out);
    out
}

/// What a configuration reload (SIGHUP) did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys whose new values are in effect.
    pub applied: Vec<String>,
    /// Keys that differ from what the process started with and wait for a restart.
    pub needs_restart: Vec<String>,
}

/// Calls `reload` at every SIGHUP until the process ends, logging what each one did, or
/// why it changed nothing.
pub async fn reload_on_hangups(reload: impl Fn() -> Result<ReloadReport, String>) {
    hangups(|| match reload() {
        Ok(report) => tracing::info!(
            applied = ?report.applied,
            needs_restart = ?report.needs_restart,
            "configuration reloaded (SIGHUP)"
        ),
        Err(e) => {
            tracing::error!(error = %e, "configuration not reloaded (SIGHUP); the running one stays")
        }
    })
    .await;
}

/// Resolves at each SIGHUP; never resolves where the signal cannot be watched.
pub async fn hangups(mut each: impl FnMut()) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return std::future::pending().await;
    };
    while hup.recv().await.is_some() {
        each();
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

/// A serde `deserialize_with` for durations written as humantime strings ("90s", "10m").
pub fn duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<std::time::Duration, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration ({e}); write e.g. \"90s\", \"10m\", \"1h\", \"24h\""
        ))
    })
}

#[cfg(test)]
mod reload_tests {
    use super::*;

    #[test]
    fn changed_keys_names_what_differs_down_to_table_keys() {
        let before = "a = 1\n[log]\nlevel = \"info\"\nformat = \"text\"\n[[sink]]\nkind = \"x\"\n";
        let after =
            "a = 1\nb = 2\n[log]\nlevel = \"debug\"\nformat = \"text\"\n[[sink]]\nkind = \"y\"\n";
        let changed: Vec<_> = changed_keys(before, after).into_iter().collect();
        assert_eq!(changed, ["b", "log.level", "sink"]);
        assert!(changed_keys(before, before).is_empty());
    }

    #[test]
    fn a_filter_that_does_not_parse_is_refused_by_name() {
        let err = reload_log_level("info,=[").unwrap_err();
        assert!(
            err.contains("log.level") && err.contains("not a valid filter"),
            "{err}"
        );
    }
}
