//! Keeps every sink's files equal to what the agent's state says they should hold: checks
//! them all before writing anything, rewrites a file only when its content differs (mode
//! and owner are put right either way), and fires a sink's change action once per change.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use mayfly_proto::fsutil;

use super::render::{RenderError, RenderedFile, render};
use super::{OnChange, PidSource, Sink};
use crate::exec::Update;
use crate::state::WorkloadState;

/// How often a pass that left a file unwritten is tried again without a state change.
const RETRY_EVERY: Duration = Duration::from_secs(5);

pub struct SinkRunner {
    sinks: Arc<Vec<Sink>>,
    /// The `[exec]` supervisor: told the secrets after every pass, and whether a sink with
    /// `on_change = "restart"` changed, in one message so that one change restarts once.
    exec: Option<mpsc::Sender<Update>>,
}

/// What one pass over the sinks did.
#[derive(Debug, Default)]
struct Pass {
    /// Indexes of the sinks whose files changed.
    changed: Vec<usize>,
    /// Per sink, why it could not be brought up to date.
    failures: HashMap<usize, String>,
}

impl SinkRunner {
    pub fn new(sinks: Vec<Sink>, exec: Option<mpsc::Sender<Update>>) -> Self {
        Self {
            sinks: Arc::new(sinks),
            exec,
        }
    }

    /// Waits for the daemon's first full state, checks that every sink can be rendered
    /// from it (a missing or ungranted secret, a template error: nothing is written and
    /// the error is returned), then keeps the files current until the state's publisher
    /// goes away.
    pub async fn run(
        self,
        mut state: watch::Receiver<Arc<WorkloadState>>,
    ) -> Result<(), RenderError> {
        let first = match state.wait_for(|s| s.synced).await {
            Ok(s) => s.clone(),
            Err(_) => return Ok(()),
        };
        for sink in self.sinks.iter() {
            render(sink, &self.sinks, &first)?;
        }
        if !self.sinks.is_empty() {
            tracing::info!(
                sinks = self.sinks.len(),
                "sinks checked against the first full state"
            );
        }
        let mut reported: HashMap<usize, String> = HashMap::new();
        loop {
            let current = state.borrow_and_update().clone();
            let sinks = self.sinks.clone();
            let written = current.clone();
            let pass = tokio::task::spawn_blocking(move || write_pass(&sinks, &written))
                .await
                .unwrap_or_default();
            let mut restart = false;
            for index in &pass.changed {
                restart |= self.fire(&self.sinks[*index]);
            }
            // After the files: the child starts (or restarts) with its files in place.
            if let Some(exec) = &self.exec {
                let update = Update {
                    secrets: current.secrets.clone(),
                    restart,
                };
                if exec.send(update).await.is_err() {
                    tracing::debug!("the supervised child is gone");
                }
            }
            for (index, why) in &pass.failures {
                // Once per distinct failure, not once per retry.
                if reported.get(index) != Some(why) {
                    tracing::error!(sink = %self.sinks[*index].label, error = %why, "sink not updated; the previous file is left as it was");
                }
            }
            let retry = !pass.failures.is_empty();
            reported = pass.failures;
            tokio::select! {
                changed = state.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = tokio::time::sleep(RETRY_EVERY), if retry => {}
            }
        }
    }

    /// Runs the sink's action; true when it is a restart of the supervised child.
    fn fire(&self, sink: &Sink) -> bool {
        tracing::info!(sink = %sink.label, "sink files updated");
        match &sink.on_change {
            OnChange::Nothing => {}
            OnChange::Command(argv) => {
                let mut command = tokio::process::Command::new(&argv[0]);
                command.args(&argv[1..]).kill_on_drop(false);
                match command.spawn() {
                    Ok(mut child) => {
                        let label = sink.label.clone();
                        tokio::spawn(async move {
                            match child.wait().await {
                                Ok(status) if status.success() => {}
                                Ok(status) => {
                                    tracing::warn!(sink = %label, %status, "the sink's change command failed")
                                }
                                Err(e) => {
                                    tracing::warn!(sink = %label, error = %e, "could not wait for the sink's change command")
                                }
                            }
                        });
                    }
                    Err(e) => {
                        tracing::error!(sink = %sink.label, program = %argv[0], error = %e, "could not run the sink's change command")
                    }
                }
            }
            OnChange::Signal { signal, target } => {
                let pid = match target {
                    PidSource::Pid(pid) => Ok(*pid),
                    PidSource::PidFile(file) => read_pid(file),
                };
                match pid.and_then(|pid| signal.send(pid).map(|()| pid)) {
                    Ok(pid) => {
                        tracing::info!(sink = %sink.label, pid, signal = %signal, "signalled the app")
                    }
                    Err(e) => {
                        tracing::error!(sink = %sink.label, signal = %signal, error = %e, "could not signal the app")
                    }
                }
            }
            OnChange::Restart => return true,
        }
        false
    }
}

