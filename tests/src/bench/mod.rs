//! Pieces shared by every `mayfly-bench` subcommand, so that Mayfly and its peers are
//! measured with the same CSRs, the same load pattern and the same statistics.
//!
//! - [`CsrPool`]: CSRs made before the clock starts, so the load client's key generation is
//!   not what gets measured (FACTS.md: compare like with like).
//! - [`drive`]: exactly `count` requests over a fixed set of workers, each owning one
//!   keep-alive connection, every request timed.
//! - [`Latencies`] and [`BenchResult`]: percentiles and the one-line JSON the harness reads.

pub mod agent;
pub mod blast;
pub mod ceiling;
pub mod creds;
pub mod creds_cache;
pub mod elevation;
pub mod fanout;
pub mod grpc;
pub mod ha;
pub mod http1;
pub mod mayfly;
pub mod openbao;
pub mod policy;
pub mod revocation;
pub mod rotation;
pub mod scale;
pub mod sinks;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
    string::Ia5String,
};
use serde::Serialize;

/// One pre-made CSR for an ECDSA P-256 key, asking for exactly one URI SAN.
#[derive(Clone)]
pub struct PooledCsr {
    pub spiffe_id: String,
    pub der: Vec<u8>,
    pub pem: String,
}

/// A fixed set of CSRs that requests cycle through (request `i` uses entry `i % len`).
pub struct CsrPool {
    entries: Vec<PooledCsr>,
}

impl CsrPool {
    /// Makes `size` CSRs whose SPIFFE IDs are `id_prefix` followed by the index, e.g.
    /// `spiffe://example.org/w/` gives `spiffe://example.org/w/0`, `.../w/1`, ...
    pub fn generate(size: usize, id_prefix: &str) -> Result<Self> {
        anyhow::ensure!(size > 0, "the CSR pool needs at least one entry");
        let mut entries = Vec::with_capacity(size);
        for i in 0..size {
            let spiffe_id = format!("{id_prefix}{i}");
            let key =
                KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a P-256 key")?;
            let mut params = CertificateParams::default();
            // An SVID identifies by its URI SAN alone; rcgen's default subject CN would be
            // noise that the signer has to ignore.
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(
                Ia5String::try_from(spiffe_id.as_str())
                    .with_context(|| format!("{spiffe_id} is not an IA5 string"))?,
            )];
            let csr = params
                .serialize_request(&key)
                .context("serializing the CSR")?;
            entries.push(PooledCsr {
                spiffe_id,
                der: csr.der().to_vec(),
                pem: csr.pem().context("PEM-encoding the CSR")?,
            });
        }
        Ok(Self { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[PooledCsr] {
        &self.entries
    }

    /// The entry request number `seq` uses.
    pub fn get(&self, seq: u64) -> &PooledCsr {
        // The pool is never empty (checked in `generate`), and the remainder is below its
        // length, so the cast back to usize cannot truncate.
        &self.entries[(seq % self.entries.len() as u64) as usize]
    }
}

/// Request latencies, kept whole: at bench sizes (tens of thousands) sorting them once is
/// cheaper and more exact than a bucketed histogram.
#[derive(Default, Clone)]
pub struct Latencies {
    micros: Vec<u64>,
}

impl Latencies {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            micros: Vec::with_capacity(n),
        }
    }

    pub fn record(&mut self, d: Duration) {
        self.micros
            .push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: Latencies) {
        self.micros.extend(other.micros);
    }

    pub fn len(&self) -> usize {
        self.micros.len()
    }

    pub fn is_empty(&self) -> bool {
        self.micros.is_empty()
    }

    /// Nearest-rank percentile (`p` in 0..=100), in milliseconds; 0 when nothing was recorded.
    pub fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        self.micros.sort_unstable();
        let n = self.micros.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        let idx = rank.clamp(1, n) - 1;
        self.micros[idx] as f64 / 1000.0
    }
}

/// What a load run produced, before it is turned into a [`BenchResult`].
pub struct LoadOutcome {
    pub elapsed: Duration,
    pub ok: u64,
    pub errors: u64,
    pub latencies: Latencies,
    pub first_error: Option<String>,
}

/// One connection's worth of load: each call sends one request and checks its answer.
pub trait Worker: Send + 'static {
    fn request(&mut self, seq: u64) -> impl Future<Output = Result<()>> + Send;
}

