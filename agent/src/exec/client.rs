//! `mayfly-agent exec`: the command line, and the client that follows the local agent's
//! WorkloadSecrets stream (reconnecting with backoff while the app keeps running) and asks
//! it again for each TTL-bound credential the environment names, well before the agent
//! would move to a new lease, feeding both to the supervisor.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Args;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use zeroize::Zeroizing;

use mayfly_common::clock::unix;
use mayfly_proto::v1::workload_credentials_client::WorkloadCredentialsClient;
use mayfly_proto::v1::workload_secrets_client::WorkloadSecretsClient;
use mayfly_proto::v1::{GetCredentialRequest, WatchSecretsRequest};

use super::{
    ChangeAction, ChildSpec, EnvValue, HeldByName, Signal, Snapshot, Update, credential_names,
    supervise,
};
use crate::cli::api::request;
use crate::cli::endpoint::WorkloadEndpoint;
use crate::credentials::{Credential, parse_ttl};
use crate::secret_ref::SecretRefError;
use crate::sinks::{InvalidEnvName, check_env_name};
use crate::state::SecretView;
use crate::sync::Backoff;

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// KEY=secret:NAME[:username|:version], KEY=credential:NAME:FIELD or KEY=literal;
    /// repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// For credential: references, which of this workload's SPIFFE IDs asks; needed only
    /// when it holds several.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// For credential: references, how long each lease should last (e.g. 30m); default:
    /// the definition's default.
    #[arg(long, value_parser = parse_ttl)]
    pub ttl: Option<Duration>,
    /// A file of KEY=VALUE lines in the same form (# starts a comment); repeatable.
    #[arg(long = "env-file", value_name = "PATH")]
    pub env_file: Vec<PathBuf>,
    /// On a new secret version: restart (stop signal, timeout, kill, start), signal:NAME, or none.
    #[arg(long, default_value = "restart")]
    pub on_change: String,
    /// Sent to stop the child before a restart.
    #[arg(long, default_value = "TERM")]
    pub stop_signal: String,
    /// How long the child may take to stop before it is killed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub stop_timeout: Duration,
    /// How long to wait for every secret before giving up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// The agent: unix:///absolute/path, a path, or tcp://IP:port; default:
    /// SPIFFE_ENDPOINT_SOCKET, then unix:///run/mayfly-agent/api.sock.
    #[arg(long, value_name = "ENDPOINT")]
    pub socket: Option<String>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Why a KEY=VALUE pair (from `--env` or an env file) cannot be used. Only a `secret:`
/// reference, or text with no `=` at all, is quoted back; a literal value never is.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum EnvPairError {
    #[error("`{0}` is not KEY=VALUE")]
    NotAPair(String),
    #[error(transparent)]
    Name(#[from] InvalidEnvName),
    #[error("{key}: {source}")]
    Reference { key: String, source: SecretRefError },
    #[error("line {line}: {source}")]
    Line {
        line: usize,
        source: Box<EnvPairError>,
    },
}

/// Runs `mayfly-agent exec` and returns the exit code to end with.
pub async fn run(args: ExecArgs) -> anyhow::Result<i32> {
    let mut vars = Vec::new();
    for pair in &args.env {
        vars.push(parse_pair(pair).map_err(|e| anyhow::anyhow!("--env {e}"))?);
    }
    for file in &args.env_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("--env-file {}: {e}", file.display()))?;
        vars.extend(
            parse_env_file(&text)
                .map_err(|e| anyhow::anyhow!("--env-file {}: {e}", file.display()))?,
        );
    }
    let on_change = match args.on_change.as_str() {
        "restart" => ChangeAction::Restart,
        "none" => ChangeAction::Nothing,
        other => match other.strip_prefix("signal:") {
            Some(name) => ChangeAction::Signal(
                name.parse()
                    .map_err(|e| anyhow::anyhow!("--on-change: {e}"))?,
            ),
            None => anyhow::bail!(
                "--on-change `{other}`: use restart, none or signal:NAME (signal:HUP)"
            ),
        },
    };
    let stop_signal: Signal = args
        .stop_signal
        .parse()
        .map_err(|e| anyhow::anyhow!("--stop-signal: {e}"))?;
    let endpoint = WorkloadEndpoint::resolve(args.socket.as_deref())?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("name the program to run after `--`"))?;
    let spec = ChildSpec {
        program: program.clone(),
        args: rest.to_vec(),
        vars,
        endpoint: Some(endpoint.clone()),
        on_change,
        stop_signal,
        stop_timeout: args.stop_timeout,
        first_wait: args.wait,
    };
    let asking = Asking {
        spiffe_id: args.spiffe_id.unwrap_or_default(),
        ttl_seconds: args
            .ttl
            .map_or(0, |ttl| i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
    };
    let names = credential_names(&spec.vars);
    let (tx, rx) = mpsc::channel(4);
    let heard = Heard::new();
    let follower = tokio::spawn(follow_all(
        endpoint.clone(),
        names,
        asking,
        tx,
        heard.clone(),
    ));
    let code = supervise(spec, rx).await;
    follower.abort();
    match code {
        // "Not granted" is said only when the agent answered that: an agent that could
        // not be reached, or that refused the caller, is named as the cause.
        Err(super::ExecError::NotGranted { waited, .. }) if !heard.answered() => {
            Err(heard.failure(&endpoint, waited))
        }
        code => Ok(code?),
    }
}