/// Brings every sink's files up to date; blocking file I/O.
fn write_pass(sinks: &[Sink], state: &WorkloadState) -> Pass {
    let mut pass = Pass::default();
    for (index, sink) in sinks.iter().enumerate() {
        let files = match render(sink, sinks, state) {
            Ok(Some(files)) => files,
            Ok(None) => continue,
            Err(e) => {
                pass.failures.insert(index, e.to_string());
                continue;
            }
        };
        let mut changed = false;
        for file in &files {
            match sync_file(file, sink.owner, sink.group) {
                Ok(wrote) => changed |= wrote,
                Err(e) => {
                    pass.failures
                        .insert(index, format!("{}: {e}", file.path.display()));
                }
            }
        }
        if changed {
            pass.changed.push(index);
        }
    }
    pass
}

/// Makes `file.path` hold `file.contents` with its mode and owner. True when the content
/// was rewritten; an identical file is left alone (its mtime too) but for mode and owner.
fn sync_file(file: &RenderedFile, uid: Option<u32>, gid: Option<u32>) -> io::Result<bool> {
    let current = match std::fs::symlink_metadata(&file.path) {
        Ok(meta) if meta.file_type().is_file() => Some(meta),
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if let Some(meta) = current
        && meta.len() == file.contents.len() as u64
        && same_content(&file.path, &file.contents)?
    {
        if meta.mode() & 0o7777 != file.mode {
            std::fs::set_permissions(&file.path, std::fs::Permissions::from_mode(file.mode))?;
        }
        let wrong_owner =
            uid.is_some_and(|u| u != meta.uid()) || gid.is_some_and(|g| g != meta.gid());
        if wrong_owner {
            std::os::unix::fs::chown(&file.path, uid, gid)?;
            // chown may clear set-id bits; keep the mode exactly as configured.
            std::fs::set_permissions(&file.path, std::fs::Permissions::from_mode(file.mode))?;
        }
        return Ok(false);
    }
    fsutil::write_atomic_owned(&file.path, &file.contents, file.mode, uid, gid)?;
    Ok(true)
}

fn same_content(path: &Path, wanted: &[u8]) -> io::Result<bool> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(*zeroize::Zeroizing::new(bytes) == wanted),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn read_pid(file: &Path) -> io::Result<i32> {
    let text = std::fs::read_to_string(file)?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} does not hold a pid", file.display()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &Path, contents: &str, mode: u32) -> RenderedFile {
        RenderedFile {
            path: path.to_path_buf(),
            contents: zeroize::Zeroizing::new(contents.as_bytes().to_vec()),
            mode,
        }
    }

    #[test]
    fn rewrites_only_on_change_and_restores_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        assert!(sync_file(&file(&path, "one", 0o600), None, None).unwrap());
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(!sync_file(&file(&path, "one", 0o600), None, None).unwrap());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(
            meta.modified().unwrap(),
            mtime,
            "same content: not rewritten"
        );
        assert!(sync_file(&file(&path, "two", 0o640), None, None).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("pw");
        let err = sync_file(&file(&path, "one", 0o600), None, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!path.exists());
    }

    #[test]
    fn pid_files_are_read_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.pid");
        std::fs::write(&path, "1234\n").unwrap();
        assert_eq!(read_pid(&path).unwrap(), 1234);
        std::fs::write(&path, "nope").unwrap();
        assert!(
            read_pid(&path)
                .unwrap_err()
                .to_string()
                .contains("does not hold a pid")
        );
    }
}
