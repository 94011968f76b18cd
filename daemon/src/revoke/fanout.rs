//! Fan-out and acknowledgements: pushing revocations to agents (including those another
//! daemon made), counting acknowledgements, and the reports operators read.

use super::*;

impl Revoker {
    pub(super) fn published_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.published.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pushes a revocation another daemon on the datastore made (its notice arrived) to
    /// the agents connected here; their acknowledgements land in the store, where the
    /// revoking daemon looks for them.
    pub async fn take_revocation(&self, id: &str) -> Result<(), RevokeError> {
        if self.published_map().contains_key(id) {
            return Ok(());
        }
        let record = self.registry.store().get_revocation(id).await?;
        self.publish_stored(&record).await?;
        self.published_map()
            .insert(record.id.clone(), record.created_at);
        Ok(())
    }

    /// Pushes the recent revocations of other daemons whose notices never arrived: what
    /// the catch-up after a lost listening connection (and every half minute) does.
    pub async fn catch_up(&self) {
        // Clocks of daemons differ a little, and a connection can be away a while: look
        // back [`CATCH_UP_WINDOW`], and remember what has been pushed for as long.
        let now = unix_ms(self.registry.now());
        let window = CATCH_UP_WINDOW.as_millis() as i64;
        self.published_map().retain(|_, at| *at >= now - 2 * window);
        let records = match self.registry.store().revocations_since(now - window).await {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for other daemons' revocations");
                return;
            }
        };
        for record in records {
            if self.published_map().contains_key(&record.id) {
                continue;
            }
            if let Err(e) = self.publish_stored(&record).await {
                tracing::warn!(revocation = %record.id, error = %e, "could not push another daemon's revocation");
                continue;
            }
            self.published_map()
                .insert(record.id.clone(), record.created_at);
        }
    }

    pub(super) async fn publish_stored(
        &self,
        record: &RevocationRecord,
    ) -> Result<(), RevokeError> {
        let store = self.registry.store();
        // A taint made elsewhere switched the CA: sign the agents' fresh SVIDs with the new
        // one, not the one this daemon loaded last.
        self.registry
            .ca()
            .sync(self.registry.now())
            .await
            .map_err(|e| {
                RevokeError::Failed(format!("taking up the CA change of {}: {e}", record.id))
            })?;
        let scope: Scope = serde_json::from_str(&record.detail).unwrap_or_default();
        let serials = store.revocation_serials(&record.id).await?;
        let agents: BTreeSet<String> = store
            .revocation_acks(&record.id)
            .await?
            .into_iter()
            .filter(|a| a.acked_at.is_none())
            .map(|a| a.agent_id)
            .collect();
        self.registry.forget_revoked_entries(&scope.entry_ids);
        tracing::info!(revocation = %record.id, kind = %record.kind, agents = agents.len(), "pushing a revocation made by another daemon");
        let notice = self.notice(record, &scope, &serials, agents).await;
        self.registry.publish_revocation(notice);
        Ok(())
    }

    /// The revocation as the sync streams push it to `agents`: its message, split once by
    /// what each agent holds, and the revoked secrets' new values.
    pub(super) async fn notice(
        &self,
        record: &RevocationRecord,
        scope: &Scope,
        serials: &[RevokedSerialRecord],
        agents: BTreeSet<String>,
    ) -> RevocationNotice {
        let message = message(record, scope, serials);
        RevocationNotice {
            shares: Shares::new(&message, &scope.held),
            message,
            replacements: self.replacements(&scope.secrets).await,
            agents,
        }
    }

    /// The revoked secrets' new values, each read from its store once for every stream
    /// that pushes it. One that cannot be read now is left out: the agent has it from the
    /// promotion already, or gets it when it reconnects.
    pub(super) async fn replacements(
        &self,
        secrets: &[String],
    ) -> Vec<Arc<crate::secrets::engine::Promoted>> {
        let mut values = Vec::with_capacity(secrets.len());
        for name in secrets {
            match self.secrets.promoted(name).await {
                Ok(Some(value)) => values.push(value),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(secret = %name, error = %e, "could not read a revoked secret's replacement");
                }
            }
        }
        values
    }

    pub(super) fn waiting_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiting>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn mark(&self, id: &str, agents: BTreeSet<String>) {
        if let Some(waiting) = self.waiting_map().get(id) {
            waiting.acked.send_if_modified(|set| {
                let before = set.len();
                set.extend(agents);
                set.len() != before
            });
        }
    }

    /// Records an agent's acknowledgement (from its node API call).
    pub async fn acknowledge(
        &self,
        agent: &str,
        ack: &v1::RevocationAck,
    ) -> Result<(), RevokeError> {
        let detail = serde_json::json!({
            "dropped_serials": ack.dropped_serials,
            "reissued": ack.reissued,
            "files_removed": ack.files_removed,
            "files_blanked": ack.files_blanked,
            "actions": ack.actions,
            "errors": ack.errors,
        });
        let at_ms = unix_ms(self.registry.now());
        // While the revoking call waits, this daemon knows whom it was sent to and who
        // has answered; otherwise (a late or repeated acknowledgement, another daemon's
        // revocation) the store does.
        let in_memory = self
            .waiting_map()
            .get(&ack.revocation_id)
            .map(|w| (w.expected.contains(agent), w.acked.borrow().contains(agent)));
        let (sent, already) = match in_memory {
            Some(known) => known,
            None => match self
                .registry
                .store()
                .revocation_ack(&ack.revocation_id, agent)
                .await?
            {
                Some(row) => (true, row.acked_at.is_some()),
                None => (false, false),
            },
        };
        if !sent {
            return Err(RevokeError::NotFound(format!(
                "revocation {} was not sent to agent {agent}",
                ack.revocation_id
            )));
        }
        if !already {
            let outcome = if ack.errors.is_empty() {
                crate::audit::OK
            } else {
                crate::audit::FAILED
            };
            // The acknowledgement and its record commit together, grouped with whatever
            // else is being recorded: a fan-out to a thousand agents is a few commits.
            self.audit.note_ack(
                Event::new(
                    &Actor::Spiffe(agent.to_string()),
                    "revoke.ack",
                    &ack.revocation_id,
                )
                .outcome(outcome)
                .reason(ack.errors.join("; "))
                .detail(detail.clone()),
                AckUpdate {
                    revocation_id: ack.revocation_id.clone(),
                    agent_id: agent.to_string(),
                    at_ms,
                    detail: detail.to_string(),
                },
            );
        }
        self.mark(&ack.revocation_id, BTreeSet::from([agent.to_string()]));
        Ok(())
    }

    /// The revocation's record and who has acknowledged it.
    pub async fn report(&self, id: &str) -> Result<Report, RevokeError> {
        let store = self.registry.store();
        let record = store.get_revocation(id).await.map_err(|e| match e {
            StoreError::NotFound { .. } => RevokeError::NotFound(format!(
                "no revocation {id}; `mayflyd revoke list` shows them"
            )),
            other => other.into(),
        })?;
        let scope: Scope = serde_json::from_str(&record.detail).unwrap_or_default();
        let serials = store
            .revocation_serials(id)
            .await?
            .into_iter()
            .map(|s| s.serial)
            .collect();
        let acks = store.revocation_acks(id).await?;
        let last = acks.iter().filter_map(|a| a.acked_at).max();
        Ok(Report {
            elapsed_ms: last.map(|at| (at - record.created_at).max(0)).unwrap_or(0),
            agents: acks
                .into_iter()
                .map(|a| AgentAck {
                    agent: a.agent_id,
                    acked_at: a.acked_at,
                    detail: a.detail,
                })
                .collect(),
            record,
            scope,
            serials,
        })
    }

    pub async fn list(&self, limit: i64) -> Result<Vec<Report>, RevokeError> {
        let mut out = Vec::new();
        for record in self.registry.store().list_revocations(limit).await? {
            out.push(self.report(&record.id).await?);
        }
        Ok(out)
    }

    /// What a reconnecting agent must apply before anything else: its unacknowledged
    /// revocations (without secret replacements, which the caller adds) and its part of
    /// the deny list (`Store::deny_list_for`).
    pub async fn pending_for(
        &self,
        agent: &str,
    ) -> Result<(Vec<(v1::Revocation, Vec<String>)>, Vec<v1::RevokedSerial>), RevokeError> {
        let store = self.registry.store();
        let mut pending = Vec::new();
        for record in store.pending_revocations(agent).await? {
            let scope: Scope = serde_json::from_str(&record.detail).unwrap_or_default();
            let serials = store.revocation_serials(&record.id).await?;
            let message = message(&record, &scope, &serials);
            let own = Shares::new(&message, &scope.held).message_for(agent, &message);
            pending.push((own, scope.secrets.clone()));
        }
        let deny = store
            .deny_list_for(agent, unix(self.registry.now()))
            .await?
            .into_iter()
            .map(|s| v1::RevokedSerial {
                serial: s.serial,
                not_after: s.not_after,
            })
            .collect();
        Ok((pending, deny))
    }
}
