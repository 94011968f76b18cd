//! What the daemon's operations endpoint (`metrics_listen`) answers: its metrics, and
//! whether it is ready to serve agents: the datastore answers a trivial query in time, and
//! the CA it signs with is loaded and not expired.

use std::sync::Arc;
use std::time::Duration;

use mayfly_common::clock::{Clock, unix};
use mayfly_common::ops::OpsEndpoint;

use crate::ca::manager::CaManager;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// How long `/readyz` waits for the datastore: well under the usual probe timeouts, so a
/// hung database reads as "not ready" rather than as a probe that never answered.
const DATASTORE_TIMEOUT: Duration = Duration::from_secs(2);

/// The daemon as its operations endpoint sees it.
pub struct DaemonHealth {
    metrics: Arc<Metrics>,
    store: Store,
    ca: Arc<CaManager>,
    clock: Arc<dyn Clock>,
}

/// Why the daemon cannot serve agents right now.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotReady {
    #[error("the datastore did not answer a trivial query within {0:?}")]
    DatastoreTimeout(Duration),
    #[error("the datastore failed a trivial query: {0}")]
    Datastore(#[source] StoreError),
    #[error(
        "the active CA (slot {slot}) expired at unix time {expired_at}: nothing it signs is \
         valid; `mayflyd ca prepare` and `mayflyd ca activate` make a new one"
    )]
    CaExpired { slot: String, expired_at: i64 },
}

impl DaemonHealth {
    pub fn new(
        metrics: Arc<Metrics>,
        store: Store,
        ca: Arc<CaManager>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            metrics,
            store,
            ca,
            clock,
        }
    }

    /// The datastore first: without it nothing else the daemon does works.
    pub async fn check(&self) -> Result<(), NotReady> {
        match tokio::time::timeout(DATASTORE_TIMEOUT, self.store.ping()).await {
            Err(_) => return Err(NotReady::DatastoreTimeout(DATASTORE_TIMEOUT)),
            Ok(Err(e)) => return Err(NotReady::Datastore(e)),
            Ok(Ok(())) => {}
        }
        let authorities = self.ca.current();
        let expired_at = authorities.x509.not_after();
        if expired_at <= unix(self.clock.now()) {
            return Err(NotReady::CaExpired {
                slot: authorities.active_slot.clone(),
                expired_at,
            });
        }
        Ok(())
    }
}

impl OpsEndpoint for DaemonHealth {
    type NotReady = NotReady;

    fn metrics(&self) -> String {
        self.metrics.render()
    }

    async fn readiness(&self) -> Result<(), NotReady> {
        self.check().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;
    use std::time::SystemTime;

    use mayfly_common::TrustDomain;

    use crate::secrets::local::SealingKey;

    /// A clock the test moves.
    struct Manual(Mutex<SystemTime>);

    impl Clock for Manual {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }

    async fn daemon(dir: &std::path::Path, clock: Arc<Manual>) -> (DaemonHealth, Store) {
        let store = Store::connect(None, dir).await.unwrap();
        let sealing = Arc::new(SealingKey::load_or_create(dir).unwrap());
        let ca = CaManager::start(
            store.clone(),
            dir,
            sealing,
            TrustDomain::new("example.org").unwrap(),
            Duration::from_secs(3600),
            clock.now(),
        )
        .await
        .unwrap();
        let health = DaemonHealth::new(
            Arc::new(Metrics::default()),
            store.clone(),
            Arc::new(ca),
            clock,
        );
        (health, store)
    }

    #[tokio::test]
    async fn ready_with_a_datastore_and_a_current_ca() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(Manual(Mutex::new(SystemTime::now())));
        let (health, _store) = daemon(dir.path(), clock).await;
        health.check().await.unwrap();
    }

    #[tokio::test]
    async fn a_closed_datastore_is_not_ready_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(Manual(Mutex::new(SystemTime::now())));
        let (health, store) = daemon(dir.path(), clock).await;
        store.close().await;
        let why = health.check().await.unwrap_err();
        assert!(matches!(why, NotReady::Datastore(_)), "{why:?}");
        assert!(why.to_string().starts_with("the datastore failed"), "{why}");
    }

    #[tokio::test]
    async fn an_expired_ca_is_not_ready_and_names_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(Manual(Mutex::new(SystemTime::now())));
        let (health, _store) = daemon(dir.path(), clock.clone()).await;
        *clock.0.lock().unwrap() += Duration::from_secs(2 * 3600);
        let why = health.check().await.unwrap_err();
        assert!(matches!(why, NotReady::CaExpired { .. }), "{why:?}");
        assert!(why.to_string().contains("mayflyd ca prepare"), "{why}");
    }
}
