//! The elevation-end bench: a thousand simulated agents on real sync streams, each serving
//! the same workload; the workload asks for an elevation to a `postgres_dynamic` credential
//! nobody holds standing, an operator approves it on the elevation socket, and every agent
//! obtains its own database user under it. Then `elevation end`, timed from the call to each
//! agent's acknowledgement of the revocation, with every user dropped at the database first.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use sqlx::Connection as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use mayfly_common::TrustDomain;
use mayfly_proto::v1::{self, sync_message::Update};

use super::{BenchAgent, Latencies, admin_and_bundle};

pub struct Options {
    pub node_addr: String,
    pub admin_socket: PathBuf,
    pub trust_domain: String,
    /// An admin login to the PostgreSQL the users are made on (`postgres://…/db`).
    pub pg_url: String,
    pub agents: usize,
    pub rounds: usize,
}

#[derive(Serialize, Debug)]
pub struct ElevationResult {
    pub agents: usize,
    pub rounds: usize,
    /// Credentials issued under each elevation (one per agent).
    pub leases_per_round: usize,
    /// `elevation end` called -> the revocation read from an agent's stream.
    pub pushed_p50_ms: f64,
    pub pushed_p99_ms: f64,
    /// `elevation end` called -> that agent's acknowledgement accepted by the daemon.
    pub acked_p50_ms: f64,
    pub acked_p99_ms: f64,
    pub acked_max_ms: f64,
    /// The `end` call itself (users dropped, fan-out, acknowledgements), per round.
    pub end_p50_ms: f64,
    pub end_max_ms: f64,
    /// Leases still live after an end, and users that could still log in; must be 0.
    pub leases_left: usize,
    pub users_left: usize,
    pub issue_seconds_per_round: f64,
}

struct Seen {
    revocation: String,
    pushed: Instant,
    acked: Instant,
}

