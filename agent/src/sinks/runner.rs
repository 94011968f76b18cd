//! Keeps every sink's files equal to what the agent's state says they should hold: checks
//! them all before writing anything, rewrites a file only when its content differs (mode
//! and owner are put right either way), and fires a sink's change action once per change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use mayfly_common::fsutil;

use super::render::{RenderError, RenderedFile, leases_of, render};
use super::{OnChange, OnRevoke, PidSource, Sink, SinkKind, SvidSelect};
use crate::credentials::{CredentialKey, HeldCredentials};
use crate::exec::Update;
use crate::ops::AgentMetrics;
use crate::state::WorkloadState;

/// How often a pass that left a file unwritten is tried again without a state change.
const RETRY_EVERY: Duration = Duration::from_secs(5);

pub struct SinkRunner {
    sinks: Arc<Vec<Sink>>,
    /// The `[exec]` supervisor: told the secrets after every pass, and whether a sink with
    /// `on_change = "restart"` changed, in one message so that one change restarts once.
    exec: Option<mpsc::Sender<Update>>,
    /// The credentials the `[exec]` child's environment names.
    exec_credentials: Vec<CredentialKey>,
    progress: watch::Sender<SinkProgress>,
    /// Counts each sink's writes and failures for the agent's operations endpoint.
    metrics: Arc<AgentMetrics>,
    /// A new set of sinks from a configuration reload (SIGHUP).
    reload: Option<watch::Receiver<Arc<Vec<Sink>>>>,
}

/// How far the sinks have caught up with the agent's state, and what they did about each
/// revocation: what the agent's acknowledgement reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkProgress {
    /// The `WorkloadState::version` the last finished pass wrote.
    pub applied: u64,
    /// Per revocation id.
    pub revocations: BTreeMap<String, RevocationEffects>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationEffects {
    pub removed: Vec<String>,
    pub blanked: Vec<String>,
    pub actions: Vec<String>,
    pub errors: Vec<String>,
}

/// What one pass over the sinks did.
#[derive(Debug, Default)]
struct Pass {
    /// Indexes of the sinks whose files changed.
    changed: Vec<usize>,
    /// Per sink, why it could not be brought up to date.
    failures: HashMap<usize, String>,
    /// Files removed or blanked because what they held was revoked.
    removed: Vec<String>,
    blanked: Vec<String>,
    /// Per sink that writes credentials, the leases its files hold now.
    written: HashMap<usize, Vec<String>>,
}

impl SinkRunner {
    pub fn new(sinks: Vec<Sink>, exec: Option<mpsc::Sender<Update>>) -> Self {
        Self {
            sinks: Arc::new(sinks),
            exec,
            exec_credentials: Vec::new(),
            progress: watch::channel(SinkProgress::default()).0,
            metrics: Arc::new(AgentMetrics::default()),
            reload: None,
        }
    }

    /// Takes each new set of sinks sent on `reload`: once every sink of it renders from the
    /// current state, it replaces the running set (files of a sink no longer configured
    /// are left as they are); otherwise the running set stays and the reason is logged.
    pub fn with_reload(mut self, reload: watch::Receiver<Arc<Vec<Sink>>>) -> Self {
        self.reload = Some(reload);
        self
    }

    /// Counts each sink's writes and failures into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The credentials to hand the `[exec]` child with every update.
    pub fn with_exec_credentials(mut self, keys: Vec<CredentialKey>) -> Self {
        self.exec_credentials = keys;
        self
    }

    /// Follows the passes; the revocation acknowledgements wait on it.
    pub fn progress(&self) -> watch::Receiver<SinkProgress> {
        self.progress.subscribe()
    }

