//! The daemon's counters and gauges, kept in atomics and shared as one `Arc<Metrics>`, and
//! the optional HTTP endpoint (`metrics_listen`) that serves them in the Prometheus text
//! format. Labels carry names only (secret names, outcomes), never a value.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How a rotation ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationOutcome {
    Promoted,
    Failed,
}

/// Which kind of SVID was signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidKind {
    X509,
    Jwt,
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// Per secret: [promoted, failed].
    rotations: RwLock<BTreeMap<String, Arc<[AtomicU64; 2]>>>,
    step_retries: AtomicU64,
    secret_value_reads: AtomicU64,
    x509_signed: AtomicU64,
    jwt_signed: AtomicU64,
    connected_agents: AtomicI64,
    scheduler_leader: AtomicBool,
    /// The last blast-radius report's fleet figures, when one was made.
    blast: RwLock<Option<BlastFigures>>,
}

/// What the metrics carry of the fleet's blast radius.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlastFigures {
    pub principals: u64,
    pub zero_standing: u64,
    /// Seconds of live credential exposure, by sensitivity.
    pub exposure: BTreeMap<String, i64>,
}

/// Counts one open agent sync stream for as long as it lives.
#[derive(Debug)]
pub struct ConnectedAgent(Arc<Metrics>);

impl Drop for ConnectedAgent {
    fn drop(&mut self) {
        self.0.connected_agents.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn rotation_finished(&self, secret: &str, outcome: RotationOutcome) {
        let index = match outcome {
            RotationOutcome::Promoted => 0,
            RotationOutcome::Failed => 1,
        };
        let known = self
            .rotations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(secret)
            .cloned();
        let counts = match known {
            Some(counts) => counts,
            None => self
                .rotations
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(secret.to_string())
                .or_default()
                .clone(),
        };
        counts[index].fetch_add(1, Ordering::Relaxed);
    }

    /// A rotation step failed and will be tried again.
    pub fn step_retried(&self) {
        self.step_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A secret's current value was read from its store (a query, or an AWS or Vault
    /// call): for an operator, a connecting agent, or a promotion's one push.
    pub fn secret_value_read(&self) {
        self.secret_value_reads.fetch_add(1, Ordering::Relaxed);
    }

    pub fn svids_signed(&self, kind: SvidKind, count: u64) {
        let counter = match kind {
            SvidKind::X509 => &self.x509_signed,
            SvidKind::Jwt => &self.jwt_signed,
        };
        counter.fetch_add(count, Ordering::Relaxed);
    }

    /// Counts an agent as connected until the returned guard is dropped.
    pub fn agent_connected(self: &Arc<Self>) -> ConnectedAgent {
        self.connected_agents.fetch_add(1, Ordering::Relaxed);
        ConnectedAgent(self.clone())
    }

    pub fn set_scheduler_leader(&self, leader: bool) {
        self.scheduler_leader.store(leader, Ordering::Relaxed);
    }

    pub fn set_blast_radius(&self, figures: BlastFigures) {
        *self.blast.write().unwrap_or_else(|p| p.into_inner()) = Some(figures);
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "mayfly_rotations_total",
            "counter",
            "Rotations finished, by secret and outcome (promoted, or failed after max_attempts).",
        );
        for (secret, counts) in self
            .rotations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            for (outcome, count) in [("promoted", &counts[0]), ("failed", &counts[1])] {
                let _ = writeln!(
                    out,
                    "mayfly_rotations_total{{secret=\"{}\",outcome=\"{outcome}\"}} {}",
                    escape_label(secret),
                    count.load(Ordering::Relaxed)
                );
            }
        }
        header(
            &mut out,
            "mayfly_rotation_step_retries_total",
            "counter",
            "Rotation steps that failed and were tried again.",
        );
        let _ = writeln!(
            out,
            "mayfly_rotation_step_retries_total {}",
            self.step_retries.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "mayfly_secret_value_reads_total",
            "counter",
            "Reads of a secret's current value from its store (local, AWS or Vault).",
        );
        let _ = writeln!(
            out,
            "mayfly_secret_value_reads_total {}",
            self.secret_value_reads.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "mayfly_svids_signed_total",
            "counter",
            "SVIDs signed by this daemon (agent and workload X509-SVIDs, JWT-SVIDs).",
        );
        for (kind, counter) in [("x509", &self.x509_signed), ("jwt", &self.jwt_signed)] {
            let _ = writeln!(
                out,
                "mayfly_svids_signed_total{{kind=\"{kind}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        header(
            &mut out,
            "mayfly_connected_agents",
            "gauge",
            "Agents holding a sync stream open to this daemon.",
        );
        let _ = writeln!(
            out,
            "mayfly_connected_agents {}",
            self.connected_agents.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "mayfly_scheduler_leader",
            "gauge",
            "1 while this daemon holds the scheduler lease and runs scheduled rotations.",
        );
        let _ = writeln!(
            out,
            "mayfly_scheduler_leader {}",
            u8::from(self.scheduler_leader.load(Ordering::Relaxed))
        );
        let blast = self.blast.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(blast) = blast {
            header(
                &mut out,
                "mayfly_principals",
                "gauge",
                "Principals in the last blast-radius report (workloads and operators).",
            );
            let _ = writeln!(out, "mayfly_principals {}", blast.principals);
            header(
                &mut out,
                "mayfly_principals_zero_standing_privilege",
                "gauge",
                "Principals holding no standing secret or credential.",
            );
            let _ = writeln!(
                out,
                "mayfly_principals_zero_standing_privilege {}",
                blast.zero_standing
            );
            header(
                &mut out,
                "mayfly_credential_exposure_seconds",
                "gauge",
                "Remaining lifetime of every outstanding credential, summed by sensitivity.",
            );
            for (sensitivity, seconds) in &blast.exposure {
                let _ = writeln!(
                    out,
                    "mayfly_credential_exposure_seconds{{sensitivity=\"{}\"}} {seconds}",
                    escape_label(sensitivity)
                );
            }
        }
        out
    }
}

/// How often the fleet's blast radius is computed for the metrics.
const BLAST_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Keeps the blast-radius gauges current: the fleet report, once a minute (the first
/// right away; `MAYFLY_BLAST_INTERVAL_MS` overrides the period, for tests).
pub async fn track_blast_radius(blast: Arc<crate::blast::BlastRadius>, metrics: Arc<Metrics>) {
    let interval = std::env::var("MAYFLY_BLAST_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis)
        .unwrap_or(BLAST_INTERVAL);
    let mut timer = tokio::time::interval(interval);
    loop {
        timer.tick().await;
        match blast.report(None).await {
            Ok(report) => metrics.set_blast_radius(BlastFigures {
                principals: report.principals.len() as u64,
                zero_standing: report.zero_standing() as u64,
                exposure: report.exposure_by_sensitivity(),
            }),
            Err(e) => tracing::warn!(error = %e, "blast-radius report for the metrics failed"),
        }
    }
}

/// Serves `GET /metrics` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&request, &metrics)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(peer = %peer, error = %e, "metrics connection ended");
            }
        });
    }
}

