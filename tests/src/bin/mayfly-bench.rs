//! `mayfly-bench`: the load client behind scripts/bench.
//!
//! Each subcommand drives one signer with the same pre-made CSR pool and the same load
//! pattern, and prints one JSON line on stdout. It exits non-zero if any request failed, so
//! a broken run never lands in docs/benchmarks.md.

use std::process::ExitCode;

use anyhow::{Result, anyhow};
use clap::{Parser, Subcommand};
use mayfly_tests::bench::{
    agent, blast, ceiling, creds, creds_cache, elevation, fanout, ha, mayfly, openbao, policy,
    revocation, rotation, scale, sinks,
};

#[derive(Parser)]
#[command(
    name = "mayfly-bench",
    about = "SVID signing load client (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sign CSRs with an OpenBao PKI mount (`POST /v1/pki-bench/sign/svid`).
    OpenbaoSign {
        /// OpenBao's address; must be on 127.0.0.1.
        #[arg(long, default_value = "http://127.0.0.1:8200")]
        bao_addr: String,
        /// A token allowed to mount and configure PKI (the dev server's root token).
        #[arg(long, default_value = "root")]
        token: String,
        /// Exactly this many sign requests are sent.
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        /// Concurrent keep-alive HTTP/1.1 connections.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Distinct pre-made CSRs that requests cycle through.
        #[arg(long, default_value_t = 256)]
        csr_pool: usize,
    },
    /// Measure a running agent: entry-to-stream delivery, first-message latency with many
    /// connected workloads, and its resident memory.
    Agent {
        #[arg(long)]
        admin_socket: std::path::PathBuf,
        #[arg(long)]
        agent_socket: std::path::PathBuf,
        /// The agent's pid, for its resident memory.
        #[arg(long)]
        agent_pid: u32,
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        /// The agent's SPIFFE ID (the parent of the entries created).
        #[arg(long)]
        parent_id: String,
        #[arg(long, default_value_t = 100)]
        deliveries: usize,
        #[arg(long, default_value_t = 100)]
        entries: usize,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
    },
    /// Measure rotation: schedule fire to promotion (PostgreSQL target) and 1,000 secrets
    /// due in the same second.
    Rotation {
        #[arg(long)]
        admin_socket: std::path::PathBuf,
        #[arg(long, default_value_t = 20)]
        rotations: usize,
        #[arg(long, default_value_t = 1000)]
        secrets: usize,
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        pg_url: String,
    },
    /// Measure a sink: rotate a secret on the daemon, time until the agent's sink file holds it.
    Sink {
        #[arg(long)]
        admin_socket: std::path::PathBuf,
        /// A secret granted to the agent, which a `kind = "secret"` sink writes to --file.
        #[arg(long)]
        secret: String,
        #[arg(long)]
        file: std::path::PathBuf,
        #[arg(long, default_value_t = 100)]
        rotations: usize,
    },
    /// Revocation fan-out: simulated agents on real sync streams, `revoke selector`
    /// timed until every agent's acknowledgement is in.
    Revocation {
        /// The daemon's node API; must be on 127.0.0.1.
        #[arg(long)]
        node_addr: String,
        #[arg(long)]
        admin_socket: std::path::PathBuf,
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 10)]
        rounds: usize,
    },
    /// Promotion fan-out: simulated agents serving a granted workload, rotations timed
    /// until every agent has the new version, and the secret store's reads counted.
    Fanout {
        /// The daemon's node API; must be on 127.0.0.1.
        #[arg(long)]
        node_addr: String,
        #[arg(long)]
        admin_socket: std::path::PathBuf,
        /// The daemon's metrics endpoint, `127.0.0.1:PORT`.
        #[arg(long)]
        metrics_addr: String,
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        #[arg(long, default_value_t = 100)]
        agents: usize,
        #[arg(long, default_value_t = 20)]
        rotations: usize,
    },
    /// TTL-bound credentials: fresh dynamic PostgreSQL users through Mayfly and OpenBao,
    /// revoke-to-unusable, and a bulk revocation.
    Creds {
        /// The daemon's node API; must be on 127.0.0.1.
        #[arg(long)]
        node_addr: String,
        #[arg(long)]
        admin_socket: std::path::PathBuf,
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        #[arg(long)]
        pg_url: String,
        #[arg(long)]
        vault_url: String,
        #[arg(long, default_value = "root")]
        vault_token: String,
        #[arg(long, default_value_t = 200)]
        count: usize,
        #[arg(long, default_value_t = 20)]
        revocations: usize,
        #[arg(long, default_value_t = 10_000)]
        bulk: usize,
    },
    /// Elevation end: simulated agents each holding a credential under one elevation, then
    /// `elevation end` timed until every agent acknowledged.
    Elevation {
        #[arg(long)]
        node_addr: String,
        #[arg(long)]
        admin_socket: std::path::PathBuf,
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        #[arg(long)]
        pg_url: String,
        #[arg(long, default_value_t = 1_000)]
        agents: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Several daemons on one PostgreSQL: entry changes through another daemon than the
    /// agent's, timed to the agent's stream (and through its own, as the baseline).
    Ha {
        /// `NODE_ADDR,ADMIN_SOCKET` of each daemon (repeat); node addresses on 127.0.0.1.
        #[arg(long = "daemon", required = true)]
        daemons: Vec<String>,
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        #[arg(long, default_value_t = 300)]
        agents: usize,
        #[arg(long, default_value_t = 200)]
        changes: usize,
    },
    /// One daemon, many agents over several worker processes, many entries: its memory,
    /// a bundle change to every agent, entry changes under that load.
    Scale {
        /// The daemon's node API; must be on 127.0.0.1.
        #[arg(long)]
        node_addr: String,
        #[arg(long)]
        admin_socket: std::path::PathBuf,
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        /// The daemon's pid, for its memory.
        #[arg(long)]
        daemon_pid: u32,
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        #[arg(long, default_value_t = 100_000)]
        entries: usize,
        #[arg(long, default_value_t = 200)]
        changes: usize,
        #[arg(long, default_value_t = 4)]
        workers: usize,
    },
    /// A worker of `scale` (started by it): attests agents FROM..FROM+COUNT and reports.
    #[command(hide = true)]
    ScaleAgents {
        #[arg(long)]
        node_addr: String,
        #[arg(long)]
        admin_socket: std::path::PathBuf,
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        run: String,
        #[arg(long)]
        from: usize,
        #[arg(long)]
        count: usize,
    },
    /// The blast-radius report over a fleet: `--all` and one principal's, timed.
    Blast {
        /// The daemon's node API; must be on 127.0.0.1.
        #[arg(long)]
        node_addr: String,
        #[arg(long)]
        admin_socket: std::path::PathBuf,
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        #[arg(long)]
        pg_url: String,
        #[arg(long, default_value_t = 10_000)]
        principals: usize,
        #[arg(long, default_value_t = 10_000)]
        credentials: usize,
        #[arg(long, default_value_t = 1_000)]
        leases: usize,
        #[arg(long, default_value_t = 5)]
        reports: usize,
    },
    /// The agent's credential cache, as a workload sees it on the Workload API socket.
    CredsCache {
        #[arg(long)]
        socket: std::path::PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 10_000)]
        calls: usize,
        #[arg(long, default_value_t = 100)]
        concurrent: usize,
    },
    /// Policy decision latency: the daemon's PolicyEngine with generated policies (no
    /// network, one core).
    PolicyDecide {
        #[arg(long, default_value_t = 1000)]
        policies: usize,
        /// Of them, signing forbids written without a scope (second run).
        #[arg(long, default_value_t = 250)]
        unscoped: usize,
        #[arg(long, default_value_t = 10_000)]
        entities: usize,
        #[arg(long, default_value_t = 200_000)]
        decisions: usize,
    },
    /// Write the generated policies the decision bench uses into DIR (bench.cedar).
    PolicyGen {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 1000)]
        policies: usize,
    },
    /// The crypto ceiling of signing: one ECDSA P-256 verification (the CSR's) and one
    /// signature (the CA's) per certificate, with aws-lc, on every thread; nothing else.
    CryptoCeiling {
        /// Threads signing at once (the cores the daemon runs on).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 8.0)]
        seconds: f64,
        #[arg(long, default_value_t = 256)]
        csr_pool: usize,
    },
    /// Sign CSRs through a running mayflyd's node API (gRPC + mTLS, `SignSvids`).
    MayflySign {
        /// The daemon's node API; must be on 127.0.0.1.
        #[arg(long, default_value = "127.0.0.1:8081")]
        node_addr: String,
        /// The daemon's admin socket (to register the bench agent and its entries).
        #[arg(long)]
        admin_socket: std::path::PathBuf,
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        /// Exactly this many SignSvids calls are sent.
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        /// CSRs per call (an agent batches the SVIDs it renews).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Concurrent mTLS connections.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Distinct pre-made CSRs (and entries) that requests cycle through.
        #[arg(long, default_value_t = 256)]
        csr_pool: usize,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mayfly-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow!("a rustls crypto provider was already installed"))?;
    let cli = Cli::parse();
    // The signing load clients run on one thread (as `wrk -t1` would), for Mayfly and
    // OpenBao alike: the signer under test shares the machine's two cores with them, and a
    // second client thread cost each call a cross-thread wake-up (docs/benchmarks.md).
    let rt = if matches!(cli.cmd, Cmd::MayflySign { .. } | Cmd::OpenbaoSign { .. }) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Runtime::new()?
    };
    rt.block_on(async {
        match cli.cmd {
            Cmd::Rotation {
                admin_socket,
                rotations,
                secrets,
                pg_url,
            } => {
                let result = rotation::run(&rotation::Options {
                    admin_socket,
                    rotations,
                    secrets,
                    pg_url,
                })
                .await?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(if result.missed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Cmd::Revocation {
                node_addr,
                admin_socket,
                trust_domain,
                agents,
                rounds,
            } => {
                raise_fd_limit();
                let result = revocation::run(&revocation::Options {
                    node_addr,
                    admin_socket,
                    trust_domain,
                    agents,
                    rounds,
                })
                .await?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(if result.unacknowledged == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Cmd::Fanout {
                node_addr,
                admin_socket,
                metrics_addr,
                trust_domain,
                agents,
                rotations,
            } => {
                raise_fd_limit();
                let result = fanout::run(&fanout::Options {
                    node_addr,
                    admin_socket,
                    metrics_addr,
                    trust_domain,
                    agents,
                    rotations,
                })
                .await?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(if result.missed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Cmd::Creds {
                node_addr,
                admin_socket,
                trust_domain,
                pg_url,
                vault_url,
                vault_token,
                count,
                revocations,
                bulk,
            } => {
                let result = creds::run(&creds::Options {
                    node_addr,
                    admin_socket,
                    trust_domain,
                    pg_url,
                    vault_url,
                    vault_token,
                    count,
                    revocations,
                    bulk,
                })
                .await?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(if result.bulk_left == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Cmd::Scale {
                node_addr,
                admin_socket,
                trust_domain,
                daemon_pid,
                agents,
                entries,
                changes,
                workers,
            } => {
                anyhow::ensure!(
                    node_addr.starts_with("127.0.0.1:"),
                    "--node-addr {node_addr}: the bench talks to 127.0.0.1 only"
                );
                let result = scale::run(&scale::Options {
                    node_addr,
                    admin_socket,
                    trust_domain,
                    daemon_pid,
                    agents,
                    entries,
                    changes,
                    workers,
                })
                .await?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(if result.bundle_missed == 0 && result.change_missed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Cmd::ScaleAgents {
                node_addr,
                admin_socket,
                trust_domain,
                run,
                from,
                count,
            } => {
                anyhow::ensure!(
                    node_addr.starts_with("127.0.0.1:"),
                    "--node-addr {node_addr}: the bench talks to 127.0.0.1 only"
                );
                scale::worker(&scale::WorkerOptions {
                    node_addr,
                    admin_socket,
                    trust_domain,
                    run,
                    from,
                    count,
                })
                .await?;
                Ok(ExitCode::SUCCESS)
            }
            Cmd::Ha {
                daemons,
                trust_domain,
                agents,
                changes,
            } => {
                let mut parsed = Vec::new();
                for daemon in daemons {
                    let (addr, socket) = daemon.split_once(',').ok_or_else(|| {
                        anyhow::anyhow!("--daemon {daemon}: give NODE_ADDR,ADMIN_SOCKET")
                    })?;
                    anyhow::ensure!(
                        addr.starts_with("127.0.0.1:"),
                        "--daemon {addr}: the bench talks to 127.0.0.1 only"
                    );
                    parsed.push((addr.to_string(), std::path::PathBuf::from(socket)));
                }
                let result = ha::run(&ha::Options {
                    daemons: parsed,
                    trust_domain,
                    agents,
                    changes,
                })
                .await?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(if result.missed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Cmd::Elevation {
                node_addr,
                admin_socket,
                trust_domain,
                pg_url,
                agents,
                rounds,
            } => {
                let result = elevation::run(&elevation::Options {
                    node_addr,
                    admin_socket,
                    trust_domain,
                    pg_url,
                    agents,
                    rounds,
                })
                .await?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(if result.leases_left == 0 && result.users_left == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Cmd::Blast {
                node_addr,
                admin_socket,
                trust_domain,
                pg_url,
                principals,
                credentials,
                leases,
                reports,
            } => {
                let result = blast::run(&blast::Options {
                    node_addr,
                    admin_socket,
                    trust_domain,
                    pg_url,
                    principals,
                    credentials,
                    leases,
                    reports,
                })
                .await?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(ExitCode::SUCCESS)
            }
            Cmd::PolicyDecide {
                policies,
                unscoped,
                entities,
                decisions,
            } => {
                let result = policy::run(&policy::Options {
                    policies,
                    unscoped,
                    entities,
                    decisions,
                })?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(ExitCode::SUCCESS)
            }
            Cmd::PolicyGen { dir, policies } => {
                policy::generate(&dir, policies, 0)?;
                Ok(ExitCode::SUCCESS)
            }
            Cmd::CredsCache {
                socket,
                name,
                calls,
                concurrent,
            } => {
                let result = creds_cache::run(&creds_cache::Options {
                    socket,
                    name,
                    calls,
                    concurrent,
                })
                .await?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(if result.concurrent_leases == 1 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Cmd::Sink {
                admin_socket,
                secret,
                file,
                rotations,
            } => {
                let result = sinks::run(&sinks::Options {
                    admin_socket,
                    secret,
                    file,
                    rotations,
                })
                .await?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(ExitCode::SUCCESS)
            }
            Cmd::Agent {
                admin_socket,
                agent_socket,
                agent_pid,
                trust_domain,
                parent_id,
                deliveries,
                entries,
                connections,
            } => {
                raise_fd_limit();
                let result = agent::run(&agent::Options {
                    admin_socket,
                    agent_socket,
                    agent_pid,
                    trust_domain,
                    parent_id,
                    deliveries,
                    entries,
                    connections,
                })
                .await?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(ExitCode::SUCCESS)
            }
            Cmd::CryptoCeiling {
                threads,
                seconds,
                csr_pool,
            } => {
                eprintln!(
                    "mayfly-bench: crypto ceiling, verify + sign per CSR on {threads} threads for {seconds} s"
                );
                let opts = ceiling::Options {
                    threads,
                    seconds,
                    csr_pool,
                };
                let result = tokio::task::spawn_blocking(move || ceiling::run(&opts)).await??;
                println!("{}", serde_json::to_string(&result)?);
                Ok(ExitCode::SUCCESS)
            }
            Cmd::MayflySign {
                node_addr,
                admin_socket,
                trust_domain,
                count,
                batch,
                concurrency,
                csr_pool,
            } => {
                eprintln!(
                    "mayfly-bench: mayfly-sign, {count} calls of {batch} CSRs over {concurrency} \
                     connections, cycling through {csr_pool} pre-made P-256 CSRs"
                );
                let opts = mayfly::Options {
                    node_addr,
                    admin_socket,
                    trust_domain,
                    count,
                    batch,
                    concurrency,
                    csr_pool,
                };
                let (result, first_error) = mayfly::run(&opts).await?;
                result.print()?;
                if let Some(e) = first_error {
                    eprintln!("mayfly-bench: first error: {e}");
                }
                Ok(if result.errors == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Cmd::OpenbaoSign {
                bao_addr,
                token,
                count,
                concurrency,
                csr_pool,
            } => {
                let opts = openbao::Options {
                    bao_addr,
                    token,
                    count,
                    concurrency,
                    csr_pool,
                };
                eprintln!(
                    "mayfly-bench: openbao-sign, {count} requests over {concurrency} connections, \
                     cycling through {csr_pool} pre-made P-256 CSRs"
                );
                let (result, first_error) = openbao::run(&opts).await?;
                result.print()?;
                if let Some(e) = first_error {
                    eprintln!("mayfly-bench: first error: {e}");
                }
                Ok(if result.errors == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
        }
    })
}

/// A thousand workload connections need more descriptors than the usual soft limit.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
