//! Several daemons on one PostgreSQL datastore, kept in step: a change made through one
//! (an entry created, updated or deleted; an agent evicted or banned; a revocation; a
//! secret's promoted version; a CA prepared, activated, tainted or removed) is committed to
//! the datastore and announced with `NOTIFY` on one channel; every other daemon `LISTEN`s,
//! reads the change back from the rows, and pushes it to the agents connected to it. The
//! notice carries only what changed, never a value: the rows are the truth.
//!
//! A notice can be lost (the listening connection drops, a daemon dies between its commit
//! and its notice), so each daemon also catches up from the rows: at once after every
//! (re)connect, and every [`CATCH_UP_EVERY`] while connected.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;

use crate::identity::Registry;
use crate::revoke::Revoker;
use crate::secrets::engine::RotationEngine;

/// The notification channel every daemon on a datastore listens on.
pub const CHANNEL: &str = "mayfly_changes";

/// How often a connected daemon reads the rows again for what a lost notice would miss.
pub const CATCH_UP_EVERY: Duration = Duration::from_secs(30);

/// What changed, as other daemons hear of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// Created, updated or deleted: read it back by id.
    Entry {
        id: String,
    },
    /// Evicted or banned.
    Agent {
        spiffe_id: String,
    },
    Revocation {
        id: String,
    },
    /// A new version was promoted.
    Secret {
        name: String,
    },
    /// The CA slots changed (the bundle sequence moved).
    Ca,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    notice: Notice,
}

/// The payload of one notice from `origin`.
pub fn encode(origin: &str, notice: &Notice) -> String {
    serde_json::to_string(&Envelope {
        from: origin.to_string(),
        notice: notice.clone(),
    })
    .unwrap_or_default()
}

/// What a daemon acts on when another one announces a change.
pub struct Cluster {
    pub registry: Arc<Registry>,
    pub revoker: Arc<Revoker>,
    pub secrets: Arc<RotationEngine>,
}

impl Cluster {
    /// Listens until the daemon stops; reconnects with backoff, catching up each time.
    pub async fn follow(self) {
        let store = self.registry.store().clone();
        let mut closing = self.registry.closing();
        let mut delay = Duration::from_millis(100);
        loop {
            tokio::select! {
                Err(e) = self.listen(&store, &mut delay) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "lost the connection that listens for other daemons' changes; catching up when it is back");
                }
                _ = closing.wait_for(|c| *c) => return,
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// One listening connection, for as long as it lasts: it ends only with its error.
    /// Connected, it resets the reconnect `delay` and catches up on what it missed.
    async fn listen(
        &self,
        store: &crate::store::Store,
        delay: &mut Duration,
    ) -> Result<std::convert::Infallible, sqlx::Error> {
        let mut listener = PgListener::connect(store.url()).await?;
        listener.listen(CHANNEL).await?;
        tracing::info!(channel = CHANNEL, "listening for other daemons' changes");
        *delay = Duration::from_millis(100);
        // Whatever happened while nobody listened.
        self.catch_up().await;
        let mut timer = tokio::time::interval(CATCH_UP_EVERY);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer.tick().await;
        loop {
            tokio::select! {
                received = listener.recv() => {
                    self.take(store.origin(), received?.payload()).await;
                }
                _ = timer.tick() => self.catch_up().await,
            }
        }
    }

    /// Acts on one notice, unless this daemon sent it.
    async fn take(&self, origin: &str, payload: &str) {
        let envelope: Envelope = match serde_json::from_str(payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                tracing::warn!(error = %e, "a change notice this daemon does not understand; catching up instead");
                self.catch_up().await;
                return;
            }
        };
        if envelope.from == origin {
            return;
        }
        let result = match &envelope.notice {
            Notice::Entry { id } => self
                .registry
                .take_entry_change(id)
                .await
                .map_err(|e| e.to_string()),
            Notice::Agent { spiffe_id } => self
                .registry
                .take_agent_change(spiffe_id)
                .await
                .map_err(|e| e.to_string()),
            Notice::Revocation { id } => self
                .revoker
                .take_revocation(id)
                .await
                .map_err(|e| e.to_string()),
            Notice::Secret { name } => {
                self.secrets.take_promotion(name).await;
                Ok(())
            }
            Notice::Ca => self
                .registry
                .ca()
                .sync(self.registry.now())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!(notice = ?envelope.notice, error = %e, "could not take up another daemon's change; the next catch-up retries");
        }
    }

    /// Reads the rows for whatever notices were missed.
    async fn catch_up(&self) {
        if let Err(e) = self.registry.resync_entries().await {
            tracing::warn!(error = %e, "could not catch up on entries");
        }
        if let Err(e) = self.registry.resync_agents().await {
            tracing::warn!(error = %e, "could not catch up on evicted agents");
        }
        self.revoker.catch_up().await;
        if let Err(e) = self.registry.ca().sync(self.registry.now()).await {
            tracing::warn!(error = %e, "could not catch up on the CA");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_with_their_origin() {
        for notice in [
            Notice::Entry { id: "e1".into() },
            Notice::Agent {
                spiffe_id: "spiffe://example.org/node/a".into(),
            },
            Notice::Revocation { id: "rv-1".into() },
            Notice::Secret { name: "db".into() },
            Notice::Ca,
        ] {
            let payload = encode("daemon-a", &notice);
            assert!(
                payload.len() < 8000,
                "NOTIFY payloads stay under 8000 bytes"
            );
            let back: Envelope = serde_json::from_str(&payload).unwrap();
            assert_eq!(back.from, "daemon-a");
            assert_eq!(back.notice, notice);
        }
    }
}
