//! `mayfly-agent exec`: the command line, and the client that follows the local agent's
//! WorkloadSecrets stream (reconnecting with backoff while the app keeps running) and
//! feeds it to the supervisor.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use zeroize::Zeroizing;

use mayfly_proto::v1::WatchSecretsRequest;
use mayfly_proto::v1::workload_secrets_client::WorkloadSecretsClient;

use super::{ChangeAction, ChildSpec, EnvValue, Signal, Snapshot, Update, supervise};
use crate::cli::api::request;
use crate::cli::endpoint::WorkloadEndpoint;
use crate::secret_ref::SecretRefError;
use crate::sinks::{InvalidEnvName, check_env_name};
use crate::state::SecretView;
use crate::sync::Backoff;

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// KEY=secret:NAME[:username|:version] or KEY=literal; repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
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
    let (tx, rx) = mpsc::channel(4);
    let follower = tokio::spawn(follow(endpoint, tx));
    let code = supervise(spec, rx).await;
    follower.abort();
    Ok(code?)
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
async fn follow(endpoint: WorkloadEndpoint, snapshots: mpsc::Sender<Update>) {
    let mut backoff = Backoff::default();
    loop {
        match watch_once(&endpoint, &snapshots, &mut backoff).await {
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
    snapshots: &mpsc::Sender<Update>,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let mut client = WorkloadSecretsClient::new(endpoint.connect().await?);
    let mut stream = client
        .watch_secrets(request(WatchSecretsRequest {}))
        .await
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    while let Some(message) = stream.next().await {
        let message = message.map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?;
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
                };
                (s.name, Arc::new(view))
            })
            .collect();
        let update = Update {
            secrets: snapshot,
            restart: false,
        };
        if snapshots.send(update).await.is_err() {
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
