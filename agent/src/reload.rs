//! SIGHUP: the agent reads agent.toml again and applies what can change under a running
//! agent without a gap in service: the log level and the sinks. Everything else (the
//! daemon's address, the socket, the data directory, `[exec]`, …) is named as needing a
//! restart and left as it runs. A file that does not parse, or sinks that do not check,
//! change nothing.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use mayfly_common::process::{LogReload, changed_keys, reload_log_level};

use crate::config::AgentConfig;
use crate::credentials::CredentialKey;
use crate::sinks::Sink;

pub use mayfly_common::process::ReloadReport;

/// Keys a reload applies.
const RELOADABLE: [&str; 2] = ["log.level", "sink"];

/// Reloads the agent's configuration file on request.
pub struct Reloader {
    path: PathBuf,
    /// The file as the agent started with it: what "needs a restart" compares with.
    started: String,
    /// The file as last applied: what a reload compares with.
    applied: Mutex<String>,
    /// Where new sinks go; `None` when the agent runs without a sink runner.
    sinks: Option<watch::Sender<Arc<Vec<Sink>>>>,
    /// The credentials the agent fetches for its sinks and `[exec]`.
    fetched: HashSet<CredentialKey>,
}

impl Reloader {
    pub(crate) fn new(
        path: PathBuf,
        started: String,
        sinks: Option<watch::Sender<Arc<Vec<Sink>>>>,
        fetched: HashSet<CredentialKey>,
    ) -> Self {
        Self {
            path,
            applied: Mutex::new(started.clone()),
            started,
            sinks,
            fetched,
        }
    }

    /// Reads the file again and applies what can be applied; `Err` names why nothing was.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        let config = AgentConfig::parse(&text, &self.path).map_err(|e| e.to_string())?;
        let sinks = config.checked_sinks().map_err(|e| e.to_string())?;
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = changed_keys(&applied, &text);
        let mut report = ReloadReport::default();
        let mut waiting: BTreeSet<String> = changed_keys(&self.started, &text)
            .into_iter()
            .filter(|k| !RELOADABLE.contains(&k.as_str()))
            .collect();

        // Decide everything before changing anything.
        let new_sinks = if fresh.contains("sink") {
            match &self.sinks {
                None => {
                    waiting.insert("sink (the agent started without sinks)".into());
                    None
                }
                Some(tx) => {
                    let missing: BTreeSet<String> = sinks
                        .iter()
                        .flat_map(Sink::credential_keys)
                        .filter(|k| !self.fetched.contains(k))
                        .map(|k| format!("{} for {}", k.name, k.spiffe_id))
                        .collect();
                    if missing.is_empty() {
                        Some((tx, sinks))
                    } else {
                        let list: Vec<_> = missing.into_iter().collect();
                        waiting.insert(format!(
                            "sink (credentials the agent does not fetch yet: {})",
                            list.join(", ")
                        ));
                        None
                    }
                }
            }
        } else {
            None
        };
        if fresh.contains("log.level") {
            match reload_log_level(&config.log.level)? {
                LogReload::Applied => report.applied.push("log.level".into()),
                LogReload::OverriddenByEnv => report
                    .applied
                    .push("log.level (RUST_LOG is set and still decides)".into()),
            }
        }
        if let Some((tx, sinks)) = new_sinks {
            tx.send_replace(Arc::new(sinks));
            report.applied.push("sink".into());
        }
        report.needs_restart = waiting.into_iter().collect();
        *applied = text;
        Ok(report)
    }

    /// Reloads at every SIGHUP until the agent stops, logging what each reload did.
    pub async fn on_hangup(self: Arc<Self>) {
        mayfly_common::process::reload_on_hangups(|| self.reload()).await;
    }
}