/// Binds the endpoint, naming the address when that fails.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint (metrics_listen) on {addr}"))
}

fn answer(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let metrics = Arc::new(Metrics::default());
        metrics.rotation_finished("db", RotationOutcome::Promoted);
        metrics.rotation_finished("db", RotationOutcome::Promoted);
        metrics.rotation_finished("we\"ird", RotationOutcome::Failed);
        metrics.step_retried();
        metrics.svids_signed(SvidKind::X509, 3);
        metrics.svids_signed(SvidKind::Jwt, 1);
        let agent = metrics.agent_connected();
        metrics.set_scheduler_leader(true);
        let text = metrics.render();
        for line in [
            "mayfly_rotations_total{secret=\"db\",outcome=\"promoted\"} 2",
            "mayfly_rotations_total{secret=\"db\",outcome=\"failed\"} 0",
            "mayfly_rotations_total{secret=\"we\\\"ird\",outcome=\"failed\"} 1",
            "mayfly_rotation_step_retries_total 1",
            "mayfly_svids_signed_total{kind=\"x509\"} 3",
            "mayfly_svids_signed_total{kind=\"jwt\"} 1",
            "mayfly_connected_agents 1",
            "mayfly_scheduler_leader 1",
            "# TYPE mayfly_connected_agents gauge",
            "# TYPE mayfly_rotations_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        drop(agent);
        assert!(metrics.render().contains("\nmayfly_connected_agents 0\n"));
    }
}
