//! The scale bench: one daemon holding many agents. Simulated agents (each attested with
//! its own join token and key, each on its own mTLS sync stream) are spread over several
//! worker processes; the daemon holds many entries spread over them. Measured: the
//! daemon's resident memory with everything connected, a bundle change (`ca prepare`,
//! from the call) until every agent has read it from its stream, and entry changes under that load, each
//! until its agent has read it.
//!
//! Workers report on stdout, one line per event: `up` once their agents stream, `b AGENT
//! UNIX_NS` for a bundle change an agent read, `e ENTRY_ID UNIX_NS` for a timed entry.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use futures::StreamExt as _;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::mpsc;

use mayfly_common::TrustDomain;
use mayfly_proto::v1::{self, sync_message::Update};

use super::{BenchAgent, Latencies, admin_and_bundle};

pub struct Options {
    pub node_addr: String,
    pub admin_socket: PathBuf,
    pub trust_domain: String,
    pub daemon_pid: u32,
    pub agents: usize,
    pub entries: usize,
    pub changes: usize,
    pub workers: usize,
}

#[derive(Serialize, Debug)]
pub struct ScaleResult {
    pub agents: usize,
    pub entries: usize,
    pub workers: usize,
    /// Creating the entries through the admin API (`BatchCreateEntry`, 1,000 a call).
    pub entries_secs: f64,
    /// Attesting every agent and opening its stream.
    pub connect_secs: f64,
    /// The daemon's VmRSS with every agent streaming, and its peak (VmHWM) by the end.
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    /// `PrepareCa` sent → each agent's stream delivers the new bundle.
    pub bundle_p50_ms: f64,
    pub bundle_p99_ms: f64,
    pub bundle_all_ms: f64,
    pub bundle_missed: usize,
    /// `CreateEntry` sent → the entry read from its agent's stream, with every agent
    /// connected.
    pub changes: usize,
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub change_max_ms: f64,
    pub change_missed: usize,
}

fn unix_ns(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

fn agent_id(trust_domain: &TrustDomain, run: &str, i: usize) -> String {
    format!("spiffe://{trust_domain}/node/scale-{run}-{i}")
}

/// A worker's `KIND KEY UNIX_NS` line, when it is of `kind`.
fn event<'a>(line: &'a str, kind: &str) -> Option<(&'a str, u128)> {
    let mut parts = line.split_whitespace();
    if parts.next()? != kind {
        return None;
    }
    let key = parts.next()?;
    Some((key, parts.next()?.parse().ok()?))
}

/// VmRSS and VmHWM of `pid`, in MiB.
fn memory_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the daemon's (pid {pid}) memory"))?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

