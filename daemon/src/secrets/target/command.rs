//! `none` targets: change and check are operator commands, run without a shell, fed the
//! value on stdin, bounded in time, their stderr kept short and redacted.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::*;
use crate::secrets::{Credential, SecretValue, Target, TargetError};

/// The commands of a `none` target. Each is an argv vector run without a shell, given the
/// secret's value on stdin (never in its arguments or environment, which other local users
/// can read through /proc).
#[derive(Debug, Clone)]
pub struct CommandTargetConfig {
    /// Run by `set`; `None` makes `set` a no-op (the value only lives in the store).
    pub set_command: Option<Vec<String>>,
    /// Run by `test`; `None` makes `test` succeed.
    pub test_command: Option<Vec<String>>,
    /// Limit on each command's run time; past it the command's process group is killed.
    pub timeout: Duration,
}

/// A `none` target: the secret is consumed by something Mayfly cannot log in to, so change
/// and check are delegated to operator commands.
#[derive(Debug)]
pub struct CommandTarget {
    config: CommandTargetConfig,
}

impl Default for CommandTargetConfig {
    fn default() -> Self {
        Self {
            set_command: None,
            test_command: None,
            timeout: DEFAULT_HOOK_TIMEOUT,
        }
    }
}

impl CommandTarget {
    pub fn new(config: CommandTargetConfig) -> Result<Self, TargetConfigError> {
        if config.set_command.as_ref().is_some_and(Vec::is_empty) {
            return Err(TargetConfigError::EmptyCommand("set_command"));
        }
        if config.test_command.as_ref().is_some_and(Vec::is_empty) {
            return Err(TargetConfigError::EmptyCommand("test_command"));
        }
        if config.timeout.is_zero() {
            return Err(TargetConfigError::ZeroTimeout);
        }
        Ok(Self { config })
    }
}

#[tonic::async_trait]
impl Target for CommandTarget {
    async fn set(&self, credential: &Credential) -> Result<(), TargetError> {
        match &self.config.set_command {
            Some(argv) => run_hook(argv, &credential.password, self.config.timeout).await,
            None => Ok(()),
        }
    }

    async fn test(&self, credential: &Credential) -> Result<(), TargetError> {
        match &self.config.test_command {
            Some(argv) => run_hook(argv, &credential.password, self.config.timeout).await,
            None => Ok(()),
        }
    }
}

/// Runs `argv` with `value` on stdin; Ok when it exits 0 within `timeout`.
async fn run_hook(
    argv: &[String],
    value: &SecretValue,
    timeout: Duration,
) -> Result<(), TargetError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(TargetError::Hook("empty command".into()));
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills whatever the hook started too.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| TargetError::Hook(format!("cannot start {program:?}: {e}")))?;

    let stdin = child.stdin.take();
    let stderr_head = Arc::new(Mutex::new(Vec::new()));
    let collector = child.stderr.take().map(|stderr| {
        let head = Arc::clone(&stderr_head);
        tokio::spawn(collect_stderr(stderr, head))
    });

    let run = async {
        let feed = async {
            if let Some(mut stdin) = stdin {
                match stdin.write_all(value.expose().as_bytes()).await {
                    // A hook may exit without reading its input; its exit status decides.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                    Err(e) => return Err(e),
                    Ok(()) => {}
                }
                // Dropping stdin closes it, so the hook sees end of input.
            }
            Ok(())
        };
        let (fed, status) = tokio::join!(feed, child.wait());
        fed.and(status)
    };
    let outcome = tokio::time::timeout(timeout, run).await;

    let status: ExitStatus = match outcome {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            kill_group(&mut child).await;
            return Err(TargetError::Hook(format!("running {program:?}: {e}")));
        }
        Err(_) => {
            kill_group(&mut child).await;
            return Err(TargetError::Hook(format!(
                "{program:?} did not finish within {}",
                humantime::format_duration(timeout)
            )));
        }
    };
    if status.success() {
        if let Some(collector) = collector {
            collector.abort();
        }
        return Ok(());
    }
    if let Some(collector) = collector {
        // Usually done already; a background child of the hook may keep stderr open, so do
        // not wait for it indefinitely.
        let _ = tokio::time::timeout(STDERR_GRACE, collector).await;
    }
    let head = stderr_head
        .lock()
        .map(|head| String::from_utf8_lossy(&head).trim().to_owned())
        .unwrap_or_default();
    Err(TargetError::Hook(format!(
        "{program:?} exited with {status}: {}",
        if head.is_empty() {
            "(no stderr)"
        } else {
            &head
        }
    )))
}

/// Keeps the first STDERR_HEAD bytes of stderr in `head` and discards the rest, so a chatty
/// hook neither blocks on a full pipe nor grows our memory.
async fn collect_stderr(mut stderr: tokio::process::ChildStderr, head: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut head) = head.lock() {
                    let room = STDERR_HEAD.saturating_sub(head.len());
                    head.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
    }
}

/// Kills the hook's process group, then reaps the hook.
async fn kill_group(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        // A negative pid is the process group the hook leads (spawned with process_group(0)).
        let _ = crate::sys::kill(-pid, libc::SIGKILL);
    }
    let _ = child.kill().await;
}
