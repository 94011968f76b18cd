//! What the agent tells its operators on `metrics_listen`: its metrics (Workload API calls,
//! connected workloads, cached SVIDs, the sync stream, sinks), that it is alive, and
//! whether it is ready: attested to the daemon and holding its first full state.
//!
//! Counters are counted where things happen; what can be read off the published state
//! (the SVID cache, the sync stream's lag) is read at each scrape instead, so no task has
//! to keep a copy current.

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use mayfly_common::clock::{Clock, SystemClock, unix_ms};
use mayfly_common::ops::OpsEndpoint;

use crate::state::WorkloadState;

/// How far the agent has come in getting its own identity.
#[derive(Clone)]
pub enum Attestation {
    /// Not attested yet; why the last attempt failed, once one has.
    Pending(Option<String>),
    /// Attested: the state the Workload API serves, which says whether it is synced.
    Attested(watch::Receiver<Arc<WorkloadState>>),
}

/// Why the agent is not ready to serve workloads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotReady {
    #[error("not attested to the daemon yet")]
    Attesting,
    /// The last attempt's error: the daemon unreachable, the join token refused.
    #[error("not attested to the daemon yet: {0}")]
    AttestationFailed(String),
    #[error("attested, but the daemon has not sent this agent's full state yet")]
    NotSynced,
}

/// Ready once attested and the daemon's first full state has been taken in. Losing the
/// sync stream later does not make the agent unready: it keeps serving what it holds,
/// which is what the Workload API is for while the daemon is away.
pub fn readiness(attestation: &Attestation) -> Result<(), NotReady> {
    match attestation {
        Attestation::Pending(None) => Err(NotReady::Attesting),
        Attestation::Pending(Some(why)) => Err(NotReady::AttestationFailed(why.clone())),
        Attestation::Attested(state) if !state.borrow().synced => Err(NotReady::NotSynced),
        Attestation::Attested(_) => Ok(()),
    }
}

/// The agent's metrics, shared as one `Arc` by everything that counts.
pub struct AgentMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    connected_workloads: Gauge,
    sink_writes: Family<SinkLabel, Counter>,
    sink_failures: Family<SinkLabel, Counter>,
    sync: Arc<SyncStatus>,
    clock: Arc<dyn Clock>,
}

impl Default for AgentMetrics {
    /// Metrics nobody reads yet: for a Workload API or sink runner built without the
    /// agent's wiring (tests, `mayflyd dev`).
    fn default() -> Self {
        Self::new(
            watch::channel(Attestation::Pending(None)).1,
            Arc::new(SystemClock),
        )
    }
}

impl fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentMetrics")
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

impl AgentMetrics {
    /// The metrics of an agent whose progress `attestation` follows; `clock` dates the
    /// sync stream's messages.
    pub fn new(attestation: watch::Receiver<Attestation>, clock: Arc<dyn Clock>) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let connected_workloads = Gauge::default();
        let sink_writes = Family::<SinkLabel, Counter>::default();
        let sink_failures = Family::<SinkLabel, Counter>::default();
        let sync = Arc::new(SyncStatus {
            open: AtomicBool::new(false),
            last_heard_ms: AtomicI64::new(unix_ms(clock.now())),
        });
        // Help texts without a final period: the registry adds one.
        let mut registry = Registry::default();
        registry.register(
            "mayfly_agent_workload_api_requests",
            "Workload API calls answered, by method and gRPC status code (a stream counts \
             once, when it is answered)",
            requests.clone(),
        );
        registry.register(
            "mayfly_agent_connected_workloads",
            "Workload API connections open now",
            connected_workloads.clone(),
        );
        registry.register(
            "mayfly_agent_sink_writes",
            "Passes that changed a sink's files (written, removed or blanked), by sink",
            sink_writes.clone(),
        );
        registry.register(
            "mayfly_agent_sink_failures",
            "Passes that could not bring a sink's files up to date, by sink",
            sink_failures.clone(),
        );
        registry.register_collector(Box::new(StateGauges {
            attestation,
            sync: sync.clone(),
            clock: clock.clone(),
        }));
        Self {
            registry,
            requests,
            connected_workloads,
            sink_writes,
            sink_failures,
            sync,
            clock,
        }
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        mayfly_common::ops::render(&self.registry)
    }

    /// A Workload API call was answered with `code` (for a stream: when it started).
    pub fn request_answered(&self, method: &'static str, code: tonic::Code) {
        self.requests
            .get_or_create(&RequestLabels {
                method,
                code: GrpcCode(code),
            })
            .inc();
    }

    /// Counts a workload's connection as open until the returned guard is dropped.
    pub fn workload_connected(self: &Arc<Self>) -> ConnectedWorkload {
        self.connected_workloads.inc();
        ConnectedWorkload(self.clone())
    }

    /// A pass changed the files of the sink labelled `sink`.
    pub fn sink_written(&self, sink: &str) {
        self.sink_writes
            .get_or_create(&SinkLabel {
                sink: sink.to_string(),
            })
            .inc();
    }

    /// A pass could not bring the sink labelled `sink` up to date.
    pub fn sink_failed(&self, sink: &str) {
        self.sink_failures
            .get_or_create(&SinkLabel {
                sink: sink.to_string(),
            })
            .inc();
    }

    /// The sync stream is open until the returned guard is dropped.
    pub fn sync_opened(self: &Arc<Self>) -> OpenSyncStream {
        self.sync.open.store(true, Ordering::Relaxed);
        self.heard_from_daemon();
        OpenSyncStream(self.clone())
    }

    /// A message came on the sync stream.
    pub fn heard_from_daemon(&self) {
        self.sync
            .last_heard_ms
            .store(unix_ms(self.clock.now()), Ordering::Relaxed);
    }
}

