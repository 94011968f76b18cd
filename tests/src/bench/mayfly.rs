//! The Mayfly side of the signing bench: one attested agent, one entry per pooled CSR,
//! and workers that each hold their own mTLS connection and call `SignSvids` through the
//! lean unary client (grpc.rs), so the load client takes as little of the cores as
//! OpenBao's HTTP/1.1 one.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;

use mayfly_common::TrustDomain;
use mayfly_proto::v1::{self};

use super::grpc::{UnaryConnection, frame};
use super::{BenchAgent, BenchResult, CsrPool, Worker, admin_and_bundle, drive};

pub struct Options {
    pub node_addr: String,
    pub admin_socket: PathBuf,
    pub trust_domain: String,
    /// Sign calls; each carries `batch` CSRs.
    pub count: u64,
    pub batch: usize,
    pub concurrency: usize,
    pub csr_pool: usize,
}

struct SignWorker {
    client: UnaryConnection,
    uri: http::Uri,
    /// Framed `SignSvidsRequest`s.
    requests: Arc<[Bytes]>,
    batch: usize,
}

impl Worker for SignWorker {
    async fn request(&mut self, seq: u64) -> Result<()> {
        // Request `seq` reuses a pre-built batch, so the client does no per-call work.
        let request = self.requests[(seq % self.requests.len() as u64) as usize].clone();
        let answer: v1::SignSvidsResponse = self
            .client
            .call(&self.uri, request)
            .await
            .context("SignSvids")?;
        ensure!(
            answer.svids.len() == self.batch
                && answer.svids.iter().all(|s| !s.svid_chain.is_empty()),
            "SignSvids answered {} SVIDs for {} CSRs",
            answer.svids.len(),
            self.batch
        );
        Ok(())
    }
}

pub async fn run(opts: &Options) -> Result<(BenchResult, Option<String>)> {
    ensure!(opts.concurrency > 0, "--concurrency must be at least 1");
    ensure!(opts.batch > 0, "--batch must be at least 1");
    let trust_domain = TrustDomain::new(&opts.trust_domain)?;
    let prefix = format!("spiffe://{trust_domain}/w/");
    let agent_id = format!(
        "spiffe://{trust_domain}/node/bench-{}",
        uuid::Uuid::new_v4().simple()
    );

    let (mut admin, bundle) = admin_and_bundle(&opts.admin_socket).await?;
    let agent = BenchAgent::attest(
        &mut admin,
        &opts.node_addr,
        &trust_domain,
        &bundle,
        &agent_id,
    )
    .await?;

    let pool = CsrPool::generate(opts.csr_pool, &prefix)?;
    let mut entry_ids = Vec::with_capacity(pool.len());
    for (i, pooled) in pool.entries().iter().enumerate() {
        let entry = admin
            .create_entry(v1::CreateEntryRequest {
                spiffe_id: pooled.spiffe_id.clone(),
                parent_id: agent_id.clone(),
                selectors: vec![format!("unix:uid:{}", 10_000 + i)],
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the entry for {}", pooled.spiffe_id))?
            .into_inner();
        entry_ids.push(entry.id);
    }
    // One pre-built batch per starting position in the pool.
    let requests: Arc<[Bytes]> = (0..pool.len())
        .map(|start| {
            frame(&v1::SignSvidsRequest {
                csrs: (0..opts.batch)
                    .map(|k| {
                        let i = (start + k) % pool.len();
                        v1::SvidCsr {
                            entry_id: entry_ids[i].clone(),
                            csr: pool.entries()[i].der.clone(),
                        }
                    })
                    .collect(),
            })
        })
        .collect();
    let uri = agent.node_uri("/mayfly.v1.Node/SignSvids")?;

    let mut workers = Vec::with_capacity(opts.concurrency);
    for _ in 0..opts.concurrency {
        workers.push(SignWorker {
            client: agent.unary().await?,
            uri: uri.clone(),
            requests: Arc::clone(&requests),
            batch: opts.batch,
        });
    }

    let outcome = drive(workers, opts.count).await;
    let first_error = outcome.first_error.clone();
    let mut result =
        BenchResult::from_outcome("mayfly", opts.count, opts.concurrency, pool.len(), outcome);
    // Rates are per SVID, so a batched run compares with OpenBao's one-per-request.
    result.batch = opts.batch;
    result.count *= opts.batch as u64;
    result.rate_per_s = (result.rate_per_s * opts.batch as f64).round();
    Ok((result, first_error))
}
