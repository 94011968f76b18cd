//! The Workload API interop matrix's harness: `mayflyd dev` started as a newcomer starts
//! it, and the three client programs of tests/interop (Rust `spiffe` crate, Python grpcio,
//! Node @grpc/grpc-js) driven over their stdin/stdout line protocol.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::harness::{binary, operator_cli, operator_json};

/// A running `mayflyd dev`: what its banner printed, and the process, stopped with SIGTERM
/// on drop so that it deletes its temporary directory.
pub struct DevMode {
    pub admin_socket: PathBuf,
    pub workload_socket: PathBuf,
    pub node_id: String,
    pub workload_id: String,
    child: Child,
    log: tempfile::NamedTempFile,
}

impl DevMode {
    pub fn start() -> anyhow::Result<Self> {
        let log = tempfile::NamedTempFile::new()?;
        let mut child = Command::new(binary("mayflyd")?)
            .args(["dev", "--node-listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.reopen()?)
            .spawn()
            .context("starting mayflyd dev")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains("Press Ctrl-C") => break,
                Ok(line) => banner.push(line),
                Err(_) => {
                    let _ = child.kill();
                    bail!(
                        "mayflyd dev printed no banner; its log:\n{}",
                        std::fs::read_to_string(log.path()).unwrap_or_default()
                    );
                }
            }
        }
        let field = |name: &str| -> anyhow::Result<String> {
            banner
                .iter()
                .find_map(|line| line.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
                .with_context(|| format!("no `{name}` in the banner:\n{}", banner.join("\n")))
        };
        let workload_id = banner
            .iter()
            .find_map(|line| {
                let line = line.trim();
                line.starts_with("entry for uid")
                    .then(|| line.rsplit(' ').next().unwrap_or_default().to_owned())
            })
            .context("no entry line in the banner")?;
        Ok(Self {
            admin_socket: field("admin socket:")?.into(),
            workload_socket: field("Workload API socket:")?.into(),
            node_id: field("agent:")?,
            workload_id,
            child,
            log,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.workload_socket.display())
    }

    /// An operator subcommand against the dev daemon's admin socket.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        operator_cli(&self.admin_socket, args)
    }

    /// An operator subcommand with `--output json` that must succeed.
    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        operator_json(&self.admin_socket, args)
    }
}

impl DevMode {
    /// SIGTERM, so that it deletes its temporary directory; a kill if it lingers.
    fn stop(&mut self) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DevMode {
    fn drop(&mut self) {
        self.stop();
        // A failing test shows what the daemon and its agent logged.
        if std::thread::panicking() {
            eprintln!(
                "mayflyd dev's log:\n{}",
                std::fs::read_to_string(self.log.path()).unwrap_or_default()
            );
        }
    }
}

/// The Workload API stacks of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// The `spiffe` crate (tonic, hyper, h2).
    RustSpiffe,
    /// Python grpcio: gRPC's C core.
    PythonGrpcio,
    /// @grpc/grpc-js on the machine's node.
    NodeGrpcJs,
}

impl Stack {
    pub fn name(self) -> &'static str {
        match self {
            Self::RustSpiffe => "rust-spiffe",
            Self::PythonGrpcio => "python-grpcio",
            Self::NodeGrpcJs => "node-grpc-js",
        }
    }

    fn command(self) -> anyhow::Result<Command> {
        let interop = interop_dir();
        Ok(match self {
            Self::RustSpiffe => Command::new(binary("workload-client")?),
            Self::PythonGrpcio => {
                let mut command = Command::new("python3");
                command.arg(interop.join("python/workload_client.py"));
                command
            }
            Self::NodeGrpcJs => {
                let node_dir = interop.join("node");
                if !node_dir.join("node_modules/@grpc/grpc-js").exists() {
                    bail!(
                        "{} has no node_modules: scripts/test installs them",
                        node_dir.display()
                    );
                }
                let mut command = Command::new("node");
                command.arg(node_dir.join("workload_client.js"));
                command
            }
        })
    }
}

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

/// One client program, answering one JSON line per command.
pub struct InteropClient {
    pub stack: Stack,
    stdin: ChildStdin,
    answers: mpsc::Receiver<String>,
    child: Child,
    stderr: tempfile::NamedTempFile,
}

impl InteropClient {
    /// Starts the client on `endpoint`. With `as_uid`, the program drops to that uid (and
    /// gid) once its stack is loaded and before it connects: the agent sees a caller of
    /// that uid, while the interpreter may live where only root can read.
    pub fn start(stack: Stack, endpoint: &str, as_uid: Option<u32>) -> anyhow::Result<Self> {
        let stderr = tempfile::NamedTempFile::new()?;
        let mut command = stack.command()?;
        command
            .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
            .env("RUST_LOG", "warn")
            .env_remove("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen()?);
        if let Some(uid) = as_uid {
            command.env("INTEROP_RUN_AS_UID", uid.to_string());
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting the {} client", stack.name()))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            stack,
            stdin,
            answers,
            child,
            stderr,
        })
    }

    /// Sends one command and returns the client's answer.
    pub fn ask(&mut self, command: &str) -> anyhow::Result<Value> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        match self.answers.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => serde_json::from_str(&line)
                .with_context(|| format!("{}: not JSON: {line}", self.stack.name())),
            Err(_) => bail!(
                "{}: no answer to `{command}` within 30 s; its stderr:\n{}",
                self.stack.name(),
                self.stderr()
            ),
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }
}

impl Drop for InteropClient {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        for _ in 0..40 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
