//! Reporting refused Workload API requests to the daemon, so that they are on its audit
//! trail with everything else. Refusals are queued without blocking the refusing call,
//! sent in batches once a second, and counted (not queued) when a caller retrying in a
//! tight loop fills the queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use mayfly_common::Selector;
use mayfly_proto::v1;

use super::ClientCell;

const QUEUE: usize = 1000;
const BATCH: usize = 500;
const EVERY: Duration = Duration::from_secs(1);

/// Where the Workload API puts its refusals.
#[derive(Clone)]
pub struct DenialSink {
    tx: mpsc::Sender<v1::WorkloadDenial>,
    dropped: Arc<AtomicU64>,
}

impl DenialSink {
    pub fn deny(&self, call: &str, caller: &[Selector], reason: &str) {
        let denial = v1::WorkloadDenial {
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            call: call.to_string(),
            selectors: caller.iter().map(ToString::to_string).collect(),
            reason: reason.to_string(),
        };
        if self.tx.try_send(denial).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The sink, and the task that reports what reaches it until the sink is dropped.
pub fn reporter(client: ClientCell) -> (DenialSink, impl Future<Output = ()>) {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let sink = DenialSink {
        tx,
        dropped: dropped.clone(),
    };
    let task = async move {
        while let Some(first) = rx.recv().await {
            tokio::time::sleep(EVERY).await;
            let mut denials = vec![first];
            while denials.len() < BATCH {
                match rx.try_recv() {
                    Ok(denial) => denials.push(denial),
                    Err(_) => break,
                }
            }
            let report = v1::DenialReport {
                denials,
                dropped: dropped.swap(0, Ordering::Relaxed),
            };
            let mut node = client.borrow().clone();
            if let Err(status) = node.report_denials(report).await {
                tracing::debug!(code = ?status.code(), error = %status.message(), "could not report refused Workload API requests to the daemon");
            }
        }
    };
    (sink, task)
}
