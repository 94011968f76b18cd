//! The agent benchmarks: how fast a new entry reaches a workload's open stream, how fast
//! the first FetchX509SVID message arrives with 1,000 workloads connected, and how much
//! memory the agent holds while serving them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use tokio_stream::StreamExt;

use mayfly_agent::cli::api::{client, request};
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
    pub first_message_p50_ms: f64,
    pub first_message_p99_ms: f64,
    pub agent_rss_kib: u64,
    pub agent_rss_idle_kib: u64,
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the agent's /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS line")
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
    let rss_idle = rss_kib(opts.agent_pid)?;

    // 1. Entry created -> SVID on an open stream.
    let mut api = client(&opts.agent_socket).await?;
    let first = api
        .fetch_x509svid(request(X509svidRequest {}))
        .await
        .map_err(|s| anyhow::anyhow!("FetchX509SVID: {s}"))?;
    let mut stream = first.into_inner();
    // The caller may have no entry yet, in which case the agent holds the stream open.
    let mut delivery = Latencies::with_capacity(opts.deliveries);
    let run_id = uuid_like();
    for i in 0..opts.deliveries {
        let spiffe_id = format!("spiffe://{}/bench/{run_id}/{i}", opts.trust_domain);
        let started = Instant::now();
        admin
            .create_entry(v1::CreateEntryRequest {
                spiffe_id: spiffe_id.clone(),
                parent_id: opts.parent_id.clone(),
                selectors: vec![selector.clone()],
                ..Default::default()
            })
            .await?;
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
    }
    drop(stream);

    // 2. Register up to `entries` for the caller, then 1,000 concurrent first messages.
    for i in opts.deliveries..opts.entries {
        admin
            .create_entry(v1::CreateEntryRequest {
                spiffe_id: format!("spiffe://{}/bench/{run_id}/{i}", opts.trust_domain),
                parent_id: opts.parent_id.clone(),
                selectors: vec![selector.clone()],
                ..Default::default()
            })
            .await?;
    }
    let expected = opts.entries.max(opts.deliveries);
    // Wait until the agent holds an SVID for every entry.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut probe = client(&opts.agent_socket).await?;
        let got = probe
            .fetch_x509svid(request(X509svidRequest {}))
            .await?
            .into_inner()
            .next()
            .await
            .context("probe stream ended")??;
        if got.svids.len() >= expected {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "agent holds {} of {expected} SVIDs",
            got.svids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut tasks = Vec::with_capacity(opts.connections);
    let (hold_tx, hold_rx) = tokio::sync::watch::channel(false);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(opts.connections + 1));
    for _ in 0..opts.connections {
        let socket = opts.agent_socket.clone();
        let barrier = barrier.clone();
        let mut hold = hold_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut api = client(&socket).await?;
            barrier.wait().await;
            let started = Instant::now();
            let mut stream = api
                .fetch_x509svid(request(X509svidRequest {}))
                .await?
                .into_inner();
            let first = stream.next().await.context("stream ended")??;
            let elapsed = started.elapsed();
            ensure!(first.svids.len() >= expected, "short first message");
            // Keep the connection and stream open until the memory reading.
            let _ = hold.wait_for(|h| *h).await;
            drop(stream);
            anyhow::Ok(elapsed)
        }));
    }
    barrier.wait().await;
    // Every client has sent its request once all first messages are in; then read RSS.
    let mut first_message = Latencies::with_capacity(opts.connections);
    let mut waiting = Vec::new();
    for task in tasks {
        waiting.push(task);
    }
    // Give every task time to receive its first message before sampling memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = rss_kib(opts.agent_pid)?;
    let _ = hold_tx.send(true);
    for task in waiting {
        first_message.record(task.await??);
    }
    Ok(AgentResult {
        deliveries: opts.deliveries,
        delivery_p50_ms: delivery.percentile_ms(50.0),
        delivery_p99_ms: delivery.percentile_ms(99.0),
        delivery_max_ms: delivery.percentile_ms(100.0),
        connections: opts.connections,
        entries: expected,
        first_message_p50_ms: first_message.percentile_ms(50.0),
        first_message_p99_ms: first_message.percentile_ms(99.0),
        agent_rss_kib: rss,
        agent_rss_idle_kib: rss_idle,
    })
}

fn uuid_like() -> String {
    format!("{:016x}", rand::random::<u64>())
}