pub async fn run(opts: &Options) -> Result<ElevationResult> {
    ensure!(opts.agents > 0 && opts.rounds > 0, "need agents and rounds");
    let trust_domain = TrustDomain::new(&opts.trust_domain)?;
    let (mut admin, bundle) = admin_and_bundle(&opts.admin_socket).await?;
    let mut elevations =
        mayfly_daemon::cli::elevation::connect(&opts.admin_socket.with_file_name("elevation.sock"))
            .await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let workload = format!("spiffe://{trust_domain}/elev-{run_id}/triage-bot");
    let credential = format!("elev-{run_id}");
    admin
        .create_credential(v1::CreateCredentialRequest {
            definition: format!(
                "name = \"{credential}\"\ngrants = []\ndefault_ttl = \"10m\"\n[backend]\n\
                 kind = \"postgres_dynamic\"\nadmin_url = \"{}\"\n",
                opts.pg_url
            ),
        })
        .await
        .context("defining the credential")?;

    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let mut nodes = Vec::with_capacity(opts.agents);
    for i in 0..opts.agents {
        let agent_id = format!("spiffe://{trust_domain}/node/el-{run_id}-{i}");
        admin
            .create_entry(v1::CreateEntryRequest {
                spiffe_id: workload.clone(),
                parent_id: agent_id.clone(),
                selectors: vec!["unix:uid:4242".into()],
                ..Default::default()
            })
            .await?;
        let agent = BenchAgent::attest(
            &mut admin,
            &opts.node_addr,
            &trust_domain,
            &bundle,
            &agent_id,
        )
        .await
        .with_context(|| format!("attesting simulated agent {i}"))?;
        let mut client = agent.client().await?;
        let mut stream = client
            .sync(v1::SyncRequest {})
            .await
            .with_context(|| format!("opening simulated agent {i}'s sync stream"))?
            .into_inner();
        let seen = seen_tx.clone();
        let mut acker = client.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Some(Update::Revoked(revocation)) = message.update else {
                    continue;
                };
                let pushed = Instant::now();
                let ack = acker
                    .ack_revocation(v1::RevocationAck {
                        revocation_id: revocation.id.clone(),
                        ..Default::default()
                    })
                    .await;
                if ack.is_err() {
                    continue;
                }
                let _ = seen.send(Seen {
                    revocation: revocation.id,
                    pushed,
                    acked: Instant::now(),
                });
            }
        });
        nodes.push(client);
    }
    eprintln!(
        "mayfly-bench: {} simulated agents attested and streaming",
        opts.agents
    );

    let mut pushed = Latencies::with_capacity(opts.agents * opts.rounds);
    let mut acked = Latencies::with_capacity(opts.agents * opts.rounds);
    let mut ends = Latencies::with_capacity(opts.rounds);
    let (mut leases_left, mut users_left) = (0, 0);
    let mut issue_seconds = 0.0;
    for round in 0..opts.rounds {
        let asked = nodes[0]
            .request_elevation(v1::HolderElevationRequest {
                spiffe_id: workload.clone(),
                request: Some(v1::ElevationRequest {
                    scope_kind: "credential".into(),
                    scope_name: credential.clone(),
                    ttl_seconds: 600,
                    reason: format!("bench round {round}"),
                    ticket: "BENCH-1".into(),
                    break_glass: false,
                }),
            })
            .await
            .context("requesting the elevation")?
            .into_inner();
        let active = elevations
            .review_elevation(v1::ReviewElevationRequest {
                id: asked.id.clone(),
                approve: true,
                comment: String::new(),
            })
            .await
            .context("approving the elevation")?
            .into_inner();
        ensure!(
            active.state == "active",
            "the elevation is {}",
            active.state
        );

        let started = Instant::now();
        let mut users = Vec::with_capacity(opts.agents);
        let mut issuing = tokio::task::JoinSet::new();
        for node in &nodes {
            let mut node = node.clone();
            let request = v1::IssueCredentialRequest {
                name: credential.clone(),
                spiffe_id: workload.clone(),
                ttl_seconds: 0,
            };
            issuing.spawn(async move { node.issue_credential(request).await });
            while issuing.len() >= 16 {
                users.push(
                    issuing
                        .join_next()
                        .await
                        .context("issue task")???
                        .into_inner(),
                );
            }
        }
        while let Some(done) = issuing.join_next().await {
            users.push(done??.into_inner());
        }
        issue_seconds += started.elapsed().as_secs_f64();

        let started = Instant::now();
        let ended = elevations
            .end_elevation(v1::EndElevationRequest {
                id: asked.id.clone(),
                reason: format!("bench round {round} done"),
            })
            .await
            .context("ending the elevation")?
            .into_inner();
        ends.record(started.elapsed());
        let revocation = ended.revocation.context("the end revoked nothing")?.id;
        leases_left += ended.leases.iter().filter(|l| l.state != "revoked").count();
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < opts.agents {
            let seen = tokio::time::timeout_at(deadline.into(), seen_rx.recv())
                .await
                .context("waiting for the simulated agents' acknowledgements")?
                .context("every simulated agent stopped")?;
            if seen.revocation != revocation {
                continue;
            }
            got += 1;
            pushed.record(seen.pushed.saturating_duration_since(started));
            acked.record(seen.acked.saturating_duration_since(started));
        }
        // A sample of the users: none may log in any more.
        for user in users.iter().step_by((opts.agents / 10).max(1)) {
            let login = sqlx::postgres::PgConnectOptions::new()
                .host("127.0.0.1")
                .port(5432)
                .username(&user.values["username"])
                .password(&user.values["password"])
                .database("postgres");
            if let Ok(conn) = sqlx::PgConnection::connect_with(&login).await {
                users_left += 1;
                let _ = conn.close().await;
            }
        }
        eprintln!(
            "mayfly-bench: round {round}: {} leases revoked and acknowledged in {} ms",
            ended.leases.len(),
            started.elapsed().as_millis()
        );
    }
    Ok(ElevationResult {
        agents: opts.agents,
        rounds: opts.rounds,
        leases_per_round: opts.agents,
        pushed_p50_ms: pushed.percentile_ms(50.0),
        pushed_p99_ms: pushed.percentile_ms(99.0),
        acked_p50_ms: acked.percentile_ms(50.0),
        acked_p99_ms: acked.percentile_ms(99.0),
        acked_max_ms: acked.percentile_ms(100.0),
        end_p50_ms: ends.percentile_ms(50.0),
        end_max_ms: ends.percentile_ms(100.0),
        leases_left,
        users_left,
        issue_seconds_per_round: issue_seconds / opts.rounds as f64,
    })
}
