//! SIGHUP: the daemon reads daemon.toml again and applies the log level; the policy engine
//! reloads its policy files on the same signal (see `policy`). Every other key that differs
//! from what the daemon started with is named as needing a restart. A file that does not
//! parse changes nothing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use mayfly_common::process::{LogReload, ReloadReport, changed_keys, reload_log_level};

use crate::config::DaemonConfig;

pub struct Reloader {
    path: PathBuf,
    started: String,
    applied: Mutex<String>,
}

impl Reloader {
    pub fn new(path: PathBuf, started: String) -> Self {
        Self {
            path,
            applied: Mutex::new(started.clone()),
            started,
        }
    }

    /// Reads the file again and applies what can be applied; `Err` names why nothing was.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        let config = DaemonConfig::parse(&text, &self.path).map_err(|e| e.to_string())?;
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = ReloadReport::default();
        if changed_keys(&applied, &text).contains("log.level") {
            match reload_log_level(&config.log.level)? {
                LogReload::Applied => report.applied.push("log.level".into()),
                LogReload::OverriddenByEnv => report
                    .applied
                    .push("log.level (RUST_LOG is set and still decides)".into()),
            }
        }
        // The policy engine reads its files again on the same signal.
        report.applied.push("policies".into());
        report.needs_restart = changed_keys(&self.started, &text)
            .into_iter()
            .filter(|k| k != "log.level")
            .collect();
        *applied = text;
        Ok(report)
    }

    /// Reloads at every SIGHUP until the daemon stops, logging what each reload did.
    pub async fn on_hangup(self: Arc<Self>) {
        mayfly_common::process::reload_on_hangups(|| self.reload()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_what_needs_a_restart_and_refuses_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.toml");
        let started = "trust_domain = \"example.org\"\n".to_string();
        std::fs::write(&path, &started).unwrap();
        let reloader = Reloader::new(path.clone(), started);
        std::fs::write(
            &path,
            "trust_domain = \"example.org\"\nnode_listen = \"127.0.0.1:9999\"\n",
        )
        .unwrap();
        let report = reloader.reload().unwrap();
        assert_eq!(report.applied, ["policies"]);
        assert_eq!(report.needs_restart, ["node_listen"]);
        std::fs::write(&path, "trust_domain = 5\n").unwrap();
        let err = reloader.reload().unwrap_err();
        assert!(err.contains("daemon.toml: line 1"), "{err}");
    }
}
