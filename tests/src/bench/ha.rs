//! The cross-daemon bench: several daemons on one PostgreSQL, simulated agents on real mTLS
//! sync streams spread over them, and entry changes each made through a daemon other than
//! the one its agent is connected to, timed from the `CreateEntry` answer until the entry
//! is read from that agent's stream. The same changes made through the agent's own daemon
//! are the baseline, in the same run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_stream::StreamExt;

use mayfly_common::TrustDomain;
use mayfly_proto::v1::{self, sync_message::Update};

use super::{BenchAgent, Latencies, admin_and_bundle};

pub struct Options {
    /// `node_addr,admin_socket` of each daemon.
    pub daemons: Vec<(String, PathBuf)>,
    pub trust_domain: String,
    pub agents: usize,
    pub changes: usize,
}

#[derive(Serialize, Debug)]
pub struct HaResult {
    pub daemons: usize,
    pub agents: usize,
    pub changes: usize,
    /// `CreateEntry` through another daemon → read from the agent's stream.
    pub cross_p50_ms: f64,
    pub cross_p99_ms: f64,
    pub cross_max_ms: f64,
    /// Made through the agent's own daemon, the same way.
    pub local_p50_ms: f64,
    pub local_p99_ms: f64,
    /// Changes some agent never received within 10 s; must be 0.
    pub missed: usize,
}

type Seen = Arc<Mutex<HashMap<String, Instant>>>;

pub async fn run(opts: &Options) -> Result<HaResult> {
    ensure!(opts.daemons.len() >= 2, "need two daemons or more");
    ensure!(
        opts.agents > 0 && opts.changes > 0,
        "need agents and changes"
    );
    let trust_domain = TrustDomain::new(&opts.trust_domain)?;
    let mut admins = Vec::new();
    let mut bundle = Vec::new();
    for (_, socket) in &opts.daemons {
        let (admin, b) = admin_and_bundle(socket).await?;
        admins.push(admin);
        bundle = b;
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
    let arrived = Arc::new(Notify::new());
    let mut agent_ids = Vec::new();
    for i in 0..opts.agents {
        let home = i % opts.daemons.len();
        let agent_id = format!("spiffe://{trust_domain}/node/ha-{run_id}-{i}");
        let agent = BenchAgent::attest(
            &mut admins[home],
            &opts.daemons[home].0,
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
        let (seen, arrived) = (seen.clone(), arrived.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let now = Instant::now();
                let ids: Vec<String> = match message.update {
                    Some(Update::EntryUpserted(entry)) => vec![entry.id],
                    Some(Update::FullState(full)) => {
                        full.entries.into_iter().map(|e| e.id).collect()
                    }
                    _ => continue,
                };
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                for id in ids {
                    seen.entry(id).or_insert(now);
                }
                arrived.notify_waiters();
            }
        });
        agent_ids.push((home, agent_id));
    }
    eprintln!(
        "mayfly-bench: {} simulated agents streaming from {} daemons",
        opts.agents,
        opts.daemons.len()
    );
    let mut cross = Latencies::with_capacity(opts.changes);
    let mut local = Latencies::with_capacity(opts.changes);
    let mut missed = 0;
    for change in 0..opts.changes * 2 {
        let (home, agent_id) = &agent_ids[change % agent_ids.len()];
        let is_cross = change % 2 == 0;
        let through = if is_cross {
            (home + 1 + change / 2 % (opts.daemons.len() - 1)) % opts.daemons.len()
        } else {
            *home
        };
        let sent = Instant::now();
        let created = admins[through]
            .create_entry(v1::CreateEntryRequest {
                spiffe_id: format!("spiffe://{trust_domain}/ha-{run_id}/w{change}"),
                parent_id: agent_id.clone(),
                selectors: vec!["unix:uid:0".into()],
                ..Default::default()
            })
            .await
            .context("creating an entry")?
            .into_inner();
        let id = created.id;
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            let notified = arrived.notified();
            if let Some(at) = seen.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
                break Some(*at);
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                break None;
            }
        };
        match got {
            Some(at) => {
                let took = at.saturating_duration_since(sent);
                if is_cross {
                    cross.record(took);
                } else {
                    local.record(took);
                }
            }
            None => missed += 1,
        }
    }
    Ok(HaResult {
        daemons: opts.daemons.len(),
        agents: opts.agents,
        changes: opts.changes,
        cross_p50_ms: cross.percentile_ms(50.0),
        cross_p99_ms: cross.percentile_ms(99.0),
        cross_max_ms: cross.percentile_ms(100.0),
        local_p50_ms: local.percentile_ms(50.0),
        local_p99_ms: local.percentile_ms(99.0),
        missed,
    })
}
