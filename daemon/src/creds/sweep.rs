//! Revoking: one lease at its backend (idempotent, recorded), many at a time, and the
//! expiry sweeper that revokes what has expired and retries what failed, after restarts
//! too.

use super::*;

impl Broker {
    // ----- revoking -----

    /// Revokes a lease at its backend and records why; idempotent.
    pub async fn revoke_lease(
        &self,
        lease: &CredentialLease,
        actor: &Actor,
        why: &str,
    ) -> Result<(), CredsError> {
        if lease.state == LeaseState::Revoked {
            return Ok(());
        }
        let mut why = why.to_string();
        let outcome = match self.load(&lease.credential).await {
            // Recorded but never issued by a backend that names its own leases: nothing
            // there to revoke.
            Ok(_) if lease.backend_id.is_empty() => Ok(()),
            Ok(loaded) => {
                if !loaded.backend.revocable() {
                    why.push_str("; the STS session itself lasts until its expiry");
                }
                loaded
                    .backend
                    .revoke(&lease.backend_id)
                    .await
                    .map_err(CredsError::from)
            }
            Err(e) => Err(e),
        };
        let why = why.as_str();
        let now = self.now();
        let scope = format!(
            "lease {} of {} for {} as {}",
            lease.id, lease.credential, lease.holder, lease.backend_id
        );
        match outcome {
            Ok(()) => {
                self.store
                    .set_lease_state(&lease.id, LeaseState::Revoked, Some(now), why)
                    .await?;
                self.audit.note(
                    Event::new(actor, "lease.revoke", &lease.holder)
                        .scope(scope)
                        .reason(why),
                );
                tracing::info!(lease = %lease.id, credential = %lease.credential, %why, "lease revoked at the backend");
                Ok(())
            }
            Err(e) => {
                let reason = format!("{why}; revoking at the backend failed: {e}");
                self.store
                    .set_lease_state(&lease.id, LeaseState::RevokeFailed, None, &reason)
                    .await?;
                self.audit.note_refusal(
                    Event::new(actor, "lease.revoke", &lease.holder)
                        .scope(scope)
                        .failed(e.to_string()),
                );
                tracing::warn!(lease = %lease.id, error = %e, "could not revoke a lease; the sweeper retries");
                Err(e)
            }
        }
    }

    /// Revokes the leases due now (expired, failed before, or stuck issuing); returns how
    /// many were revoked.
    pub async fn sweep(&self) -> Result<usize, CredsError> {
        let now = self.now();
        let due = self
            .store
            .leases_due(now, now - STALE_ISSUING_SECS, SWEEP_BATCH)
            .await?;
        Ok(self.revoke_many(due, &Actor::Daemon, None).await.0)
    }

    /// Revokes `leases`, several at once (each backend call waits on the network), with
    /// `why` or, without one, the reason each lease is due. Returns how many were revoked
    /// and the errors of those that were not.
    pub async fn revoke_many(
        &self,
        leases: Vec<CredentialLease>,
        actor: &Actor,
        why: Option<&str>,
    ) -> (usize, Vec<(String, CredsError)>) {
        use futures::StreamExt as _;
        let now = self.now();
        let outcomes: Vec<_> = futures::stream::iter(leases)
            .map(|lease| async move {
                let why = why.unwrap_or(match lease.state {
                    LeaseState::Issuing if lease.expires_at > now => "never finished issuing",
                    LeaseState::RevokeFailed => "retrying a failed revocation",
                    _ => "expired",
                });
                let outcome = self.revoke_lease(&lease, actor, why).await;
                (lease.id, outcome)
            })
            .buffer_unordered(REVOKE_CONCURRENCY)
            .collect()
            .await;
        let mut revoked = 0;
        let mut failed = Vec::new();
        for (id, outcome) in outcomes {
            match outcome {
                Ok(()) => revoked += 1,
                Err(e) => failed.push((id, e)),
            }
        }
        (revoked, failed)
    }

    pub(super) async fn sweep_loop(self: Arc<Self>) {
        let interval = std::env::var("MAYFLY_LEASE_SWEEP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(SWEEP_INTERVAL);
        let mut timer = tokio::time::interval(interval);
        loop {
            timer.tick().await;
            loop {
                match self.sweep().await {
                    // A full batch: more may be due.
                    Ok(n) if n as i64 >= SWEEP_BATCH => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "lease sweep failed");
                        break;
                    }
                }
            }
        }
    }
}