    /// Waits for the daemon's first full state (and, when sinks write credentials, the
    /// first answers for them), checks that every sink can be rendered from it (a
    /// missing or ungranted secret, a refused credential, a template error: nothing is
    /// written and the error is returned), then keeps the files current until the
    /// state's publisher goes away.
    pub async fn run(
        mut self,
        mut state: watch::Receiver<Arc<WorkloadState>>,
        mut credentials: watch::Receiver<Arc<HeldCredentials>>,
    ) -> Result<(), RenderError> {
        let first = match state.wait_for(|s| s.synced).await {
            Ok(s) => s.clone(),
            Err(_) => return Ok(()),
        };
        let mut credentials_open = true;
        if self.sinks.iter().any(|s| s.holder.is_some()) || !self.exec_credentials.is_empty() {
            credentials_open = credentials.wait_for(|held| held.round > 0).await.is_ok();
        }
        let held = credentials.borrow().clone();
        for sink in self.sinks.iter() {
            match render(sink, &self.sinks, &first, &held) {
                Err(RenderError::NotGranted { .. }) if sink.until_granted => {}
                other => {
                    other?;
                }
            }
        }
        if !self.sinks.is_empty() {
            tracing::info!(
                sinks = self.sinks.len(),
                "sinks checked against the first full state"
            );
        }
        let mut reported: HashMap<usize, String> = HashMap::new();
        let mut written: HashMap<usize, Vec<String>> = HashMap::new();
        // Leases revoked while the credentials feed may still hold them: a revocation stops
        // being pending once acknowledged, possibly before the feed has a replacement.
        let mut revoked: HashSet<String> = HashSet::new();
        let mut reload = self.reload.take();
        let mut reload_open = reload.is_some();
        loop {
            let current = state.borrow_and_update().clone();
            let held = credentials.borrow_and_update().clone();
            let pending: HashSet<&String> = current
                .revocations
                .iter()
                .flat_map(|r| &r.message.lease_ids)
                .collect();
            revoked.extend(pending.iter().map(|l| (*l).clone()));
            revoked.retain(|l| pending.contains(l) || held.held.values().any(|c| c.lease_id == *l));
            let sinks = self.sinks.clone();
            let snapshot = current.clone();
            let before = std::mem::take(&mut written);
            let dead = revoked.clone();
            let for_exec = held.clone();
            let pass = tokio::task::spawn_blocking(move || {
                write_pass(&sinks, &snapshot, &held, &dead, before)
            })
            .await
            .unwrap_or_default();
            written = pass.written.clone();
            let mut restart = false;
            let mut actions = Vec::new();
            for index in &pass.changed {
                let sink = &self.sinks[*index];
                self.metrics.sink_written(&sink.label);
                restart |= self.fire(sink);
                if sink.on_change != OnChange::Nothing {
                    actions.push(format!("{}: {}", sink.label, describe(&sink.on_change)));
                }
            }
            // After the files: the child starts (or restarts) with its files in place.
            if let Some(exec) = &self.exec {
                let update = Update {
                    secrets: current.secrets.clone(),
                    credentials: self
                        .exec_credentials
                        .iter()
                        .filter_map(|key| {
                            let credential = for_exec.held.get(key)?;
                            (!revoked.contains(&credential.lease_id))
                                .then(|| (key.name.clone(), credential.clone()))
                        })
                        .collect(),
                    restart,
                };
                if exec.send(update).await.is_err() {
                    tracing::debug!("the supervised child is gone");
                }
            }
            self.progress.send_modify(|progress| {
                for revocation in &current.revocations {
                    progress
                        .revocations
                        .entry(revocation.message.id.clone())
                        .or_insert_with(|| RevocationEffects {
                            removed: pass.removed.clone(),
                            blanked: pass.blanked.clone(),
                            actions: actions.clone(),
                            errors: pass.failures.values().cloned().collect(),
                        });
                }
                progress
                    .revocations
                    .retain(|id, _| current.revocations.iter().any(|r| r.message.id == *id));
                progress.applied = current.version;
            });
            for (index, why) in &pass.failures {
                self.metrics.sink_failed(&self.sinks[*index].label);
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
                changed = credentials.changed(), if credentials_open => {
                    credentials_open = changed.is_ok();
                }
                _ = tokio::time::sleep(RETRY_EVERY), if retry => {}
                changed = async { reload.as_mut()?.changed().await.ok() }, if reload_open => {
                    match (changed, reload.as_ref()) {
                        (Some(()), Some(reload)) => {
                            let next = reload.borrow().clone();
                            if self.take_reloaded(next, &state.borrow(), &credentials.borrow()) {
                                written.clear();
                                reported.clear();
                            }
                        }
                        _ => reload_open = false,
                    }
                }
            }
        }
    }

