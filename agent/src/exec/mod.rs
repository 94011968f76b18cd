//! The supervisor behind `mayfly-agent exec`: starts an app with granted secrets and
//! TTL-bound credentials in its environment once they are all there, forwards signals to it, restarts it gracefully
//! (or signals it) exactly once per change of what it was given, and reports its exit code.
//! Where they come from is the caller's business: a channel of snapshots. A credential's
//! lease renewed keeps its values, so it restarts nothing; a new lease does.

mod client;
mod signal;

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal as unix_signal};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::cli::endpoint::WorkloadEndpoint;
use crate::credentials::Credential;
use crate::secret_ref::{CredentialRef, SecretRef};
use crate::state::SecretView;

pub use client::{EnvPairError, ExecArgs, parse_env_file, run as run_cli};
pub use signal::{Signal, UnknownSignal};

/// The secrets a workload may have right now, by name.
pub type Snapshot = BTreeMap<String, Arc<SecretView>>;

/// The credentials a workload holds right now, by definition name.
pub type HeldByName = BTreeMap<String, Arc<Credential>>;

/// What the supervisor is told on every change.
#[derive(Debug, Clone)]
pub struct Update {
    pub secrets: Snapshot,
    pub credentials: HeldByName,
    /// Restart even if the child's own values did not change (a sink it reads did).
    /// One update restarts at most once, however many reasons it carries.
    pub restart: bool,
}

/// One environment variable for the child: a granted secret's field, a credential's
/// value, or a literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    Secret(SecretRef),
    Credential(CredentialRef),
    Literal(String),
}

impl EnvValue {
    /// `secret:NAME[:FIELD]` and `credential:NAME:FIELD` are references; anything else is
    /// taken as it is.
    pub fn parse(value: &str) -> Result<Self, crate::secret_ref::SecretRefError> {
        if value.starts_with("secret:") {
            Ok(Self::Secret(value.parse()?))
        } else if value.starts_with("credential:") {
            Ok(Self::Credential(value.parse()?))
        } else {
            Ok(Self::Literal(value.to_string()))
        }
    }
}

/// The credential names `vars` refer to, each once.
pub fn credential_names(vars: &[(String, EnvValue)]) -> Vec<String> {
    let mut names: Vec<String> = vars
        .iter()
        .filter_map(|(_, v)| match v {
            EnvValue::Credential(r) => Some(r.name.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// What a change of the child's secrets does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeAction {
    /// Stop it (stop signal, then SIGKILL after the timeout) and start it with the new values.
    Restart,
    /// Send it this signal; it re-reads its credentials itself (from a sink file, say).
    Signal(Signal),
    /// Leave it alone.
    Nothing,
}

/// Why an `on_change` value is not a [`ChangeAction`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeActionError {
    #[error("`{0}` is not restart, none or signal:NAME (signal:HUP)")]
    Unknown(String),
    #[error(transparent)]
    Signal(#[from] UnknownSignal),
}

impl std::str::FromStr for ChangeAction {
    type Err = ChangeActionError;

    /// "restart", "none" or "signal:NAME", as `--on-change` and `[exec] on_change` take it.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "restart" => Ok(Self::Restart),
            "none" => Ok(Self::Nothing),
            other => match other.strip_prefix("signal:") {
                Some(name) => Ok(Self::Signal(name.parse()?)),
                None => Err(ChangeActionError::Unknown(other.to_owned())),
            },
        }
    }
}

/// How to run the child.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub program: String,
    pub args: Vec<String>,
    pub vars: Vec<(String, EnvValue)>,
    /// Set in the child's environment so it can reach the Workload API too.
    pub endpoint: Option<WorkloadEndpoint>,
    pub on_change: ChangeAction,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    /// How long to wait for every referenced secret before giving up at start.
    pub first_wait: Duration,
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(
        "{names} not granted to this workload after {waited:?}: define `grants` on the secret or credential for a SPIFFE ID whose entry matches this process"
    )]
    NotGranted { names: String, waited: Duration },
    #[error("{reference}: {source}")]
    Reference {
        reference: String,
        source: crate::secret_ref::SecretRefError,
    },
    #[error("cannot start {program}: {source}")]
    Start { program: String, source: io::Error },
    #[error("waiting for the child failed: {0}")]
    Wait(io::Error),
    #[error("cannot install a signal handler: {0}")]
    Signals(io::Error),
}

