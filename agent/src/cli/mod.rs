//! `mayfly-agent` command line: `run`; `exec`, a supervisor that hands an app its secrets;
//! `api …`, a Workload API client for operators (like `spire-agent api`); and `creds …`,
//! which fetches a TTL-bound credential for the workload running it.

pub mod api;
pub mod creds;
pub mod elevate;
pub mod endpoint;

use std::path::PathBuf;
use std::time::Duration;

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
    /// Fetch a TTL-bound credential (a dynamic database user, cloud keys) for the process
    /// running this command: `mayfly-agent creds get orders-db --format env`.
    Creds {
        #[command(subcommand)]
        command: CredsCommand,
        /// The Workload API: unix:///absolute/path, a path, or tcp://IP:port; default:
        /// SPIFFE_ENDPOINT_SOCKET, then unix:///run/mayfly-agent/api.sock.
        #[arg(long, global = true, value_name = "ENDPOINT")]
        socket: Option<String>,
    },
    /// Ask for temporary access to a credential as this workload (an AI agent's tools
    /// too), and end it when the task is done: `mayfly-agent elevate request --credential
    /// orders-db --ttl 15m --reason "…"`.
    Elevate {
        #[command(subcommand)]
        command: elevate::ElevateCommand,
        /// The Workload API, as for `creds`.
        #[arg(long, global = true, value_name = "ENDPOINT")]
        socket: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CredsCommand {
    /// Print the credential: its values, lease and expiry.
    Get {
        #[command(flatten)]
        request: CredentialRequest,
        /// json: every field with the values; env: KEY=value lines (USERNAME=…,
        /// PASSWORD=…, MAYFLY_LEASE_ID=…, MAYFLY_EXPIRES_AT=…).
        #[arg(long, value_enum, default_value_t = CredsFormat::Json)]
        format: CredsFormat,
    },
    /// Print AWS keys as `credential_process` JSON, for `credential_process =
    /// mayfly-agent creds aws NAME` in ~/.aws/config.
    Aws {
        #[command(flatten)]
        request: CredentialRequest,
    },
}

/// Which credential, for whom, for how long.
#[derive(Debug, Args, Clone)]
pub struct CredentialRequest {
    /// The credential definition's name.
    pub name: String,
    /// Which of this workload's SPIFFE IDs asks; needed only when it holds several.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// How long it should last, e.g. 30m (at most the definition's maximum); default:
    /// the definition's default.
    #[arg(long, value_parser = creds::parse_ttl)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CredsFormat {
    Json,
    Env,
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