    /// Replaces the sinks with `next` when each renders from `state` and `held`; true when
    /// it did.
    fn take_reloaded(
        &mut self,
        next: Arc<Vec<Sink>>,
        state: &Arc<WorkloadState>,
        held: &Arc<HeldCredentials>,
    ) -> bool {
        for sink in next.iter() {
            match render(sink, &next, state, held) {
                Ok(_) => {}
                Err(RenderError::NotGranted { .. }) if sink.until_granted => {}
                Err(e) => {
                    tracing::error!(sink = %sink.label, error = %e, "reloaded sinks not applied: this one cannot be rendered; the running sinks stay");
                    return false;
                }
            }
        }
        let kept: HashSet<&str> = next.iter().map(|s| s.label.as_str()).collect();
        for gone in self
            .sinks
            .iter()
            .filter(|s| !kept.contains(s.label.as_str()))
        {
            tracing::info!(sink = %gone.label, "sink no longer configured; its files are left as they are");
        }
        tracing::info!(sinks = next.len(), "sinks reloaded");
        self.sinks = next;
        true
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

fn describe(action: &OnChange) -> String {
    match action {
        OnChange::Nothing => "nothing".into(),
        OnChange::Command(argv) => format!("ran {}", argv[0]),
        OnChange::Signal { signal, .. } => format!("sent {signal}"),
        OnChange::Restart => "restarted the supervised child".into(),
    }
}

/// The files of `sink` that hold something revoked, if any: every file once everything
/// is revoked; an svid sink's files when its identity's entry was revoked.
fn revoked_paths<'a>(sink: &'a Sink, state: &WorkloadState) -> Option<Vec<&'a Path>> {
    if state.revoked_all {
        return Some(sink.paths());
    }
    let SinkKind::Svid {
        select, cert_path, ..
    } = &sink.kind
    else {
        return None;
    };
    let served = state.entries.iter().any(|e| match select {
        SvidSelect::SpiffeId(id) => e.spiffe_id == *id,
        SvidSelect::Hint(hint) => e.hint == *hint,
    });
    if served || state.revoked_ids.is_empty() {
        return None;
    }
    let revoked = match select {
        SvidSelect::SpiffeId(id) => state.revoked_ids.contains(id.as_str()),
        // Which identity the files hold: the certificate on disk says.
        SvidSelect::Hint(_) => std::fs::read_to_string(cert_path)
            .ok()
            .and_then(|pem| mayfly_common::svid::parse_pem_certs(&pem).ok())
            .and_then(|certs| certs.into_iter().next())
            .and_then(|leaf| mayfly_common::tls::peer_identity(&leaf).ok())
            .is_some_and(|id| state.revoked_ids.contains(id.spiffe_id.as_str())),
    };
    revoked.then(|| sink.paths())
}

/// Removes or blanks one file; true when it changed.
fn revoke_file(path: &Path, how: OnRevoke, uid: Option<u32>, gid: Option<u32>) -> io::Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match how {
        OnRevoke::Remove => {
            std::fs::remove_file(path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(true)
        }
        OnRevoke::Blank if meta.len() == 0 => Ok(false),
        OnRevoke::Blank => {
            fsutil::write_atomic_owned(path, b"", meta.mode() & 0o7777, uid, gid)?;
            Ok(true)
        }
    }
}

/// Removes or blanks the files of a sink whose content is revoked.
fn revoke_sink(index: usize, sink: &Sink, paths: &[&Path], pass: &mut Pass) {
    let mut changed = false;
    for path in paths {
        match revoke_file(path, sink.on_revoke, sink.owner, sink.group) {
            Ok(true) => {
                changed = true;
                let shown = path.display().to_string();
                match sink.on_revoke {
                    OnRevoke::Remove => pass.removed.push(shown),
                    OnRevoke::Blank => pass.blanked.push(shown),
                }
            }
            Ok(false) => {}
            Err(e) => {
                pass.failures
                    .insert(index, format!("{}: {e}", path.display()));
            }
        }
    }
    if changed {
        tracing::warn!(sink = %sink.label, "revoked: sink files removed or blanked");
        pass.changed.push(index);
    }
}