/// Counts one open Workload API connection for as long as it lives.
#[derive(Debug)]
pub struct ConnectedWorkload(Arc<AgentMetrics>);

impl Drop for ConnectedWorkload {
    fn drop(&mut self) {
        self.0.connected_workloads.dec();
    }
}

/// Marks the sync stream open for as long as it lives; dropped, the stream is closed and
/// the lag counts from this moment.
#[derive(Debug)]
pub struct OpenSyncStream(Arc<AgentMetrics>);

impl Drop for OpenSyncStream {
    fn drop(&mut self) {
        self.0.heard_from_daemon();
        self.0.sync.open.store(false, Ordering::Relaxed);
    }
}

/// The agent's operations endpoint: its metrics and its readiness.
pub struct AgentOps {
    metrics: Arc<AgentMetrics>,
    attestation: watch::Receiver<Attestation>,
}

impl AgentOps {
    pub fn new(metrics: Arc<AgentMetrics>, attestation: watch::Receiver<Attestation>) -> Self {
        Self {
            metrics,
            attestation,
        }
    }
}

impl OpsEndpoint for AgentOps {
    type NotReady = NotReady;

    fn metrics(&self) -> String {
        self.metrics.render()
    }

    async fn readiness(&self) -> Result<(), NotReady> {
        readiness(&self.attestation.borrow())
    }
}

#[derive(Debug)]
struct SyncStatus {
    open: AtomicBool,
    /// Unix milliseconds of the last message, or of the stream's opening or closing.
    last_heard_ms: AtomicI64,
}

/// Seconds the agent's view may be behind the daemon's: none while the stream is open
/// (the daemon pushes every change as it happens, and HTTP/2 keepalive pings prove the
/// stream alive every 15 s), otherwise since the daemon was last heard.
fn sync_lag_seconds(open: bool, last_heard_ms: i64, now_ms: i64) -> f64 {
    if open {
        0.0
    } else {
        (now_ms - last_heard_ms).max(0) as f64 / 1000.0
    }
}

/// How many SVIDs the agent holds, and the earliest moment one of them expires (unix
/// seconds), when it holds any.
fn svid_figures(state: &WorkloadState) -> (i64, Option<i64>) {
    let earliest = state.svids.values().map(|svid| svid.not_after).min();
    (state.svids.len() as i64, earliest)
}

/// The gauges read off the agent's state at each scrape.
struct StateGauges {
    attestation: watch::Receiver<Attestation>,
    sync: Arc<SyncStatus>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for StateGauges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateGauges").finish_non_exhaustive()
    }
}

impl Collector for StateGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let (cached, earliest) = match &*self.attestation.borrow() {
            Attestation::Attested(state) => svid_figures(&state.borrow()),
            Attestation::Pending(_) => (0, None),
        };
        gauge(
            &mut encoder,
            "mayfly_agent_svids_cached",
            "Workload X509-SVIDs the agent holds now.",
            cached,
        )?;
        // Absent without SVIDs: 0 would read as "expired in 1970".
        if let Some(earliest) = earliest {
            gauge(
                &mut encoder,
                "mayfly_agent_svid_earliest_expiry_timestamp_seconds",
                "When the first of the held workload X509-SVIDs expires, in unix seconds.",
                earliest,
            )?;
        }
        let open = self.sync.open.load(Ordering::Relaxed);
        gauge(
            &mut encoder,
            "mayfly_agent_sync_connected",
            "1 while the sync stream to the daemon is open.",
            i64::from(open),
        )?;
        let lag = sync_lag_seconds(
            open,
            self.sync.last_heard_ms.load(Ordering::Relaxed),
            unix_ms(self.clock.now()),
        );
        gauge(
            &mut encoder,
            "mayfly_agent_sync_lag_seconds",
            "Seconds the agent's state may lag the daemon's: 0 while the sync stream is \
             open, else since the daemon was last heard.",
            lag,
        )
    }
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    code: GrpcCode,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SinkLabel {
    sink: String,
}

/// A gRPC status code, labelled with its name in the gRPC specification (`OK`,
/// `PERMISSION_DENIED`), the same in every language's client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GrpcCode(tonic::Code);

impl std::hash::Hash for GrpcCode {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.0 as i32).hash(state);
    }
}

