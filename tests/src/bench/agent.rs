//! The agent benchmarks: how fast a new entry reaches a workload's open stream, how fast
//! the first FetchX509SVID message arrives with 1,000 workloads connected, and how much
//! memory the agent holds while serving them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use tokio_stream::StreamExt;

use mayfly_agent::cli::api::{client, request};
use mayfly_agent::cli::endpoint::WorkloadEndpoint;
use mayfly_daemon::cli::{Connection, OutputFormat, operator};
use mayfly_proto::v1::{self};
use mayfly_proto::workload::X509svidRequest;

use super::Latencies;

pub struct Options {
    pub admin_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub agent_pid: u32,
    pub trust_domain: String,
    pub parent_id: String,
    /// Entries created one after another for the delivery measurement.
    pub deliveries: usize,
    /// Entries registered for the caller before the connection test (the agent holds them all).
    pub entries: usize,
    pub connections: usize,
}

#[derive(Serialize, Debug)]
pub struct AgentResult {
    pub deliveries: usize,
    pub delivery_p50_ms: f64,
    pub delivery_p99_ms: f64,
    pub delivery_max_ms: f64,
    pub connections: usize,
    pub entries: usize,
    /// First message for the workloads connecting (50 at a time) while the load builds up.
    pub burst_p50_ms: f64,
    pub burst_p99_ms: f64,
    /// First message of a fresh call with every workload connected and streaming.
    pub first_message_p50_ms: f64,
    pub first_message_p99_ms: f64,
    pub agent_rss_kib: u64,
    /// What `agent_rss_kib` is made of: anonymous memory (heap, stacks) and pages of mapped
    /// files (the executable, libc).
    pub agent_rss_anon_kib: u64,
    pub agent_rss_file_kib: u64,
    pub agent_rss_idle_kib: u64,
}

/// The agent's resident memory as /proc/PID/status gives it: VmRSS, RssAnon, RssFile.
struct Resident {
    total_kib: u64,
    anon_kib: u64,
    file_kib: u64,
}

fn resident(pid: u32) -> Result<Resident> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the agent's /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} line in /proc/{pid}/status"))
    };
    Ok(Resident {
        total_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:")?,
        file_kib: field("RssFile:")?,
    })
}

