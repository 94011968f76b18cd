//! The blast-radius bench, against a real mayflyd: a fleet of `principals` workloads, as
//! many credential definitions each granted to one of them (every tenth in the `prod`
//! set), `leases` of them issued for real (PostgreSQL users), then `mayflyd blast-radius
//! --all` timed over the admin socket, and one principal's report (with its eligible
//! reach) beside it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, ensure};
use futures::StreamExt as _;
use serde::Serialize;

use mayfly_common::TrustDomain;
use mayfly_proto::v1;

use super::{BenchAgent, Latencies, admin_and_bundle};

pub struct Options {
    pub node_addr: String,
    pub admin_socket: PathBuf,
    pub trust_domain: String,
    pub pg_url: String,
    pub principals: usize,
    pub credentials: usize,
    pub leases: usize,
    pub reports: usize,
}

#[derive(Serialize, Debug)]
pub struct BlastResult {
    pub principals: usize,
    pub credentials: usize,
    pub leases: usize,
    pub reports: usize,
    /// Principals the fleet report covered, and how many hold zero standing privilege.
    pub reported: usize,
    pub zero_standing: i64,
    pub decisions: i64,
    /// `blast-radius --all` as the operator waits for it (the admin call).
    pub all_p50_ms: f64,
    pub all_max_ms: f64,
    /// The daemon's own time for it (reading inputs and deciding).
    pub all_server_ms: i64,
    /// One principal's report, eligible reach included.
    pub one_p50_ms: f64,
    pub setup_seconds: f64,
}

const CONCURRENCY: usize = 16;

pub async fn run(opts: &Options) -> Result<BlastResult> {
    ensure!(opts.principals > 0 && opts.credentials > 0, "need a fleet");
    let started = Instant::now();
    let trust_domain = TrustDomain::new(&opts.trust_domain)?;
    let (mut admin, bundle) = admin_and_bundle(&opts.admin_socket).await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let agent_id = format!("spiffe://{trust_domain}/node/blast-{run_id}");
    let workload = |i: usize| format!("spiffe://{trust_domain}/blast-{run_id}/w{i}");

    let created: Vec<Result<()>> = futures::stream::iter(0..opts.principals)
        .map(|i| {
            let mut admin = admin.clone();
            let request = v1::CreateEntryRequest {
                spiffe_id: workload(i),
                parent_id: agent_id.clone(),
                selectors: vec![format!("unix:uid:{}", 10_000 + i)],
                ..Default::default()
            };
            async move {
                admin.create_entry(request).await?;
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    created.into_iter().collect::<Result<Vec<_>>>()?;
    let sensitivities = ["low", "medium", "high", "critical"];
    let defined: Vec<Result<()>> = futures::stream::iter(0..opts.credentials)
        .map(|i| {
            let mut admin = admin.clone();
            let sets = if i % 10 == 0 { "[\"prod\"]" } else { "[]" };
            let request = v1::CreateCredentialRequest {
                definition: format!(
                    "name = \"blast-{run_id}-{i}\"\ngrants = [\"{}\"]\nsets = {sets}\n\
                     sensitivity = \"{}\"\ndefault_ttl = \"1h\"\n[backend]\n\
                     kind = \"postgres_dynamic\"\nadmin_url = \"{}\"\n",
                    workload(i % opts.principals),
                    sensitivities[i % sensitivities.len()],
                    opts.pg_url
                ),
            };
            async move {
                admin.create_credential(request).await?;
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    defined.into_iter().collect::<Result<Vec<_>>>()?;
    eprintln!(
        "mayfly-bench: {} entries and {} credential definitions",
        opts.principals, opts.credentials
    );

    let agent = BenchAgent::attest(
        &mut admin,
        &opts.node_addr,
        &trust_domain,
        &bundle,
        &agent_id,
    )
    .await?;
    let node = agent.client().await?;
    let issued: Vec<Result<()>> = futures::stream::iter(0..opts.leases.min(opts.credentials))
        .map(|i| {
            let mut node = node.clone();
            let request = v1::IssueCredentialRequest {
                name: format!("blast-{run_id}-{i}"),
                spiffe_id: workload(i % opts.principals),
                ttl_seconds: 0,
            };
            async move {
                node.issue_credential(request).await?;
                Ok(())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    issued.into_iter().collect::<Result<Vec<_>>>()?;
    let setup_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "mayfly-bench: {} leases issued; timing the reports",
        opts.leases
    );

    let mut all = Latencies::with_capacity(opts.reports);
    let mut last = v1::BlastRadiusReport::default();
    for _ in 0..opts.reports {
        let started = Instant::now();
        last = admin
            .blast_radius(v1::BlastRadiusRequest {
                principal: String::new(),
                all: true,
            })
            .await?
            .into_inner();
        all.record(started.elapsed());
    }
    let mut one = Latencies::with_capacity(opts.reports);
    for i in 0..opts.reports {
        let started = Instant::now();
        admin
            .blast_radius(v1::BlastRadiusRequest {
                principal: workload(i % opts.principals),
                all: false,
            })
            .await?;
        one.record(started.elapsed());
    }
    Ok(BlastResult {
        principals: opts.principals,
        credentials: opts.credentials,
        leases: opts.leases,
        reports: opts.reports,
        reported: last.principals.len(),
        zero_standing: last.zero_standing,
        decisions: last.decisions,
        all_p50_ms: all.percentile_ms(50.0),
        all_max_ms: all.percentile_ms(100.0),
        all_server_ms: last.elapsed_ms,
        one_p50_ms: one.percentile_ms(50.0),
        setup_seconds,
    })
}