impl EncodeLabelValue for GrpcCode {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        use tonic::Code;
        encoder.write_str(match self.0 {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;
    use std::time::{Duration, SystemTime};

    use crate::state::{Bundle, X509Svid};

    struct Manual(Mutex<SystemTime>);

    impl Clock for Manual {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }

    fn state(synced: bool, expiries: &[i64]) -> Arc<WorkloadState> {
        let mut state = WorkloadState::empty(Bundle {
            trust_domain: mayfly_common::TrustDomain::new("example.org").unwrap(),
            x509_authorities: Vec::new(),
            jwt_keys: Vec::new(),
            sequence: 0,
        });
        state.synced = synced;
        for (i, not_after) in expiries.iter().enumerate() {
            state.svids.insert(
                format!("e{i}"),
                Arc::new(X509Svid {
                    entry_id: format!("e{i}"),
                    spiffe_id: mayfly_common::SpiffeId::parse(&format!(
                        "spiffe://example.org/w{i}"
                    ))
                    .unwrap(),
                    hint: String::new(),
                    chain: Vec::new(),
                    key_pkcs8: Arc::new(zeroize::Zeroizing::new(Vec::new())),
                    serial: format!("{i:02x}"),
                    not_before: 0,
                    not_after: *not_after,
                }),
            );
        }
        Arc::new(state)
    }

    #[test]
    fn ready_only_once_attested_and_synced() {
        assert_eq!(
            readiness(&Attestation::Pending(None)),
            Err(NotReady::Attesting)
        );
        let failed = readiness(&Attestation::Pending(Some(
            "cannot reach the daemon at 127.0.0.1:1: connection refused".into(),
        )))
        .unwrap_err();
        assert!(
            failed.to_string().contains("cannot reach the daemon"),
            "{failed}"
        );
        let (tx, rx) = watch::channel(state(false, &[]));
        let attested = Attestation::Attested(rx);
        assert_eq!(readiness(&attested), Err(NotReady::NotSynced));
        tx.send_replace(state(true, &[]));
        assert_eq!(readiness(&attested), Ok(()));
    }

    #[test]
    fn lag_is_zero_while_open_and_grows_once_closed() {
        assert_eq!(sync_lag_seconds(true, 0, 90_000), 0.0);
        assert_eq!(sync_lag_seconds(false, 30_000, 90_500), 60.5);
        // A clock stepped back never makes it negative.
        assert_eq!(sync_lag_seconds(false, 90_000, 30_000), 0.0);
    }

    #[test]
    fn the_state_gauges_follow_attestation_the_cache_and_the_stream() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = Arc::new(Manual(Mutex::new(start)));
        let (attestation_tx, attestation_rx) = watch::channel(Attestation::Pending(None));
        let metrics = Arc::new(AgentMetrics::new(attestation_rx, clock.clone()));
        let text = metrics.render();
        assert!(text.contains("\nmayfly_agent_svids_cached 0\n"), "{text}");
        assert!(
            !text.contains("mayfly_agent_svid_earliest_expiry"),
            "{text}"
        );
        assert!(text.contains("\nmayfly_agent_sync_connected 0\n"), "{text}");

        let (_state_tx, state_rx) = watch::channel(state(true, &[2_000_000, 1_500_000]));
        attestation_tx.send_replace(Attestation::Attested(state_rx));
        let stream = metrics.sync_opened();
        *clock.0.lock().unwrap() += Duration::from_secs(30);
        let text = metrics.render();
        for line in [
            "mayfly_agent_svids_cached 2",
            "mayfly_agent_svid_earliest_expiry_timestamp_seconds 1500000",
            "mayfly_agent_sync_connected 1",
            "mayfly_agent_sync_lag_seconds 0.0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        drop(stream);
        *clock.0.lock().unwrap() += Duration::from_secs(12);
        let text = metrics.render();
        assert!(text.contains("\nmayfly_agent_sync_connected 0\n"), "{text}");
        assert!(
            text.contains("\nmayfly_agent_sync_lag_seconds 12.0\n"),
            "{text}"
        );
    }

    #[test]
    fn counters_carry_their_labels() {
        let metrics = Arc::new(AgentMetrics::default());
        metrics.request_answered("FetchX509SVID", tonic::Code::Ok);
        metrics.request_answered("FetchX509SVID", tonic::Code::Ok);
        metrics.request_answered("FetchJWTSVID", tonic::Code::PermissionDenied);
        metrics.sink_written("web cert");
        metrics.sink_failed("db \"password\"");
        let workload = metrics.workload_connected();
        let text = metrics.render();
        for line in [
            "# TYPE mayfly_agent_workload_api_requests_total counter",
            "mayfly_agent_workload_api_requests_total{method=\"FetchX509SVID\",code=\"OK\"} 2",
            "mayfly_agent_workload_api_requests_total{method=\"FetchJWTSVID\",code=\"PERMISSION_DENIED\"} 1",
            "mayfly_agent_sink_writes_total{sink=\"web cert\"} 1",
            "mayfly_agent_sink_failures_total{sink=\"db \\\"password\\\"\"} 1",
            "mayfly_agent_connected_workloads 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        drop(workload);
        assert!(
            metrics
                .render()
                .contains("\nmayfly_agent_connected_workloads 0\n")
        );
    }
}