/// A request that takes longer than this counts as failed; it keeps a stuck peer from
/// hanging the run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends exactly `count` requests spread over `workers` (one task each), numbering them
/// 0..count. Workers are connected before the call, so the clock covers requests only.
///
/// A worker that sees an error stops, because its connection may be in an unknown state;
/// the requests it would have sent go to the others. Anything never answered with success
/// is counted in `errors`, so `ok + errors == count` always.
pub async fn drive<W: Worker>(workers: Vec<W>, count: u64) -> LoadOutcome {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(workers.len());
    for mut worker in workers {
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut lat = Latencies::with_capacity((count as usize) / 8 + 1);
            let mut err = None;
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= count {
                    break;
                }
                let t0 = Instant::now();
                match tokio::time::timeout(REQUEST_TIMEOUT, worker.request(seq)).await {
                    Ok(Ok(())) => lat.record(t0.elapsed()),
                    Ok(Err(e)) => {
                        err = Some(format!("request {seq}: {e:#}"));
                        break;
                    }
                    Err(_) => {
                        err = Some(format!("request {seq}: no answer in {REQUEST_TIMEOUT:?}"));
                        break;
                    }
                }
            }
            (lat, err)
        }));
    }
    let mut latencies = Latencies::with_capacity(count as usize);
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok((lat, err)) => {
                latencies.merge(lat);
                if first_error.is_none() {
                    first_error = err;
                }
            }
            Err(e) => {
                if first_error.is_none() {
                    first_error = Some(format!("worker task failed: {e}"));
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let ok = latencies.len() as u64;
    LoadOutcome {
        elapsed,
        ok,
        errors: count.saturating_sub(ok),
        latencies,
        first_error,
    }
}

/// The one-line JSON every subcommand prints; scripts/bench reads these keys by name.
#[derive(Serialize, Debug, Clone)]
pub struct BenchResult {
    pub peer: String,
    pub count: u64,
    pub concurrency: usize,
    pub seconds: f64,
    pub rate_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// How many distinct pre-made CSRs the requests cycled through.
    pub csr_pool: usize,
    /// CSRs per request; `count` and `rate_per_s` count certificates, not requests.
    pub batch: usize,
}

impl BenchResult {
    pub fn from_outcome(
        peer: &str,
        count: u64,
        concurrency: usize,
        csr_pool: usize,
        mut outcome: LoadOutcome,
    ) -> Self {
        let secs = outcome.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            outcome.ok as f64 / secs
        } else {
            0.0
        };
        Self {
            peer: peer.to_owned(),
            count,
            concurrency,
            seconds: round_to(secs, 3),
            rate_per_s: round_to(rate, 1),
            p50_ms: round_to(outcome.latencies.percentile_ms(50.0), 3),
            p99_ms: round_to(outcome.latencies.percentile_ms(99.0), 3),
            errors: outcome.errors,
            csr_pool,
            batch: 1,
        }
    }

    pub fn to_json_line(&self) -> Result<String> {
        serde_json::to_string(self).context("serializing the bench result")
    }

    /// Prints the result on stdout, as one line, for the harness to capture.
    pub fn print(&self) -> Result<()> {
        println!("{}", self.to_json_line()?);
        Ok(())
    }
}