/// The signals passed on to the child rather than acted on.
const FORWARDED: [Signal; 7] = [
    Signal::HUP,
    Signal::INT,
    Signal::QUIT,
    Signal::TERM,
    Signal::USR1,
    Signal::USR2,
    Signal::WINCH,
];

/// Runs the child until it exits and returns the exit code to end with (128 + signal for
/// a child killed by a signal, as shells report it). `updates` delivers the secrets as
/// they change, and restart requests; the child starts with the first complete one.
pub async fn supervise(
    spec: ChildSpec,
    mut updates: mpsc::Receiver<Update>,
) -> Result<i32, ExecError> {
    let mut env = first_env(&spec, &mut updates).await?;
    let mut handlers = Vec::with_capacity(FORWARDED.len());
    for sig in FORWARDED {
        let stream = unix_signal(SignalKind::from_raw(sig.0)).map_err(ExecError::Signals)?;
        handlers.push((sig, stream));
    }
    let mut child = start(&spec, &env)?;
    let mut updates_open = true;
    let mut stopping = false;
    loop {
        let forwarded = futures::future::select_all(
            handlers
                .iter_mut()
                .map(|(sig, stream)| Box::pin(async move { stream.recv().await.map(|_| *sig) })),
        );
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(ExecError::Wait)?;
                return Ok(exit_code(status));
            }
            (sig, _, _) = forwarded => {
                if let Some(sig) = sig {
                    if sig == Signal::TERM || sig == Signal::INT {
                        stopping = true;
                    }
                    send_to(&child, sig);
                }
            }
            update = updates.recv(), if updates_open => {
                let Some(update) = update else {
                    updates_open = false;
                    continue;
                };
                if stopping {
                    continue;
                }
                let changed = match resolve(&spec.vars, &update) {
                    Ok(next) if next != env => {
                        env = next;
                        true
                    }
                    Ok(_) => false,
                    Err(Missing(names)) => {
                        tracing::warn!(missing = %names.join(", "), "no longer granted or not there yet; the child keeps the values it has");
                        false
                    }
                };
                let action = match (changed, update.restart) {
                    (true, _) => spec.on_change,
                    (false, true) => ChangeAction::Restart,
                    (false, false) => ChangeAction::Nothing,
                };
                match action {
                    ChangeAction::Restart => {
                        tracing::info!(program = %spec.program, "its secrets or files changed; restarting the child");
                        child = restart(&spec, child, &env).await?;
                    }
                    ChangeAction::Signal(sig) => {
                        tracing::info!(program = %spec.program, signal = %sig, "its secrets changed; signalling the child");
                        send_to(&child, sig);
                    }
                    ChangeAction::Nothing => {}
                }
            }
        }
    }
}

/// The resolved environment: name and value, in the order given.
type ResolvedEnv = Vec<(String, Zeroizing<String>)>;

#[derive(Debug)]
struct Missing(Vec<String>);

async fn first_env(
    spec: &ChildSpec,
    updates: &mut mpsc::Receiver<Update>,
) -> Result<ResolvedEnv, ExecError> {
    let deadline = tokio::time::Instant::now() + spec.first_wait;
    let mut missing = names_of(&spec.vars);
    loop {
        let update = match tokio::time::timeout_at(deadline, updates.recv()).await {
            Ok(Some(update)) => update,
            Ok(None) | Err(_) => {
                return Err(ExecError::NotGranted {
                    names: missing.join(", "),
                    waited: spec.first_wait,
                });
            }
        };
        match resolve(&spec.vars, &update) {
            Ok(env) => return Ok(env),
            Err(Missing(names)) => missing = names,
        }
    }
}

/// How a missing value is named: `secret NAME`, `credential NAME`.
fn missing_name(value: &EnvValue) -> Option<String> {
    match value {
        EnvValue::Secret(r) => Some(format!("secret {}", r.name)),
        EnvValue::Credential(r) => Some(format!("credential {}", r.name)),
        EnvValue::Literal(_) => None,
    }
}

