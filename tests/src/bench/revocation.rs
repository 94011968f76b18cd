//! The revocation fan-out bench: a thousand simulated agents, each attested with its own
//! join token and key and holding its own mTLS sync stream to a real mayflyd, one entry
//! each under a shared selector; then `revoke selector`, timed from the operator's call to
//! every agent's acknowledgement having been accepted by the daemon.
//!
//! A simulated agent does what a real one does on the wire: it reads the revocation from
//! its sync stream and calls `AckRevocation`. It has no SVID cache or sinks, so what is
//! measured is the daemon's fan-out and acknowledgement path.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use mayfly_common::TrustDomain;
use mayfly_proto::v1::{self, sync_message::Update};

use super::{BenchAgent, Latencies, admin_and_bundle};

pub struct Options {
    pub node_addr: String,
    pub admin_socket: PathBuf,
    pub trust_domain: String,
    pub agents: usize,
    pub rounds: usize,
}

#[derive(Serialize, Debug)]
pub struct RevocationResult {
    pub agents: usize,
    pub rounds: usize,
    /// Operator's call -> the revocation read from an agent's stream, every agent, every round.
    pub pushed_p50_ms: f64,
    pub pushed_p99_ms: f64,
    /// Operator's call -> that agent's acknowledgement accepted by the daemon.
    pub acked_p50_ms: f64,
    pub acked_p99_ms: f64,
    pub acked_max_ms: f64,
    /// The operator's `revoke` call, start to report (all acknowledged), per round.
    pub report_p50_ms: f64,
    pub report_max_ms: f64,
    /// The daemon's own figure in the report (revocation to last acknowledgement).
    pub daemon_elapsed_max_ms: i64,
    /// Agents not acknowledged in any report; must be 0.
    pub unacknowledged: usize,
}

/// What one simulated agent saw of one revocation.
struct Seen {
    revocation: String,
    pushed: Instant,
    acked: Instant,
}

pub async fn run(opts: &Options) -> Result<RevocationResult> {
    ensure!(opts.agents > 0 && opts.rounds > 0, "need agents and rounds");
    let trust_domain = TrustDomain::new(&opts.trust_domain)?;
    let (mut admin, bundle) = admin_and_bundle(&opts.admin_socket).await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();

    // Attest every agent and open its stream; each stream reports what it saw.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let mut agent_ids = Vec::with_capacity(opts.agents);
    for i in 0..opts.agents {
        let agent_id = format!("spiffe://{trust_domain}/node/rv-{run_id}-{i}");
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
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Some(Update::Revoked(revocation)) = message.update else {
                    continue;
                };
                let pushed = Instant::now();
                let ack = client
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
        agent_ids.push(agent_id);
    }
    eprintln!(
        "mayfly-bench: {} simulated agents attested and streaming",
        opts.agents
    );

    let mut pushed = Latencies::with_capacity(opts.agents * opts.rounds);
    let mut acked = Latencies::with_capacity(opts.agents * opts.rounds);
    let mut reports = Latencies::with_capacity(opts.rounds);
    let mut daemon_max = 0;
    let mut unacknowledged = 0;
    for round in 0..opts.rounds {
        // One entry per agent, all under this round's selector.
        let selector = format!("unix:uid:{}", 70_000 + round);
        let mut creating = tokio::task::JoinSet::new();
        for (i, agent_id) in agent_ids.iter().enumerate() {
            let mut admin = admin.clone();
            let request = v1::CreateEntryRequest {
                spiffe_id: format!("spiffe://{trust_domain}/rv-{run_id}/r{round}/w{i}"),
                parent_id: agent_id.clone(),
                selectors: vec![selector.clone()],
                ..Default::default()
            };
            creating.spawn(async move { admin.create_entry(request).await });
            while creating.len() >= 32 {
                creating.join_next().await.context("entry task")???;
            }
        }
        while let Some(done) = creating.join_next().await {
            done??;
        }
        // Entries reach the streams asynchronously; give them a moment to land.
        tokio::time::sleep(Duration::from_millis(500)).await;

        let started = Instant::now();
        let report = admin
            .revoke(v1::RevokeRequest {
                kind: "selector".into(),
                target: selector.clone(),
                reason: format!("bench round {round}"),
                wait_ms: 30_000,
            })
            .await
            .context("revoke selector")?
            .into_inner();
        reports.record(started.elapsed());
        daemon_max = daemon_max.max(report.elapsed_ms);
        let missing = report.agents.iter().filter(|a| !a.acknowledged).count();
        unacknowledged += missing;
        ensure!(
            report.agents.len() == opts.agents,
            "round {round}: the revocation reached {} agents, not {}",
            report.agents.len(),
            opts.agents
        );
        // Every agent's view of this revocation.
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < opts.agents - missing {
            let seen = tokio::time::timeout_at(deadline.into(), seen_rx.recv())
                .await
                .context("waiting for the simulated agents' acknowledgements")?
                .context("every simulated agent stopped")?;
            if seen.revocation != report.id {
                continue;
            }
            got += 1;
            pushed.record(seen.pushed.saturating_duration_since(started));
            acked.record(seen.acked.saturating_duration_since(started));
        }
        eprintln!(
            "mayfly-bench: round {round}: {} agents acknowledged in {} ms (daemon: {} ms)",
            report.agents.len() - missing,
            started.elapsed().as_millis(),
            report.elapsed_ms
        );
    }
    Ok(RevocationResult {
        agents: opts.agents,
        rounds: opts.rounds,
        pushed_p50_ms: pushed.percentile_ms(50.0),
        pushed_p99_ms: pushed.percentile_ms(99.0),
        acked_p50_ms: acked.percentile_ms(50.0),
        acked_p99_ms: acked.percentile_ms(99.0),
        acked_max_ms: acked.percentile_ms(100.0),
        report_p50_ms: reports.percentile_ms(50.0),
        report_max_ms: reports.percentile_ms(100.0),
        daemon_elapsed_max_ms: daemon_max,
        unacknowledged,
    })
}
