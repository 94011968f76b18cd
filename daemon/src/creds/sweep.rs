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
        // Many leases of one PostgreSQL definition for one reason (an elevation's end, a
        // revoked credential): dropped in batches, a few round trips per hundreds of roles
        // rather than four each (measured: 1,000 roles took about 0.9 s one by one). What a
        // batch does not finish goes the one-by-one way below.
        let (mut revoked, leases) = match why {
            Some(why) => self.revoke_batches(leases, actor, why, now).await,
            None => (0, leases),
        };
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
        let mut failed = Vec::new();
        for (id, outcome) in outcomes {
            match outcome {
                Ok(()) => revoked += 1,
                Err(e) => failed.push((id, e)),
            }
        }
        (revoked, failed)
    }

    /// Revokes the PostgreSQL leases of `leases` in batches per definition; returns how
    /// many it revoked and the leases left for one-by-one revocation (other backends, and
    /// any batch that failed).
    async fn revoke_batches(
        &self,
        leases: Vec<CredentialLease>,
        actor: &Actor,
        why: &str,
        now: i64,
    ) -> (usize, Vec<CredentialLease>) {
        const BATCH: usize = 250;
        let mut by_credential: HashMap<String, Vec<CredentialLease>> = HashMap::new();
        let mut rest = Vec::new();
        for lease in leases {
            if lease.state == LeaseState::Revoked {
                continue;
            }
            if lease.backend_id.is_empty() {
                rest.push(lease);
            } else {
                by_credential
                    .entry(lease.credential.clone())
                    .or_default()
                    .push(lease);
            }
        }
        let mut revoked = 0;
        for (credential, group) in by_credential {
            let loaded = match self.load(&credential).await {
                Ok(loaded) if group.len() > 1 => loaded,
                _ => {
                    rest.extend(group);
                    continue;
                }
            };
            let Backend::Postgres(pg) = &*loaded.backend else {
                rest.extend(group);
                continue;
            };
            for chunk in group.chunks(BATCH) {
                let roles: Vec<String> = chunk.iter().map(|l| l.backend_id.clone()).collect();
                let ids: Vec<String> = chunk.iter().map(|l| l.id.clone()).collect();
                let done = match pg.revoke_batch(&roles).await {
                    Ok(()) => self.store.set_leases_revoked(&ids, now, why).await,
                    Err(e) => {
                        tracing::warn!(%credential, leases = chunk.len(), error = %e, "a batch revocation failed; revoking one by one");
                        rest.extend(chunk.iter().cloned());
                        continue;
                    }
                };
                if let Err(e) = done {
                    // Gone at the backend; the sweeper finds them again and finds nothing
                    // left to drop.
                    tracing::warn!(%credential, error = %e, "could not record a batch of revoked leases");
                    rest.extend(chunk.iter().cloned());
                    continue;
                }
                revoked += chunk.len();
                for lease in chunk {
                    self.audit.note(
                        Event::new(actor, "lease.revoke", &lease.holder)
                            .scope(format!(
                                "lease {} of {} for {} as {}",
                                lease.id, lease.credential, lease.holder, lease.backend_id
                            ))
                            .reason(why),
                    );
                }
                tracing::info!(%credential, leases = chunk.len(), %why, "leases revoked at the backend in one batch");
            }
        }
        (revoked, rest)
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