/// What the agent has said to `exec` so far, for the error when nothing arrives.
#[derive(Clone, Default)]
struct Heard(Arc<std::sync::Mutex<HeardState>>);

#[derive(Default)]
enum HeardState {
    /// Never reached: the last connection error.
    #[default]
    Nothing,
    Unreachable(String),
    /// Reached, and it refused this caller.
    Refused(String),
    /// It answered with the secrets it grants (perhaps not the ones named).
    Answered,
}

impl Heard {
    fn new() -> Self {
        Self::default()
    }

    fn set(&self, state: HeardState) {
        let mut current = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(*current, HeardState::Answered) {
            *current = state;
        }
    }

    fn answered(&self) -> bool {
        matches!(
            *self.0.lock().unwrap_or_else(|p| p.into_inner()),
            HeardState::Answered
        )
    }

    fn failure(&self, endpoint: &WorkloadEndpoint, waited: Duration) -> anyhow::Error {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            HeardState::Refused(why) => anyhow::anyhow!(
                "the agent at {endpoint} refused this process: {why} (is there an entry whose selectors match it?)"
            ),
            HeardState::Unreachable(why) => anyhow::anyhow!(
                "cannot reach the agent at {endpoint} (tried for {waited:?}): {why}; is mayfly-agent running, and is this the socket it serves?"
            ),
            HeardState::Nothing | HeardState::Answered => {
                anyhow::anyhow!("the agent at {endpoint} did not answer within {waited:?}")
            }
        }
    }
}

/// How `exec` asks for its credentials.
#[derive(Clone)]
struct Asking {
    spiffe_id: String,
    ttl_seconds: i64,
}

/// One source's news for the supervisor.
enum Part {
    Secrets(Snapshot),
    /// A credential as the agent hands it out now, or none (refused).
    Credential(String, Option<Arc<Credential>>),
}

/// Follows the secrets and every named credential, and tells the supervisor each change,
/// once there is news from every source.
async fn follow_all(
    endpoint: WorkloadEndpoint,
    names: Vec<String>,
    asking: Asking,
    updates: mpsc::Sender<Update>,
    heard: Heard,
) {
    let (parts, mut news) = mpsc::channel(8);
    let mut tasks = vec![tokio::spawn(follow(endpoint.clone(), parts.clone(), heard))];
    for name in &names {
        tasks.push(tokio::spawn(follow_credential(
            endpoint.clone(),
            name.clone(),
            asking.clone(),
            parts.clone(),
        )));
    }
    drop(parts);
    let mut secrets: Option<Snapshot> = None;
    let mut credentials = HeldByName::new();
    let mut heard: BTreeSet<String> = BTreeSet::new();
    while let Some(part) = news.recv().await {
        match part {
            Part::Secrets(snapshot) => secrets = Some(snapshot),
            Part::Credential(name, credential) => {
                heard.insert(name.clone());
                match credential {
                    Some(credential) => credentials.insert(name, credential),
                    None => credentials.remove(&name),
                };
            }
        }
        let Some(secrets) = &secrets else { continue };
        if heard.len() < names.len() {
            continue;
        }
        let update = Update {
            secrets: secrets.clone(),
            credentials: credentials.clone(),
            restart: false,
        };
        if updates.send(update).await.is_err() {
            break;
        }
    }
    for task in tasks {
        task.abort();
    }
}

