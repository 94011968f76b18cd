//! `mayfly-agent` command line: `run`; `exec`, a supervisor that hands an app its secrets;
//! and `api …`, a Workload API client for operators (like `spire-agent api`).

pub mod api;
pub mod endpoint;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "mayfly-agent",
    version,
    about = "Mayfly's node agent: SPIFFE Workload API and credential delivery"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run {
        /// Path to agent.toml.
        #[arg(long, short, default_value = "/etc/mayfly/agent.toml")]
        config: PathBuf,
        /// A single-use join token for the first attestation.
        #[arg(long)]
        join_token: Option<String>,
    },
    /// Run a program with granted secrets in its environment, restarting or signalling it
    /// when they rotate: `mayfly-agent exec --env DB_PASSWORD=secret:app-db -- app --serve`.
    Exec(crate::exec::ExecArgs),
    /// Talk to a running agent's Workload API.
    Api {
        #[command(subcommand)]
        command: ApiCommand,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Debug, Args, Clone)]
pub struct Endpoint {
    /// The Workload API: unix:///absolute/path, a path, or tcp://IP:port (the forms
    /// SPIFFE_ENDPOINT_SOCKET takes); default: SPIFFE_ENDPOINT_SOCKET, then
    /// unix:///run/mayfly-agent/api.sock.
    #[arg(long, global = true, value_name = "ENDPOINT")]
    pub socket: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Fetch SVIDs.
    Fetch {
        #[command(subcommand)]
        kind: FetchKind,
    },
    /// Check a JWT-SVID against the trust bundle.
    Validate {
        #[arg(long)]
        audience: String,
        /// The JWT-SVID.
        #[arg(long)]
        svid: String,
    },
    /// Print every X.509 update as it arrives, until interrupted.
    Watch {
        /// Stop after this many updates.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
pub enum FetchKind {
    /// X509-SVIDs, keys and bundle.
    X509 {
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// JWT-SVIDs for an audience.
    Jwt {
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}
