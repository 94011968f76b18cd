//! The agent's credential cache, from a workload's side of the Workload API socket: the
//! first `GetCredential` (the agent asks the daemon, which makes a PostgreSQL user), then
//! calls served from the cache one after another, and a hundred concurrent first calls for
//! one new key, which must cost one daemon call (one lease).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, ensure};
use serde::Serialize;

use mayfly_agent::cli::api;
use mayfly_agent::cli::endpoint::WorkloadEndpoint;
use mayfly_proto::v1::GetCredentialRequest;
use mayfly_proto::v1::workload_credentials_client::WorkloadCredentialsClient;

use super::Latencies;

pub struct Options {
    /// The agent's Workload API socket.
    pub socket: PathBuf,
    /// A credential granted to the bench process's own identity.
    pub name: String,
    pub calls: usize,
    pub concurrent: usize,
}

#[derive(Serialize, Debug)]
pub struct CacheResult {
    pub first_call_ms: f64,
    pub calls: usize,
    pub cached_p50_ms: f64,
    pub cached_p99_ms: f64,
    pub cached_max_ms: f64,
    pub concurrent: usize,
    /// Leases the concurrent first calls got between them; 1 is single flight working.
    pub concurrent_leases: usize,
    pub concurrent_all_answered_ms: f64,
}

pub async fn run(opts: &Options) -> Result<CacheResult> {
    let socket = opts.socket.display().to_string();
    let endpoint = WorkloadEndpoint::resolve(Some(&socket))?;
    let mut client = WorkloadCredentialsClient::new(endpoint.connect().await?);
    let ask = |ttl_seconds: i64| {
        api::request(GetCredentialRequest {
            name: opts.name.clone(),
            spiffe_id: String::new(),
            ttl_seconds,
        })
    };
    let started = Instant::now();
    let first = client.get_credential(ask(0)).await?.into_inner();
    let first_call = started.elapsed();
    let mut cached = Latencies::with_capacity(opts.calls);
    for _ in 0..opts.calls {
        let started = Instant::now();
        let again = client.get_credential(ask(0)).await?.into_inner();
        cached.record(started.elapsed());
        ensure!(
            again.lease_id == first.lease_id,
            "a cached call got another lease"
        );
    }
    // A key nobody asked for yet (another TTL), a hundred workloads at once.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrent {
        let mut client = client.clone();
        let request = ask(1800);
        tasks.spawn(async move { client.get_credential(request).await });
    }
    let mut leases = BTreeSet::new();
    while let Some(done) = tasks.join_next().await {
        leases.insert(done??.into_inner().lease_id);
    }
    let all_answered = started.elapsed();
    Ok(CacheResult {
        first_call_ms: first_call.as_secs_f64() * 1000.0,
        calls: opts.calls,
        cached_p50_ms: cached.percentile_ms(50.0),
        cached_p99_ms: cached.percentile_ms(99.0),
        cached_max_ms: cached.percentile_ms(100.0),
        concurrent: opts.concurrent,
        concurrent_leases: leases.len(),
        concurrent_all_answered_ms: all_answered.as_secs_f64() * 1000.0,
    })
}
