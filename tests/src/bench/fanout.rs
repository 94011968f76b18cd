//! The promotion fan-out bench: simulated agents on real sync streams, each serving a
//! workload granted one secret; then rotations of that secret, each timed until every
//! agent has read the new version from its stream. Besides the latency it counts what a
//! promotion costs the secret's store (`mayfly_secret_value_reads_total` before and after):
//! the value is read once per promotion, however many agents hold it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use mayfly_common::TrustDomain;
use mayfly_proto::v1::{self, sync_message::Update};

use super::{BenchAgent, Latencies, admin_and_bundle};

const READS: &str = "mayfly_secret_value_reads_total";

pub struct Options {
    pub node_addr: String,
    pub admin_socket: PathBuf,
    /// `IP:PORT` of the daemon's metrics endpoint.
    pub metrics_addr: String,
    pub trust_domain: String,
    pub agents: usize,
    pub rotations: usize,
}

#[derive(Serialize, Debug)]
pub struct FanoutResult {
    pub agents: usize,
    pub rotations: usize,
    /// Reads of the secret's store per rotation, all agents together.
    pub store_reads_per_rotation: f64,
    /// The rotate call's answer (promoted) -> the new version read from an agent's stream.
    pub pushed_p50_ms: f64,
    pub pushed_p99_ms: f64,
    pub pushed_max_ms: f64,
    /// Versions some agent never received; must be 0.
    pub missed: usize,
}

pub async fn run(opts: &Options) -> Result<FanoutResult> {
    ensure!(
        opts.agents > 0 && opts.rotations > 0,
        "need agents and rotations"
    );
    let trust_domain = TrustDomain::new(&opts.trust_domain)?;
    let (mut admin, bundle) = admin_and_bundle(&opts.admin_socket).await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let secret = format!("fanout-{run_id}");
    let workload = format!("spiffe://{trust_domain}/fanout-{run_id}/app");
    admin
        .create_secret(v1::CreateSecretRequest {
            definition: format!(
                "name = \"{secret}\"\nschedule = \"@yearly\"\ngrants = [\"{workload}\"]\n\
                 [store]\nkind = \"local\"\n[target]\nkind = \"none\"\n"
            ),
            ..Default::default()
        })
        .await
        .context("defining the bench secret")?;

    // Each agent serves the granted workload; each stream reports the versions it reads.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, String, Instant)>();
    for i in 0..opts.agents {
        let agent_id = format!("spiffe://{trust_domain}/node/fo-{run_id}-{i}");
        admin
            .create_entry(v1::CreateEntryRequest {
                spiffe_id: workload.clone(),
                parent_id: agent_id.clone(),
                selectors: vec!["unix:uid:0".into()],
                ..Default::default()
            })
            .await
            .with_context(|| format!("entry for simulated agent {i}"))?;
        let agent = BenchAgent::attest(
            &mut admin,
            &opts.node_addr,
            &trust_domain,
            &bundle,
            &agent_id,
        )
        .await
        .with_context(|| format!("attesting simulated agent {i}"))?;
        let mut stream = agent
            .client()
            .await?
            .sync(v1::SyncRequest {})
            .await
            .with_context(|| format!("opening simulated agent {i}'s sync stream"))?
            .into_inner();
        let seen = seen_tx.clone();
        let name = secret.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Some(Update::SecretUpdated(pushed)) = message.update
                    && pushed.name == name
                {
                    let _ = seen.send((i, pushed.version, Instant::now()));
                }
            }
        });
    }
    eprintln!(
        "mayfly-bench: {} simulated agents attested and streaming",
        opts.agents
    );
    // The connects' full states read the store too; count from after they are done.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = super::http1::metric(&opts.metrics_addr, READS)
        .await?
        .context("the daemon does not count secret reads")?;

    let mut pushed = Latencies::with_capacity(opts.agents * opts.rotations);
    let mut missed = 0;
    let request = v1::SecretRequest {
        name: secret.clone(),
    };
    for round in 0..opts.rotations {
        let outcome = admin.rotate_secret(request.clone()).await?.into_inner();
        let promoted = Instant::now();
        let version = outcome.job.context("no job in the rotation outcome")?.token;
        let mut got: HashMap<usize, Instant> = HashMap::with_capacity(opts.agents);
        let deadline = promoted + Duration::from_secs(10);
        while got.len() < opts.agents {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, seen_rx.recv()).await {
                Ok(Some((agent, v, at))) if v == version => {
                    got.entry(agent).or_insert(at);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        missed += opts.agents - got.len();
        for at in got.values() {
            pushed.record(at.saturating_duration_since(promoted));
        }
        eprintln!(
            "mayfly-bench: rotation {round}: {} of {} agents have version {version}",
            got.len(),
            opts.agents
        );
    }
    let after = super::http1::metric(&opts.metrics_addr, READS)
        .await?
        .context("the daemon does not count secret reads")?;
    Ok(FanoutResult {
        agents: opts.agents,
        rotations: opts.rotations,
        store_reads_per_rotation: (after - before) / opts.rotations as f64,
        pushed_p50_ms: pushed.percentile_ms(50.0),
        pushed_p99_ms: pushed.percentile_ms(99.0),
        pushed_max_ms: pushed.percentile_ms(100.0),
        missed,
    })
}