/// Asks the agent for credential `name` again and again: a quarter of what is left of the
/// one it has, between 1 s and 30 s, so that a new lease (or a revoked one replaced)
/// reaches the app well before the old one ends. A renewal keeps the values, so the
/// supervisor restarts nothing for it.
async fn follow_credential(
    endpoint: WorkloadEndpoint,
    name: String,
    asking: Asking,
    parts: mpsc::Sender<Part>,
) {
    let mut backoff = Backoff::default();
    let mut last: Option<(String, i64)> = None;
    loop {
        let wait = match get_credential(&endpoint, &name, &asking).await {
            Ok(credential) => {
                backoff.reset();
                let left = credential.expires_at - unix(SystemTime::now());
                let shape = Some((credential.lease_id.clone(), credential.expires_at));
                if shape != last {
                    last = shape;
                    if parts
                        .send(Part::Credential(name.clone(), Some(Arc::new(credential))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Duration::from_secs((left / 4).clamp(1, 30) as u64)
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::PermissionDenied
                        | tonic::Code::NotFound
                        | tonic::Code::InvalidArgument
                ) =>
            {
                tracing::warn!(credential = %name, error = %status.message(), "the agent refused the credential");
                last = None;
                if parts
                    .send(Part::Credential(name.clone(), None))
                    .await
                    .is_err()
                {
                    return;
                }
                Duration::from_secs(5)
            }
            Err(status) => {
                let delay = backoff.next_delay();
                tracing::debug!(credential = %name, error = %status.message(), retry_in_ms = delay.as_millis() as u64, "credential not had; the app keeps what it has");
                delay
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn get_credential(
    endpoint: &WorkloadEndpoint,
    name: &str,
    asking: &Asking,
) -> Result<Credential, tonic::Status> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let message = WorkloadCredentialsClient::new(channel)
        .get_credential(request(GetCredentialRequest {
            name: name.to_string(),
            spiffe_id: asking.spiffe_id.clone(),
            ttl_seconds: asking.ttl_seconds,
        }))
        .await?
        .into_inner();
    Credential::from_workload(message).map_err(|e| tonic::Status::internal(e.to_string()))
}

/// KEY=VALUE lines; blank lines and `#` comments are skipped, `export ` is allowed.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, EnvValue)>, EnvPairError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let line = line.trim();
            !line.is_empty() && !line.starts_with('#')
        })
        .map(|(i, line)| {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line);
            parse_pair(line).map_err(|e| EnvPairError::Line {
                line: i + 1,
                source: Box::new(e),
            })
        })
        .collect()
}

fn parse_pair(pair: &str) -> Result<(String, EnvValue), EnvPairError> {
    let (key, value) = pair
        .split_once('=')
        .ok_or_else(|| EnvPairError::NotAPair(pair.to_owned()))?;
    check_env_name(key)?;
    let value = EnvValue::parse(value).map_err(|source| EnvPairError::Reference {
        key: key.to_owned(),
        source,
    })?;
    Ok((key.to_string(), value))
}

/// Follows WatchSecrets for as long as the supervisor listens, reconnecting with backoff:
/// an agent restart leaves the app running on the values it has.
async fn follow(endpoint: WorkloadEndpoint, snapshots: mpsc::Sender<Part>, heard: Heard) {
    let mut backoff = Backoff::default();
    loop {
        match watch_once(&endpoint, &snapshots, &mut backoff, &heard).await {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "secrets stream lost");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Ok when the supervisor has gone away; Err when the stream broke.
async fn watch_once(
    endpoint: &WorkloadEndpoint,
    snapshots: &mpsc::Sender<Part>,
    backoff: &mut Backoff,
    heard: &Heard,
) -> anyhow::Result<()> {
    let channel = endpoint.connect().await.inspect_err(|e| {
        heard.set(HeardState::Unreachable(format!("{e:#}")));
    })?;
    let mut client = WorkloadSecretsClient::new(channel);
    let refused = |s: tonic::Status| {
        let why = format!("{} ({:?})", s.message(), s.code());
        heard.set(match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                HeardState::Unreachable(why.clone())
            }
            _ => HeardState::Refused(why.clone()),
        });
        anyhow::anyhow!(why)
    };
    let mut stream = client
        .watch_secrets(request(WatchSecretsRequest {}))
        .await
        .map_err(refused)?
        .into_inner();
    while let Some(message) = stream.next().await {
        let message = message.map_err(refused)?;
        heard.set(HeardState::Answered);
        backoff.reset();
        let snapshot: Snapshot = message
            .secrets
            .into_iter()
            .map(|s| {
                let view = SecretView {
                    name: s.name.clone(),
                    version: s.version,
                    username: s.username,
                    value: Arc::new(Zeroizing::new(s.value)),
                    granted_to: Vec::new(),
                    sets: Vec::new(),
                };
                (s.name, Arc::new(view))
            })
            .collect();
        if snapshots.send(Part::Secrets(snapshot)).await.is_err() {
            return Ok(());
        }
    }
    anyhow::bail!("the agent ended the secrets stream")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_take_references_and_literals() {
        let vars = parse_env_file(
            "# app\nDB_PASSWORD=secret:app-db\nexport DB_USER=secret:app-db:username\n\nMODE=prod\n",
        )
        .unwrap();
        assert_eq!(vars.len(), 3);
        assert_eq!(vars[2], ("MODE".into(), EnvValue::Literal("prod".into())));
        let err = parse_env_file("OK=1\nnot a pair\n").unwrap_err();
        assert!(err.to_string().starts_with("line 2"), "{err}");
        assert!(parse_pair("1X=secret:a").is_err());
        assert!(
            parse_pair("X=secret:a:pin")
                .unwrap_err()
                .to_string()
                .contains("field")
        );
    }
}