fn round_to(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

/// The admin client on `socket` and the trust bundle's CA certificates (DER).
pub async fn admin_and_bundle(
    socket: &std::path::Path,
) -> Result<(
    mayfly_proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
    Vec<Vec<u8>>,
)> {
    use mayfly_daemon::cli::{Connection, OutputFormat, operator};
    let mut admin = operator::connect(&Connection {
        socket: Some(socket.to_path_buf()),
        config: None,
        output: OutputFormat::Json,
    })
    .await?;
    let bundle = admin
        .get_bundle(mayfly_proto::v1::GetBundleRequest {})
        .await?
        .into_inner()
        .bundle
        .context("no bundle")?
        .x509_authorities;
    Ok((admin, bundle))
}

/// An agent the bench attested with its own join token and key, whose SVID opens mTLS
/// connections to the node API as a real agent's does.
pub struct BenchAgent {
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key_pkcs8: zeroize::Zeroizing<Vec<u8>>,
    server: mayfly_common::SpiffeId,
    bundle: Vec<Vec<u8>>,
    node_addr: String,
}

impl BenchAgent {
    pub async fn attest(
        admin: &mut mayfly_proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
        node_addr: &str,
        trust_domain: &mayfly_common::TrustDomain,
        bundle: &[Vec<u8>],
        agent_id: &str,
    ) -> Result<Self> {
        use mayfly_common::tls::{TrustBundle, client_config, connect, server_id};
        use mayfly_proto::v1::{self, node_client::NodeClient};
        let token = admin
            .generate_join_token(v1::GenerateJoinTokenRequest {
                spiffe_id: agent_id.to_string(),
                ttl: 0,
            })
            .await?
            .into_inner()
            .token;
        let server = server_id(trust_domain)?;
        let anonymous = client_config(server.clone(), TrustBundle::new(bundle)?, None)?;
        let (key_pkcs8, csr) = mayfly_daemon::ca::generate_csr(None)?;
        let attested = NodeClient::new(connect(node_addr, anonymous).await?)
            .attest(v1::AttestRequest {
                join_token: token,
                csr,
            })
            .await
            .with_context(|| format!("attesting {agent_id}"))?
            .into_inner();
        Ok(Self {
            chain: attested
                .svid_chain
                .into_iter()
                .map(rustls::pki_types::CertificateDer::from)
                .collect(),
            key_pkcs8,
            server,
            bundle: bundle.to_vec(),
            node_addr: node_addr.to_string(),
        })
    }

    /// A new mTLS connection with this agent's SVID.
    pub async fn client(
        &self,
    ) -> Result<mayfly_proto::v1::node_client::NodeClient<tonic::transport::Channel>> {
        Ok(mayfly_proto::v1::node_client::NodeClient::new(
            mayfly_common::tls::connect(&self.node_addr, self.tls_config()?).await?,
        ))
    }

    /// A new mTLS connection with this agent's SVID, for the lean unary client.
    pub async fn unary(&self) -> Result<grpc::UnaryConnection> {
        grpc::UnaryConnection::open(&self.node_addr, self.tls_config()?).await
    }

    /// The URI of the node API's method at `path` (`/mayfly.v1.Node/…`).
    pub fn node_uri(&self, path: &str) -> Result<http::Uri> {
        http::Uri::builder()
            .scheme("https")
            .authority(self.node_addr.as_str())
            .path_and_query(path)
            .build()
            .with_context(|| format!("{}{path} is not a URI", self.node_addr))
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig> {
        use mayfly_common::tls::{TrustBundle, client_config};
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.to_vec()));
        Ok(client_config(
            self.server.clone(),
            TrustBundle::new(&self.bundle)?,
            Some((self.chain.clone(), key)),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    #[test]
    fn nearest_rank_percentiles() {
        let mut l = Latencies::default();
        for ms in 1..=100u64 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.percentile_ms(50.0), 50.0);
        assert_eq!(l.percentile_ms(99.0), 99.0);
        assert_eq!(l.percentile_ms(100.0), 100.0);
        assert_eq!(l.percentile_ms(0.0), 1.0);
        assert_eq!(Latencies::default().percentile_ms(50.0), 0.0);
    }

    #[test]
    fn pool_csrs_carry_their_spiffe_id() {
        let pool = CsrPool::generate(3, "spiffe://example.org/w/").unwrap();
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.get(4).spiffe_id, "spiffe://example.org/w/1");
        let e = &pool.entries()[2];
        assert!(e.pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&e.der).unwrap();
        let ext = csr.requested_extensions().unwrap().collect::<Vec<_>>();
        let found = ext.iter().any(|x| {
            matches!(x, x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san)
                if san.general_names.iter().any(|g| matches!(g,
                    x509_parser::extensions::GeneralName::URI(u) if *u == "spiffe://example.org/w/2")))
        });
        assert!(found, "URI SAN missing from the CSR");
    }

    #[derive(Clone)]
    struct Flaky {
        fail_at: u64,
    }

    impl Worker for Flaky {
        async fn request(&mut self, seq: u64) -> Result<()> {
            anyhow::ensure!(seq != self.fail_at, "boom");
            Ok(())
        }
    }

    #[tokio::test]
    async fn drive_sends_exactly_count_and_accounts_errors() {
        let out = drive(vec![Flaky { fail_at: u64::MAX }; 4], 1000).await;
        assert_eq!((out.ok, out.errors), (1000, 0));
        let out = drive(vec![Flaky { fail_at: 10 }], 100).await;
        assert_eq!((out.ok, out.errors), (10, 90));
        assert!(out.first_error.unwrap().contains("boom"));
    }
}
