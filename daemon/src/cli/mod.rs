//! `mayflyd` command line: `run`, `dev`, and the operator subcommands that talk to a
//! running daemon over its admin socket.

pub mod blast;
pub mod credentials;
pub mod elevation;
pub mod operator;
pub mod output;
pub mod policy;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::audit::AuditHead;

#[derive(Debug, Parser)]
#[command(
    name = "mayflyd",
    version,
    about = "Mayfly's central daemon: CA, SVID issuance and operator commands"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// Path to daemon.toml.
        #[arg(long, short, default_value = "/etc/mayfly/daemon.toml")]
        config: PathBuf,
    },
    /// Run a throwaway daemon on a temporary data_dir with embedded defaults.
    Dev(DevArgs),
    /// Registration entries.
    Entry {
        #[command(subcommand)]
        command: EntryCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Join tokens for attesting agents.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Attested agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// The trust bundle.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Long-lived secrets and their rotation.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// TTL-bound credentials issued to workloads (dynamic PostgreSQL users).
    Credential {
        #[command(subcommand)]
        command: CredentialCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// The leases of issued credentials: who holds what until when.
    Lease {
        #[command(subcommand)]
        command: LeaseCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// The CA: show it, or force preparing or activating the next one.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Emergency revocation, pushed to every affected agent; waits for their
    /// acknowledgements and exits 3 if any agent did not acknowledge in time.
    Revoke {
        #[command(subcommand)]
        command: RevokeCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// The hash-chained audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Runtime authorization: Cedar policies, validated, shown, reloaded and tested.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// A consistent copy of the SQLite datastore, taken while the daemon runs (keep it with
    /// a copy of secrets.key: what is sealed in it opens with that key only).
    Backup {
        /// The file to write (new, 0600), on the daemon's host.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        conn: Connection,
    },
    /// What a principal can reach: standing, eligible by elevation, and held now; or the
    /// whole fleet sorted by exposure (`--all`).
    BlastRadius {
        /// A SPIFFE ID, or uid:N for an operator.
        principal: Option<String>,
        #[arg(long, conflicts_with = "principal")]
        all: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Just-in-time elevation: ask for temporary access, review, end, read the record.
    Elevation {
        #[command(subcommand)]
        command: elevation::ElevationCommand,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check the *.cedar files of DIR against Mayfly's schema (strict), with the built-in
    /// policies, without a daemon; exits 1 naming the file, line and column of each problem.
    Validate {
        dir: PathBuf,
        /// Without the built-in policies (as `defaults = false` in [policy]).
        #[arg(long)]
        no_defaults: bool,
    },
    /// The active policy set: its hash, mode, files and policy ids.
    Show {
        /// Print every policy's text too.
        #[arg(long)]
        text: bool,
    },
    /// Read policy_dir again (as SIGHUP does); a set that does not validate is refused and
    /// the active one stays.
    Reload,
    /// Decide one request against the active set, with what the daemon knows of the
    /// principal and the resource; nothing is granted.
    Test {
        /// Mayfly::Workload::"spiffe://example.org/web", Mayfly::Agent::"…", or
        /// Mayfly::Operator::"<uid>".
        #[arg(long)]
        principal: String,
        /// sign_x509_svid, mint_jwt_svid, read_secret, obtain_credential, elevate,
        /// admin_read, admin_write, rotate or revoke.
        #[arg(long)]
        action: String,
        /// Mayfly::Entry::"<id>", Mayfly::Audience::"<aud>", Mayfly::Secret::"<name>",
        /// Mayfly::Credential::"<name>" or Mayfly::AdminCall::"<Method>".
        #[arg(long)]
        resource: String,
        /// JSON object setting context fields: node, selectors, ttl_seconds, source,
        /// method, time (RFC 3339).
        #[arg(long)]
        context: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct RevokeOptions {
    /// Why: required, and kept on the audit trail.
    #[arg(long)]
    pub reason: String,
    /// How long to wait for the agents' acknowledgements.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub wait: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// One X509-SVID, by serial; agents get a fresh SVID under a new key.
    Svid {
        /// Hex serial, as `mayfly-agent api fetch` or openssl shows it.
        #[arg(long)]
        serial: String,
        #[command(flatten)]
        options: RevokeOptions,
    },
    /// Every entry giving this SPIFFE ID: the entries go, their SVIDs are denied, and the
    /// files holding them are removed or blanked.
    Entry {
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        options: RevokeOptions,
    },
    /// Every entry carrying this selector, e.g. unix:uid:1000.
    Selector {
        selector: String,
        #[command(flatten)]
        options: RevokeOptions,
    },
    /// An agent and everything it holds: it is banned and drops all it serves.
    Agent {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        options: RevokeOptions,
    },
    /// A secret's current value: rotate now and invalidate the old value on its target.
    Secret {
        name: String,
        #[command(flatten)]
        options: RevokeOptions,
    },
    /// One credential lease: revoked at its backend (a dynamic user is dropped and its
    /// sessions ended), and agents drop their copies.
    Lease {
        #[arg(long)]
        id: String,
        #[command(flatten)]
        options: RevokeOptions,
    },
    /// Every live lease of a credential.
    Credential {
        name: String,
        #[command(flatten)]
        options: RevokeOptions,
    },
    /// Recent revocations and how many agents acknowledged each.
    List,
    /// One revocation, agent by agent.
    Status { id: String },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Records in order.
    List {
        /// From this time on: RFC 3339 (2026-12-01T10:00:00Z) or an age (1h, 30m).
        #[arg(long)]
        since: Option<String>,
        /// Only this subject (a trailing * matches a prefix).
        #[arg(long)]
        subject: Option<String>,
        /// Only this action, or family of actions (revoke matches revoke.entry).
        #[arg(long)]
        action: Option<String>,
        /// At most this many records.
        #[arg(long)]
        limit: Option<i64>,
    },
    /// Every record with its hashes, for archiving or another verifier.
    Export {
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
    },
    /// Recompute the chain and print its head; exits 1 naming the first record that cannot
    /// be trusted.
    Verify {
        /// A head printed by an earlier verify and kept away from the daemon (SEQ:HASH): the
        /// chain must still hold that record with that hash, which shows a tail deleted and
        /// written again.
        #[arg(long)]
        head: Option<AuditHead>,
        /// Check this file written by `audit export` instead, without a daemon.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Trust domain of the throwaway daemon.
    #[arg(long, default_value = "example.org")]
    pub trust_domain: String,
    /// Node API address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub node_listen: std::net::SocketAddr,
}

/// How operator subcommands find the daemon.
#[derive(Debug, Args, Clone)]
pub struct Connection {
    /// The daemon's admin socket.
    #[arg(long, global = true, env = "MAYFLY_ADMIN_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Read the admin socket path from this daemon.toml instead.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Register a workload identity.
    Create(EntryFields),
    /// List entries.
    List {
        #[arg(long)]
        parent_id: Option<String>,
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Show one entry.
    Show { id: String },
    /// Change an entry; fields not given keep their value.
    Update {
        id: String,
        #[command(flatten)]
        fields: EntryUpdateFields,
    },
    /// Delete an entry; agents drop its SVIDs.
    Delete { id: String },
}

#[derive(Debug, Args)]
pub struct EntryFields {
    /// The workload's SPIFFE ID.
    #[arg(long, required_unless_present = "file")]
    pub spiffe_id: Option<String>,
    /// The SPIFFE ID of the agent that serves it.
    #[arg(long, required_unless_present = "file")]
    pub parent_id: Option<String>,
    /// A selector the workload must match, e.g. unix:uid:1000 (repeatable; all must match).
    #[arg(long = "selector", required_unless_present = "file")]
    pub selectors: Vec<String>,
    /// Create every entry in this JSON file instead (`-`: standard input), as
    /// `{"entries": [{"spiffe_id": …, "parent_id": …, "selectors": ["unix:uid:1000"],
    /// "x509_svid_ttl": 3600, "jwt_svid_ttl": 300, "dns_names": […], "hint": …,
    /// "sets": […]}]}` (TTLs in seconds, all but the first three optional). Sent 1,000 to a
    /// call, each call one transaction; every entry gets its own result.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "spiffe_id", "parent_id", "selectors", "x509_ttl", "jwt_ttl", "dns_names", "sets"
    ])]
    pub file: Option<std::path::PathBuf>,
    /// X509-SVID lifetime, e.g. 1h (default: the daemon's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub x509_ttl: Option<std::time::Duration>,
    /// JWT-SVID lifetime, e.g. 5m (default: the daemon's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub jwt_ttl: Option<std::time::Duration>,
    /// A DNS name to add to the SVID (repeatable).
    #[arg(long = "dns")]
    pub dns_names: Vec<String>,
    /// A hint shown to workloads holding several SVIDs.
    #[arg(long, default_value = "")]
    pub hint: String,
    /// A policy set (Mayfly::EntrySet) the entry is in (repeatable).
    #[arg(long = "set")]
    pub sets: Vec<String>,
}

#[derive(Debug, Args)]
pub struct EntryUpdateFields {
    #[arg(long)]
    pub spiffe_id: Option<String>,
    #[arg(long)]
    pub parent_id: Option<String>,
    /// Replaces all selectors (repeatable).
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub x509_ttl: Option<std::time::Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub jwt_ttl: Option<std::time::Duration>,
    /// Replaces all DNS names (repeatable).
    #[arg(long = "dns")]
    pub dns_names: Vec<String>,
    /// Remove every DNS name.
    #[arg(long, conflicts_with = "dns_names")]
    pub clear_dns: bool,
    #[arg(long)]
    pub hint: Option<String>,
    /// Replaces all policy sets (repeatable).
    #[arg(long = "set")]
    pub sets: Vec<String>,
    /// Take the entry out of every policy set.
    #[arg(long, conflicts_with = "sets")]
    pub clear_sets: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a single-use join token for an agent.
    Generate {
        /// The SPIFFE ID the agent will get.
        #[arg(long)]
        spiffe_id: String,
        /// How long the token stays valid (default: the daemon's, 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List attested agents.
    List,
    /// Cut an agent off; it must re-attest with a new join token.
    Evict {
        spiffe_id: String,
        #[arg(long, default_value = "evicted by operator")]
        reason: String,
    },
    /// Cut an agent off for good.
    Ban {
        spiffe_id: String,
        #[arg(long, default_value = "banned by operator")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust bundle.
    Show {
        /// pem, or jwks (the SPIFFE bundle format).
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    Pem,
    Jwks,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Show the CA slots.
    Show,
    /// Create the next CA now and publish it in the bundle.
    Prepare,
    /// Sign with the prepared CA from now on.
    Activate,
    /// The CA's key may be compromised: sign with a new CA at once, and have every agent
    /// re-sign everything chained to the old one (waits for acknowledgements; exit 3 if
    /// any agent did not acknowledge).
    Taint {
        #[command(flatten)]
        options: RevokeOptions,
    },
    /// Remove a retired CA from the bundle once nothing depends on it.
    Revoke {
        /// The retired slot (default: the most recently tainted).
        #[arg(long)]
        slot: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Define a credential from a TOML file with the keys of a [[credential]] table.
    Create {
        #[arg(long)]
        file: PathBuf,
    },
    /// List credentials with their grants, TTLs and live leases.
    List,
    /// Show one credential.
    Show { name: String },
    /// Delete a credential defined through the API (refused while leases are live).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Live leases (with --all, revoked ones too).
    List {
        /// Only this workload's (a SPIFFE ID).
        #[arg(long)]
        holder: Option<String>,
        /// Only this credential's.
        #[arg(long)]
        credential: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// One lease.
    Show { id: String },
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Define a secret from a TOML file with the keys of a [[secret]] table.
    Create {
        #[arg(long)]
        file: PathBuf,
        /// A local secret's value now (the file's content, one trailing newline dropped):
        /// imported as its current version, so the first rotation starts from it.
        #[arg(long)]
        value_file: Option<PathBuf>,
    },
    /// List secrets with their schedule and last outcome.
    List,
    /// Show a secret's definition summary.
    Show { name: String },
    /// Schedule, next run, last outcome and version history (never values).
    Status { name: String },
    /// Delete a secret defined through the API.
    Delete { name: String },
    /// Rotate now and wait for the outcome.
    Rotate { name: String },
    /// Print the current value (operators only; logged).
    Get { name: String },
}
