//! The daemon's counters and gauges, in one prometheus-client registry shared as one
//! `Arc<Metrics>`, served in the Prometheus text format by the operations endpoint
//! (`metrics_listen`, see `crate::health`). Labels carry names only (secret names,
//! outcomes), never a value.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// How a rotation ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RotationOutcome {
    Promoted,
    Failed,
}

/// Which kind of SVID was signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SvidKind {
    X509,
    Jwt,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rotations: Family<RotationLabels, Counter>,
    step_retries: Counter,
    secret_value_reads: Counter,
    svids_signed: Family<KindLabel, Counter>,
    connected_agents: Gauge,
    scheduler_leader: Gauge,
    /// The last blast-radius report's fleet figures, when one was made.
    blast: Arc<BlastGauges>,
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
        self.0.connected_agents.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let rotations = Family::<RotationLabels, Counter>::default();
        let step_retries = Counter::default();
        let secret_value_reads = Counter::default();
        let svids_signed = Family::<KindLabel, Counter>::default();
        // Both kinds are shown from the start, at 0: a scraper sees the series before the
        // first signature, so a rate over it needs no special case.
        for kind in [SvidKind::X509, SvidKind::Jwt] {
            let _ = svids_signed.get_or_create(&KindLabel { kind });
        }
        let connected_agents = Gauge::default();
        let scheduler_leader = Gauge::default();
        let blast = Arc::new(BlastGauges::default());

        // Help texts without a final period: the registry adds one.
        let mut registry = Registry::default();
        registry.register(
            "mayfly_rotations",
            "Rotations finished, by secret and outcome (promoted, or failed after max_attempts)",
            rotations.clone(),
        );
        registry.register(
            "mayfly_rotation_step_retries",
            "Rotation steps that failed and were tried again",
            step_retries.clone(),
        );
        registry.register(
            "mayfly_secret_value_reads",
            "Reads of a secret's current value from its store (local, AWS or Vault)",
            secret_value_reads.clone(),
        );
        registry.register(
            "mayfly_svids_signed",
            "SVIDs signed by this daemon (agent and workload X509-SVIDs, JWT-SVIDs)",
            svids_signed.clone(),
        );
        registry.register(
            "mayfly_connected_agents",
            "Agents holding a sync stream open to this daemon",
            connected_agents.clone(),
        );
        registry.register(
            "mayfly_scheduler_leader",
            "1 while this daemon holds the scheduler lease and runs scheduled rotations",
            scheduler_leader.clone(),
        );
        registry.register_collector(Box::new(blast.clone()));
        Self {
            registry,
            rotations,
            step_retries,
            secret_value_reads,
            svids_signed,
            connected_agents,
            scheduler_leader,
            blast,
        }
    }
}

impl Metrics {
    pub fn rotation_finished(&self, secret: &str, outcome: RotationOutcome) {
        // Both outcomes of a secret are shown once it has rotated, the other at 0, so
        // that "failed" reads 0 rather than absent for a secret that never failed.
        for each in [RotationOutcome::Promoted, RotationOutcome::Failed] {
            let counter = self.rotations.get_or_create(&RotationLabels {
                secret: secret.to_string(),
                outcome: each,
            });
            if each == outcome {
                counter.inc();
            }
        }
    }

    /// A rotation step failed and will be tried again.
    pub fn step_retried(&self) {
        self.step_retries.inc();
    }

    /// A secret's current value was read from its store (a query, or an AWS or Vault
    /// call): for an operator, a connecting agent, or a promotion's one push.
    pub fn secret_value_read(&self) {
        self.secret_value_reads.inc();
    }

    pub fn svids_signed(&self, kind: SvidKind, count: u64) {
        self.svids_signed
            .get_or_create(&KindLabel { kind })
            .inc_by(count);
    }

    /// Counts an agent as connected until the returned guard is dropped.
    pub fn agent_connected(self: &Arc<Self>) -> ConnectedAgent {
        self.connected_agents.inc();
        ConnectedAgent(self.clone())
    }

    pub fn set_scheduler_leader(&self, leader: bool) {
        self.scheduler_leader.set(i64::from(leader));
    }

    pub fn set_blast_radius(&self, figures: BlastFigures) {
        *self.blast.0.write().unwrap_or_else(|p| p.into_inner()) = Some(figures);
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        mayfly_common::ops::render(&self.registry)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RotationLabels {
    secret: String,
    outcome: RotationOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: SvidKind,
}

impl EncodeLabelValue for RotationOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        encoder.write_str(match self {
            RotationOutcome::Promoted => "promoted",
            RotationOutcome::Failed => "failed",
        })
    }
}

impl EncodeLabelValue for SvidKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        encoder.write_str(match self {
            SvidKind::X509 => "x509",
            SvidKind::Jwt => "jwt",
        })
    }
}

/// The blast-radius gauges: absent until the first report, so that a scraper cannot
/// mistake "not computed yet" for "no principal".
#[derive(Debug, Default)]
struct BlastGauges(RwLock<Option<BlastFigures>>);

impl Collector for BlastGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(blast) = self.0.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        let principals = ConstGauge::new(blast.principals as i64);
        principals.encode(encoder.encode_descriptor(
            "mayfly_principals",
            "Principals in the last blast-radius report (workloads and operators).",
            None,
            principals.metric_type(),
        )?)?;
        let zero = ConstGauge::new(blast.zero_standing as i64);
        zero.encode(encoder.encode_descriptor(
            "mayfly_principals_zero_standing_privilege",
            "Principals holding no standing secret or credential.",
            None,
            zero.metric_type(),
        )?)?;
        let mut exposure = encoder.encode_descriptor(
            "mayfly_credential_exposure_seconds",
            "Remaining lifetime of every outstanding credential, summed by sensitivity.",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (sensitivity, seconds) in &blast.exposure {
            let labels = [("sensitivity", sensitivity.as_str())];
            ConstGauge::new(*seconds).encode(exposure.encode_family(&labels)?)?;
        }
        Ok(())
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
