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

/// Logs to stderr as text or JSON; `RUST_LOG` overrides `level`.
pub fn init_logging(json: bool, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
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