pub async fn run(opts: &Options) -> Result<ScaleResult> {
    ensure!(
        opts.agents > 0 && opts.workers > 0 && opts.changes > 0,
        "need agents, workers and changes"
    );
    let trust_domain = TrustDomain::new(&opts.trust_domain)?;
    let (admin, _) = admin_and_bundle(&opts.admin_socket).await?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();

    // The entries first, spread over the agents (not yet connected), a thousand to a
    // call as `entry create --file` sends them.
    let started = Instant::now();
    let mut created = 0usize;
    let mut admin_batch = admin.clone();
    for chunk in (0..opts.entries)
        .collect::<Vec<_>>()
        .chunks(mayfly_daemon::identity::MAX_ENTRY_BATCH)
    {
        let entries = chunk
            .iter()
            .map(|&k| v1::CreateEntryRequest {
                spiffe_id: format!("spiffe://{trust_domain}/scale-{run}/w{k}"),
                parent_id: agent_id(&trust_domain, &run, k % opts.agents),
                selectors: vec!["unix:uid:0".into()],
                ..Default::default()
            })
            .collect();
        let answer = admin_batch
            .batch_create_entry(v1::BatchCreateEntryRequest { entries })
            .await?
            .into_inner();
        for refused in answer.results.iter().filter(|r| r.entry.is_none()) {
            eprintln!(
                "mayfly-bench: creating an entry failed: {}",
                refused.message
            );
        }
        created += answer.results.iter().filter(|r| r.entry.is_some()).count();
        if created % 10_000 < 1000 {
            eprintln!("mayfly-bench: {created} entries created");
        }
    }
    let entries_secs = started.elapsed().as_secs_f64();
    eprintln!("mayfly-bench: {created} entries in {entries_secs:.1} s");

    // The workers, each with its share of the agents.
    let exe = std::env::current_exe()?;
    let (events_tx, mut events) = mpsc::unbounded_channel::<String>();
    let mut children = Vec::new();
    let per = opts.agents.div_ceil(opts.workers);
    let started = Instant::now();
    for w in 0..opts.workers {
        let from = w * per;
        let count = per.min(opts.agents.saturating_sub(from));
        if count == 0 {
            break;
        }
        let mut child = tokio::process::Command::new(&exe)
            .arg("scale-agents")
            .args(["--node-addr", &opts.node_addr])
            .arg("--admin-socket")
            .arg(&opts.admin_socket)
            .args(["--trust-domain", &opts.trust_domain, "--run", &run])
            .args(["--from", &from.to_string(), "--count", &count.to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a scale worker")?;
        let stdout = child.stdout.take().context("the worker's stdout")?;
        let tx = events_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        children.push(child);
    }
    let workers = children.len();
    let mut up = 0;
    while up < workers {
        let line = tokio::time::timeout(Duration::from_secs(600), events.recv())
            .await
            .context("the workers did not connect their agents within 10 minutes")?
            .context("the workers ended")?;
        if line == "up" {
            up += 1;
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "mayfly-bench: {} agents streaming from {workers} workers after {connect_secs:.1} s",
        opts.agents
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_mib, _) = memory_mib(opts.daemon_pid)?;

    // A bundle change: every agent reads it from its stream.
    let mut admin = admin.clone();
    // From the call: the daemon pushes the new bundle before it answers.
    let sent = SystemTime::now();
    admin.prepare_ca(v1::PrepareCaRequest {}).await?;
    let mut bundle = Latencies::with_capacity(opts.agents);
    let mut got: HashMap<String, u128> = HashMap::with_capacity(opts.agents);
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < opts.agents {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(line)) => {
                if let Some((agent, at)) = event(&line, "b") {
                    got.entry(agent.to_string()).or_insert(at);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    let from = unix_ns(sent);
    let mut last = 0u128;
    for at in got.values() {
        let ns = at.saturating_sub(from);
        last = last.max(ns);
        bundle.record(Duration::from_nanos(ns as u64));
    }
    let bundle_missed = opts.agents - got.len();
    eprintln!(
        "mayfly-bench: bundle change read by {} of {} agents, the last after {:.0} ms",
        got.len(),
        opts.agents,
        last as f64 / 1e6
    );

    // Entry changes with everything connected, one at a time.
    let mut change = Latencies::with_capacity(opts.changes);
    let mut change_missed = 0;
    for c in 0..opts.changes {
        let agent = (c * 7919) % opts.agents;
        let sent = SystemTime::now();
        let entry = admin
            .create_entry(v1::CreateEntryRequest {
                spiffe_id: format!("spiffe://{trust_domain}/scale-{run}/c{c}"),
                parent_id: agent_id(&trust_domain, &run, agent),
                selectors: vec!["unix:uid:0".into()],
                ..Default::default()
            })
            .await?
            .into_inner();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = None;
        while seen.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, events.recv()).await {
                Ok(Some(line)) => {
                    if let Some((id, at)) = event(&line, "e")
                        && id == entry.id
                    {
                        seen = Some(at);
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        match seen {
            Some(at) => {
                change.record(Duration::from_nanos(at.saturating_sub(unix_ns(sent)) as u64))
            }
            None => change_missed += 1,
        }
    }
    let (_, peak_rss_mib) = memory_mib(opts.daemon_pid)?;
    for mut child in children {
        let _ = child.kill().await;
    }
    Ok(ScaleResult {
        agents: opts.agents,
        entries: created,
        workers,
        entries_secs,
        connect_secs,
        rss_mib,
        peak_rss_mib,
        bundle_p50_ms: bundle.percentile_ms(50.0),
        bundle_p99_ms: bundle.percentile_ms(99.0),
        bundle_all_ms: last as f64 / 1e6,
        bundle_missed,
        changes: opts.changes,
        change_p50_ms: change.percentile_ms(50.0),
        change_p99_ms: change.percentile_ms(99.0),
        change_max_ms: change.percentile_ms(100.0),
        change_missed,
    })
}

pub struct WorkerOptions {
    pub node_addr: String,
    pub admin_socket: PathBuf,
    pub trust_domain: String,
    pub run: String,
    pub from: usize,
    pub count: usize,
}

/// A worker: attests its agents, opens their streams, prints `up`, then reports events
/// until killed.
pub async fn worker(opts: &WorkerOptions) -> Result<()> {
    let trust_domain = TrustDomain::new(&opts.trust_domain)?;
    let (admin, bundle) = admin_and_bundle(&opts.admin_socket).await?;
    let (out_tx, mut out) = mpsc::unbounded_channel::<String>();
    let timed = format!("/scale-{}/c", opts.run);
    let opened = futures::stream::iter(opts.from..opts.from + opts.count)
        .map(|i| {
            let mut admin = admin.clone();
            let bundle = bundle.clone();
            let trust_domain = trust_domain.clone();
            let out = out_tx.clone();
            let timed = timed.clone();
            let id = agent_id(&trust_domain, &opts.run, i);
            async move {
                let agent =
                    BenchAgent::attest(&mut admin, &opts.node_addr, &trust_domain, &bundle, &id)
                        .await?;
                let mut stream = agent
                    .client()
                    .await?
                    .sync(v1::SyncRequest {})
                    .await
                    .with_context(|| format!("opening {id}'s sync stream"))?
                    .into_inner();
                tokio::spawn(async move {
                    let mut first = true;
                    while let Some(Ok(message)) = stream.next().await {
                        let at = unix_ns(SystemTime::now());
                        match message.update {
                            Some(Update::BundleChanged(_)) => {
                                let _ = out.send(format!("b {i} {at}"));
                            }
                            Some(Update::FullState(_)) if !first => {
                                // A resend of the whole state carries the bundle too.
                                let _ = out.send(format!("b {i} {at}"));
                            }
                            Some(Update::EntryUpserted(entry))
                                if entry.spiffe_id.contains(&timed) =>
                            {
                                let _ = out.send(format!("e {} {at}", entry.id));
                            }
                            _ => {}
                        }
                        first = false;
                    }
                });
                anyhow::Ok(())
            }
        })
        .buffer_unordered(8)
        .fold(0usize, |n, result| async move {
            if let Err(e) = result {
                eprintln!("mayfly-bench scale worker: {e:#}");
                n
            } else {
                n + 1
            }
        })
        .await;
    ensure!(
        opened == opts.count,
        "only {opened} of {} agents streaming",
        opts.count
    );
    use std::io::Write as _;
    println!("up");
    std::io::stdout().flush()?;
    while let Some(line) = out.recv().await {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
    }
    Ok(())
}
