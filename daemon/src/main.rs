//! `mayflyd`: runs the daemon, or talks to a running one as an operator.

use std::io::Write;

use anyhow::Context;
use clap::Parser;

use mayfly_common::process::{init_logging, shutdown_signal};

use mayfly_daemon::cli::{Cli, Command, blast, credentials, elevation, operator, policy};
use mayfly_daemon::config::{DaemonConfig, LogFormat};
use mayfly_daemon::{dev, server};

/// mimalloc rather than glibc's malloc: the signing path's allocations and frees across
/// threads cost a tenth of the daemon's CPU with glibc (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // aws-lc-rs is the only crypto provider; installing it first keeps rustls from guessing.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mayflyd: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(text) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            // A revocation some agents did not acknowledge: the report, and exit 3.
            if let Some(partial) = e.downcast_ref::<operator::Unacknowledged>() {
                let _ = std::io::stdout().write_all(partial.0.as_bytes());
                return std::process::ExitCode::from(3);
            }
            eprintln!("mayflyd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<String> {
    match cli.command {
        Command::Run { config } => {
            let path = config;
            // Kept to tell, at a reload, what changed since the start.
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let config = DaemonConfig::load(&path)?;
            init_logging(config.log.format == LogFormat::Json, &config.log.level);
            let (_daemon, handle) = server::start(config, shutdown_signal()).await?;
            tokio::spawn(
                std::sync::Arc::new(mayfly_daemon::reload::Reloader::new(path, text)).on_hangup(),
            );
            server::notify_ready();
            handle.await.context("daemon task")??;
            Ok(String::new())
        }
        Command::Dev(args) => {
            init_logging(false, "info");
            dev::run(args, shutdown_signal()).await?;
            Ok(String::new())
        }
        Command::Entry { command, conn } => operator::entry(command, &conn).await,
        Command::Token { command, conn } => operator::token(command, &conn).await,
        Command::Agent { command, conn } => operator::agent(command, &conn).await,
        Command::Bundle { command, conn } => operator::bundle(command, &conn).await,
        Command::Ca { command, conn } => operator::ca(command, &conn).await,
        Command::Secret { command, conn } => operator::secret(command, &conn).await,
        Command::Credential { command, conn } => credentials::credential(command, &conn).await,
        Command::Lease { command, conn } => credentials::lease(command, &conn).await,
        Command::Revoke { command, conn } => operator::revoke(command, &conn).await,
        Command::Audit { command, conn } => operator::audit(command, &conn).await,
        Command::Policy { command, conn } => policy::policy(command, &conn).await,
        Command::Elevation { command, conn } => elevation::elevation(command, &conn).await,
        Command::Backup { out, conn } => operator::backup(out, &conn).await,
        Command::BlastRadius {
            principal,
            all,
            conn,
        } => blast::blast_radius(principal, all, &conn).await,
    }
}