/// Whether the credentials a sink's files hold (`written`) or would hold (`using`) are
/// revoked with nothing to replace them: a lease in `revoked`, or, the holder refused
/// now, anything written before.
fn credentials_revoked(
    using: &[String],
    written: &[String],
    rendered: &Result<Option<Vec<RenderedFile>>, RenderError>,
    revoked: &HashSet<String>,
) -> bool {
    let dead = |lease: &String| revoked.contains(lease);
    if using.iter().any(dead) {
        return true;
    }
    match rendered {
        Ok(Some(_)) => false,
        Err(RenderError::CredentialRefused { .. }) => !written.is_empty(),
        _ => written.iter().any(dead),
    }
}

/// Brings every sink's files up to date; blocking file I/O. `revoked` are the leases not
/// to write (nor leave written), `written` what the last pass left in credential sinks'
/// files.
fn write_pass(
    sinks: &[Sink],
    state: &WorkloadState,
    held: &HeldCredentials,
    revoked: &HashSet<String>,
    written: HashMap<usize, Vec<String>>,
) -> Pass {
    let mut pass = Pass {
        written,
        ..Pass::default()
    };
    for (index, sink) in sinks.iter().enumerate() {
        // What the sink should hold, unless what it holds is revoked: its identity or
        // everything (checked first), or its secret, revoked with the entries it was
        // granted to (found when rendering fails on it), or its credential's lease.
        let using = leases_of(sink, held);
        let rendered = match revoked_paths(sink, state) {
            Some(paths) => Err(paths),
            None => match render(sink, sinks, state, held) {
                Err(RenderError::NotGranted { secret, .. })
                    if state.revoked_secrets.contains(&secret) =>
                {
                    Err(sink.paths())
                }
                // Waiting for an elevation to grant it: nothing to write yet.
                Err(RenderError::NotGranted { .. }) if sink.until_granted => Ok(Ok(None)),
                other if sink.holder.is_some() => {
                    let before = pass.written.get(&index).map_or(&[][..], Vec::as_slice);
                    if credentials_revoked(&using, before, &other, revoked) {
                        Err(sink.paths())
                    } else {
                        Ok(other)
                    }
                }
                other => Ok(other),
            },
        };
        if rendered.is_err() {
            pass.written.remove(&index);
        }
        let files = match rendered {
            Ok(Ok(Some(files))) => files,
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => {
                pass.failures.insert(index, e.to_string());
                continue;
            }
            Err(paths) => {
                revoke_sink(index, sink, &paths, &mut pass);
                continue;
            }
        };
        let mut changed = false;
        let mut complete = true;
        for file in &files {
            match sync_file(file, sink.owner, sink.group) {
                Ok(wrote) => changed |= wrote,
                Err(e) => {
                    complete = false;
                    pass.failures
                        .insert(index, format!("{}: {e}", file.path.display()));
                }
            }
        }
        if complete && sink.holder.is_some() {
            pass.written.insert(index, using);
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

    #[test]
    fn a_revoked_lease_leaves_the_files_unless_a_new_one_replaces_it() {
        // Revoked: pending now, or acknowledged while the feed still held it.
        let leases = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let revoked: HashSet<String> = ["ls-old".to_string()].into();
        let files = Ok(Some(Vec::new()));
        let waiting = Ok(None);
        let refused = Err(RenderError::CredentialRefused {
            sink: "s".into(),
            credential: "c".into(),
            why: "not granted".into(),
        });
        // Would write the revoked lease: out.
        assert!(credentials_revoked(
            &leases(&["ls-old"]),
            &[],
            &files,
            &revoked
        ));
        // Wrote it, the replacement not here yet: out.
        assert!(credentials_revoked(
            &[],
            &leases(&["ls-old"]),
            &waiting,
            &revoked
        ));
        // Wrote it, the replacement is here: written over, not removed.
        assert!(!credentials_revoked(
            &leases(&["ls-new"]),
            &leases(&["ls-old"]),
            &files,
            &revoked
        ));
        // The holder is refused now: what it wrote goes, whatever its lease.
        assert!(credentials_revoked(
            &[],
            &leases(&["ls-live"]),
            &refused,
            &revoked
        ));
        assert!(!credentials_revoked(&[], &[], &refused, &revoked));
        assert!(!credentials_revoked(
            &[],
            &leases(&["ls-live"]),
            &waiting,
            &revoked
        ));
    }
}