fn names_of(vars: &[(String, EnvValue)]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for name in vars.iter().filter_map(|(_, v)| missing_name(v)) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

fn resolve(vars: &[(String, EnvValue)], update: &Update) -> Result<ResolvedEnv, Missing> {
    let mut env = Vec::with_capacity(vars.len());
    let mut missing = Vec::new();
    for (key, value) in vars {
        let resolved = match value {
            EnvValue::Literal(text) => Some(Zeroizing::new(text.clone())),
            // A value that is not text cannot be an environment variable: as good as absent.
            EnvValue::Secret(reference) => update
                .secrets
                .get(&reference.name)
                .and_then(|view| reference.resolve(view).ok())
                .map(Zeroizing::new),
            EnvValue::Credential(reference) => update
                .credentials
                .get(&reference.name)
                .and_then(|credential| credential.value(&reference.field)),
        };
        match (resolved, missing_name(value)) {
            (Some(text), _) => env.push((key.clone(), text)),
            (None, Some(name)) => {
                if !missing.contains(&name) {
                    missing.push(name);
                }
            }
            (None, None) => {}
        }
    }
    if missing.is_empty() {
        Ok(env)
    } else {
        Err(Missing(missing))
    }
}

fn start(spec: &ChildSpec, env: &ResolvedEnv) -> Result<Child, ExecError> {
    let mut command = Command::new(&spec.program);
    command.args(&spec.args);
    for (key, value) in env {
        command.env(key, value.as_str());
    }
    if let Some(endpoint) = &spec.endpoint {
        command.env("SPIFFE_ENDPOINT_SOCKET", endpoint.to_string());
    }
    // Its own process group, so a terminal's Ctrl-C reaches it once (forwarded by us), not
    // twice; and it dies with us rather than running on with credentials nobody rotates.
    command.process_group(0);
    crate::sys::set_parent_death_signal(&mut command, libc::SIGTERM);
    let child = command.spawn().map_err(|source| ExecError::Start {
        program: spec.program.clone(),
        source,
    })?;
    tracing::info!(program = %spec.program, pid = child.id(), "started the child");
    Ok(child)
}

/// Stops the child gracefully (stop signal, SIGKILL after the timeout), then starts it again.
async fn restart(
    spec: &ChildSpec,
    mut child: Child,
    env: &ResolvedEnv,
) -> Result<Child, ExecError> {
    send_to(&child, spec.stop_signal);
    match tokio::time::timeout(spec.stop_timeout, child.wait()).await {
        Ok(status) => {
            status.map_err(ExecError::Wait)?;
        }
        Err(_) => {
            tracing::warn!(program = %spec.program, timeout = ?spec.stop_timeout, "the child ignored the stop signal; killing it");
            let _ = child.kill().await;
        }
    }
    start(spec, env)
}

fn send_to(child: &Child, sig: Signal) {
    if let Some(pid) = child.id()
        && let Err(e) = sig.send(pid as i32)
    {
        tracing::warn!(pid, signal = %sig, error = %e, "could not signal the child");
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, version: &str, value: &str) -> (String, Arc<SecretView>) {
        (
            name.to_string(),
            Arc::new(SecretView {
                name: name.into(),
                version: version.into(),
                username: "app".into(),
                value: Arc::new(Zeroizing::new(value.as_bytes().to_vec())),
                granted_to: vec![],
                sets: vec![],
            }),
        )
    }

    fn spec(dir: &std::path::Path, script: &str) -> ChildSpec {
        ChildSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            vars: vec![
                (
                    "DB_PASSWORD".into(),
                    EnvValue::Secret("secret:db".parse().unwrap()),
                ),
                ("OUT".into(), EnvValue::Literal(dir.display().to_string())),
            ],
            endpoint: Some(WorkloadEndpoint::Unix("/run/mayfly-agent/api.sock".into())),
            on_change: ChangeAction::Restart,
            stop_signal: Signal::TERM,
            stop_timeout: Duration::from_secs(5),
            first_wait: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn restarts_once_per_change_and_returns_the_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let script = "echo \"$DB_PASSWORD $SPIFFE_ENDPOINT_SOCKET\" >> \"$OUT/starts\"; \
                      trap 'exit 0' TERM; [ -e \"$OUT/stop\" ] && exit 7; while :; do sleep 0.05; [ -e \"$OUT/stop\" ] && exit 7; done";
        let spec = spec(dir.path(), script);
        let (tx, rx) = mpsc::channel(8);
        let run = tokio::spawn(supervise(spec, rx));
        let starts = dir.path().join("starts");
        let lines = || {
            std::fs::read_to_string(&starts)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let wait_lines = |n: usize| {
            let lines = &lines;
            async move {
                for _ in 0..200 {
                    if lines().len() >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                panic!("never saw {n} starts: {:?}", lines());
            }
        };
        let update = |secrets: Vec<(String, Arc<SecretView>)>, restart| Update {
            secrets: secrets.into_iter().collect(),
            credentials: Default::default(),
            restart,
        };
        tx.send(update(vec![view("db", "v1", "one")], false))
            .await
            .unwrap();
        wait_lines(1).await;
        // The same values again, and an unrelated secret: no restart.
        tx.send(update(
            vec![view("db", "v1", "one"), view("other", "x", "y")],
            false,
        ))
        .await
        .unwrap();
        // New values and a restart request in one update: one restart, not two.
        tx.send(update(vec![view("db", "v2", "two")], true))
            .await
            .unwrap();
        wait_lines(2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            lines(),
            vec![
                "one unix:///run/mayfly-agent/api.sock",
                "two unix:///run/mayfly-agent/api.sock"
            ]
        );
        // A restart request alone (a sink the child reads changed) restarts it once.
        tx.send(update(vec![view("db", "v2", "two")], true))
            .await
            .unwrap();
        wait_lines(3).await;
        std::fs::write(dir.path().join("stop"), "").unwrap();
        assert_eq!(run.await.unwrap().unwrap(), 7);
    }

    #[tokio::test]
    async fn a_secret_that_never_comes_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path(), "exit 0");
        spec.first_wait = Duration::from_millis(200);
        let (tx, rx) = mpsc::channel(8);
        tx.send(Update {
            secrets: [view("other", "v1", "x")].into(),
            credentials: Default::default(),
            restart: false,
        })
        .await
        .unwrap();
        let err = supervise(spec, rx).await.unwrap_err().to_string();
        assert!(err.contains("secret db"), "{err}");
        assert!(!dir.path().join("starts").exists());
    }

    fn credential(lease: &str, password: &str, expires_at: i64) -> Arc<Credential> {
        Arc::new(Credential::from_issued(
            mayfly_proto::v1::IssuedCredential {
                lease_id: lease.into(),
                name: "orders-db".into(),
                kind: "postgres_dynamic".into(),
                values: [("password".to_string(), password.to_string())].into(),
                issued_at: 1_000,
                expires_at,
                notice: String::new(),
                facts: None,
            },
            mayfly_common::SpiffeId::parse("spiffe://example.org/orders").unwrap(),
        ))
    }

    #[test]
    fn a_renewed_lease_changes_nothing_a_new_one_does() {
        let vars = vec![(
            "PGPASSWORD".to_string(),
            EnvValue::parse("credential:orders-db:password").unwrap(),
        )];
        assert_eq!(credential_names(&vars), vec!["orders-db".to_string()]);
        let update = |c: Option<Arc<Credential>>| Update {
            secrets: Default::default(),
            credentials: c
                .map(|c| ("orders-db".to_string(), c))
                .into_iter()
                .collect(),
            restart: false,
        };
        let Err(Missing(missing)) = resolve(&vars, &update(None)) else {
            panic!("resolved without the credential");
        };
        assert_eq!(missing, vec!["credential orders-db".to_string()]);
        let first = resolve(&vars, &update(Some(credential("ls-1", "Pw-1", 2_000)))).unwrap();
        assert_eq!(first[0].1.as_str(), "Pw-1");
        let renewed = resolve(&vars, &update(Some(credential("ls-1", "Pw-1", 3_000)))).unwrap();
        assert_eq!(renewed, first, "the same values: no restart");
        let replaced = resolve(&vars, &update(Some(credential("ls-2", "Pw-2", 3_000)))).unwrap();
        assert_ne!(replaced, first);
    }
}
