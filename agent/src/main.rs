//! `mayfly-agent`: runs the node agent, or queries a running one's Workload API.

// The libc calls this binary makes go through the library's `sys` wrappers.
#![deny(unsafe_code)]

use std::io::Write;

use anyhow::Context;
use clap::Parser;

use mayfly_common::process::{init_logging, shutdown_signal};

use mayfly_agent::cli::{Cli, Command, api, creds, elevate};
use mayfly_agent::config::{AgentConfig, LogFormat};
use mayfly_agent::run;

/// What `exec` exits with when it could not run the program at all (as `env` does).
const EXEC_FAILED: u8 = 125;

fn main() -> std::process::ExitCode {
    // aws-lc-rs is the only crypto provider; installing it first keeps rustls from guessing.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    limit_malloc_arenas();
    // Attestation reads /proc on blocking threads; a small pool keeps a burst of workloads
    // from spawning hundreds of threads, each with its own stack and allocator arena.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mayfly-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Command::Exec(args) = cli.command {
        // The child's exit code is ours; only our own failures print.
        init_logging(false, "warn");
        return match runtime.block_on(mayfly_agent::exec::run_cli(args)) {
            Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("mayfly-agent exec: {e:#}");
                std::process::ExitCode::from(EXEC_FAILED)
            }
        };
    }
    match runtime.block_on(dispatch(cli)) {
        Ok(text) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mayfly-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<String> {
    match cli.command {
        Command::Run { config, join_token } => {
            let path = config;
            // Kept to tell, at a reload, what changed since the start.
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let config = AgentConfig::load(&path)?;
            init_logging(config.log.format == LogFormat::Json, &config.log.level);
            raise_fd_limit();
            let (agent, handle) = run::start(config, join_token, shutdown_signal()).await?;
            tokio::spawn(std::sync::Arc::new(agent.reloader(path, text)).on_hangup());
            notify_ready();
            handle.await.context("agent task")??;
            Ok(String::new())
        }
        Command::Api { command, endpoint } => api::run(command, &endpoint).await,
        Command::Creds { command, socket } => creds::run(command, socket.as_deref()).await,
        Command::Elevate { command, socket } => elevate::run(command, socket.as_deref()).await,
        Command::Exec(_) => unreachable!("handled before the runtime's dispatch"),
    }
}

/// Tells systemd (Type=notify) that the agent is serving, when run under it.
fn notify_ready() {
    if let Some(socket) = std::env::var_os("NOTIFY_SOCKET")
        && let Ok(sock) = std::os::unix::net::UnixDatagram::unbound()
    {
        let _ = sock.send_to(b"READY=1", socket);
    }
}

/// Every workload connection is a descriptor; lift the soft limit to the hard one, as
/// LimitNOFILE does under systemd.
fn raise_fd_limit() {
    // Not fatal: the agent still serves, only fewer workloads at once.
    let _ = mayfly_agent::sys::raise_open_files_limit();
}

/// glibc gives every thread that allocates its own arena, which a busy agent turns into
/// tens of MiB of mostly idle heap; two arenas serve its few threads well.
fn limit_malloc_arenas() {
    // Called before any other thread exists, so every arena is created under the limit.
    mayfly_agent::sys::set_malloc_arena_max(2);
}