pub async fn run(opts: &Options) -> Result<AgentResult> {
    let mut admin = operator::connect(&Connection {
        socket: Some(opts.admin_socket.clone()),
        config: None,
        output: OutputFormat::Json,
    })
    .await?;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let selector = format!("unix:uid:{uid}");
    let rss_idle = resident(opts.agent_pid)?.total_kib;

    // 1. Entry created -> SVID on an open stream. A caller with no entry at all is refused,
    // so one anchor entry comes first; the stream is opened once its SVID is there.
    let run_id = uuid_like();
    admin
        .create_entry(v1::CreateEntryRequest {
            spiffe_id: format!("spiffe://{}/bench/{run_id}/anchor", opts.trust_domain),
            parent_id: opts.parent_id.clone(),
            selectors: vec![selector.clone()],
            ..Default::default()
        })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        let mut api = client(&WorkloadEndpoint::Unix(opts.agent_socket.clone())).await?;
        match api.fetch_x509svid(request(X509svidRequest {})).await {
            Ok(response) => break response.into_inner(),
            Err(status) => {
                ensure!(Instant::now() < deadline, "FetchX509SVID: {status}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let mut delivery = Latencies::with_capacity(opts.deliveries);
    for i in 0..opts.deliveries {
        let spiffe_id = format!("spiffe://{}/bench/{run_id}/{i}", opts.trust_domain);
        let started = Instant::now();
        let created = admin
            .create_entry(v1::CreateEntryRequest {
                spiffe_id: spiffe_id.clone(),
                parent_id: opts.parent_id.clone(),
                selectors: vec![selector.clone()],
                ..Default::default()
            })
            .await?
            .into_inner();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .context("no stream update within 10 s")?
                .context("the stream ended")?
                .map_err(|s| anyhow::anyhow!("stream: {s}"))?;
            if message.svids.iter().any(|s| s.spiffe_id == spiffe_id) {
                delivery.record(started.elapsed());
                break;
            }
        }
        // Back to one SVID for this caller, so the next phase looks like a real workload.
        admin
            .delete_entry(v1::DeleteEntryRequest { id: created.id })
            .await?;
    }
    drop(stream);

    // 2. The agent holds `entries` entries (the anchor plus others for uids that never
    // connect), and `connections` workloads connect and keep their streams open.
    for i in 1..opts.entries {
        admin
            .create_entry(v1::CreateEntryRequest {
                spiffe_id: format!("spiffe://{}/bench/{run_id}/other-{i}", opts.trust_domain),
                parent_id: opts.parent_id.clone(),
                selectors: vec![format!("unix:uid:{}", 20_000 + i)],
                ..Default::default()
            })
            .await?;
    }
    // Signing 100 SVIDs takes milliseconds; give the agent ample time before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (hold_tx, hold_rx) = tokio::sync::watch::channel(false);
    let mut holders = Vec::with_capacity(opts.connections);
    let mut burst = Latencies::with_capacity(opts.connections);
    // Connect in waves of 50 so the burst figure measures the agent, not a 1,000-way pile-up
    // of the load client's own tasks on two cores.
    for wave in (0..opts.connections).collect::<Vec<_>>().chunks(50) {
        let mut tasks = Vec::with_capacity(wave.len());
        for _ in wave {
            let socket = WorkloadEndpoint::Unix(opts.agent_socket.clone());
            let mut hold = hold_rx.clone();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            holders.push(tokio::spawn(async move {
                let outcome = async {
                    let mut api = client(&socket).await?;
                    let started = Instant::now();
                    let mut stream = api
                        .fetch_x509svid(request(X509svidRequest {}))
                        .await?
                        .into_inner();
                    let first = stream.next().await.context("stream ended")??;
                    ensure!(
                        first.svids.len() == 1,
                        "expected one SVID, got {}",
                        first.svids.len()
                    );
                    anyhow::Ok((started.elapsed(), stream, api))
                }
                .await;
                match outcome {
                    Ok((elapsed, stream, api)) => {
                        let _ = ready_tx.send(Ok(elapsed));
                        // Keep the connection and its stream open until the memory reading.
                        let _ = hold.wait_for(|h| *h).await;
                        drop((stream, api));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            }));
            tasks.push(ready_rx);
        }
        for ready in tasks {
            burst.record(ready.await.context("holder task died")??);
        }
    }

    // 3. With every workload connected, fresh FetchX509SVID calls one at a time.
    let mut first_message = Latencies::with_capacity(opts.connections);
    let mut api = client(&WorkloadEndpoint::Unix(opts.agent_socket.clone())).await?;
    for _ in 0..opts.connections {
        let started = Instant::now();
        let mut stream = api
            .fetch_x509svid(request(X509svidRequest {}))
            .await?
            .into_inner();
        stream.next().await.context("stream ended")??;
        first_message.record(started.elapsed());
    }
    // Steady state: the connections stay open while the agent settles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = resident(opts.agent_pid)?;
    let _ = hold_tx.send(true);
    for holder in holders {
        let _ = holder.await;
    }
    Ok(AgentResult {
        deliveries: opts.deliveries,
        delivery_p50_ms: delivery.percentile_ms(50.0),
        delivery_p99_ms: delivery.percentile_ms(99.0),
        delivery_max_ms: delivery.percentile_ms(100.0),
        connections: opts.connections,
        entries: opts.entries,
        burst_p50_ms: burst.percentile_ms(50.0),
        burst_p99_ms: burst.percentile_ms(99.0),
        first_message_p50_ms: first_message.percentile_ms(50.0),
        first_message_p99_ms: first_message.percentile_ms(99.0),
        agent_rss_kib: rss.total_kib,
        agent_rss_anon_kib: rss.anon_kib,
        agent_rss_file_kib: rss.file_kib,
        agent_rss_idle_kib: rss_idle,
    })
}

fn uuid_like() -> String {
    format!("{:016x}", rand::random::<u64>())
}
