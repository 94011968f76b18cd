//! Carrying a revocation out: the revocation, its deny-list serials, the agents it must
//! reach and the deletions in one transaction with its audit record; CA taint and removal.

use super::*;

impl Revoker {
    /// Records the revocation and its audit record, pushes it, and waits for the agents.
    pub(super) async fn execute(
        &self,
        plan: Plan,
        reason: &str,
        actor: &Actor,
        started: Instant,
        wait: Duration,
    ) -> Result<Report, RevokeError> {
        let Plan {
            kind,
            target,
            scope,
            serials,
            agents,
            ban,
        } = plan;
        let now = self.registry.now();
        let store = self.registry.store();
        let record = RevocationRecord {
            id: format!("rv-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
            kind,
            target,
            reason: reason.to_string(),
            actor: actor.to_string(),
            created_at: unix_ms(now),
            detail: serde_json::to_string(&scope).unwrap_or_default(),
        };
        let agent_list: Vec<String> = agents.iter().cloned().collect();
        // Known here before it is in the store, so the watch on other daemons' revocations
        // does not push it a second time.
        self.published_map()
            .insert(record.id.clone(), record.created_at);
        let deleted = store
            .create_revocation(&record, &serials, &agent_list, &scope.entry_ids)
            .await?;
        let deleted: Vec<String> = deleted.into_iter().map(|e| e.id).collect();
        self.registry.forget_revoked_entries(&deleted);
        // Agents connected to other daemons on the datastore get it from those daemons.
        self.registry
            .store()
            .announce(&crate::cluster::Notice::Revocation {
                id: record.id.clone(),
            })
            .await;
        self.audit
            .record(
                Event::new(actor, &format!("revoke.{}", record.kind), &record.target)
                    .reason(reason)
                    .scope(format!("revocation {}", record.id))
                    .detail(serde_json::json!({
                        "revocation": record.id,
                        "serials": serials.iter().map(|s| &s.serial).collect::<Vec<_>>(),
                        "entry_ids": scope.entry_ids,
                        "spiffe_ids": scope.spiffe_ids,
                        "secrets": scope.secrets,
                        "agents": agent_list,
                    })),
            )
            .await
            .map_err(|e| RevokeError::Failed(e.to_string()))?;

        // Waiting starts before the push so no acknowledgement is missed.
        let (acked_tx, mut acked_rx) = watch::channel(BTreeSet::new());
        self.waiting_map().insert(
            record.id.clone(),
            Waiting {
                expected: Arc::new(agents.clone()),
                acked: acked_tx,
            },
        );
        let notice = self.notice(&record, &scope, &serials, agents.clone()).await;
        self.registry.publish_revocation(notice);
        if let Some(agent) = &ban {
            self.registry
                .set_agent_status(agent, AgentStatus::Banned, reason)
                .await?;
        }
        tracing::warn!(revocation = %record.id, kind = %record.kind, target = %record.target, agents = agents.len(), serials = serials.len(), %reason, "revoked");

        let deadline = tokio::time::Instant::now() + wait;
        let mut last_ack = started.elapsed();
        loop {
            let acked = acked_rx.borrow_and_update().len();
            if acked >= agents.len() {
                last_ack = started.elapsed();
                break;
            }
            tokio::select! {
                changed = acked_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                // Acknowledgements that reached another daemon sharing the store.
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    let stored = store.revocation_acks(&record.id).await?;
                    let done: BTreeSet<String> = stored
                        .into_iter()
                        .filter(|a| a.acked_at.is_some())
                        .map(|a| a.agent_id)
                        .collect();
                    self.mark(&record.id, done);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    last_ack = started.elapsed();
                    break;
                }
            }
        }
        self.waiting_map().remove(&record.id);
        // The acknowledgements seen here are committed with their records; wait for that.
        self.audit
            .flush()
            .await
            .map_err(|e| RevokeError::Failed(e.to_string()))?;
        let mut report = self.report(&record.id).await?;
        report.elapsed_ms = last_ack.as_millis() as i64;
        Ok(report)
    }

    /// `mayflyd ca taint`: a new CA signs from now on, and every agent re-signs what the
    /// old one signed (its workloads' SVIDs, under new keys, and its own), acknowledging
    /// like any revocation. The old CA stays in the bundle until `revoke_ca`.
    pub async fn taint_ca(
        &self,
        reason: &str,
        actor: &Actor,
        wait: Option<Duration>,
    ) -> Result<Report, RevokeError> {
        let (reason, wait) = checked(reason, wait)?;
        let started = Instant::now();
        let now = self.registry.now();
        let old = self
            .registry
            .ca()
            .taint(now)
            .await
            .map_err(|e| RevokeError::Failed(format!("preparing the new CA: {e}")))?;
        let new = self.registry.ca().current().active_slot.clone();
        let store = self.registry.store();
        let mut serials = Vec::new();
        for svid in store.live_serials_for_slot(&old, unix(now)).await? {
            if !svid.entry_id.is_empty() {
                serials.push(RevokedSerialRecord {
                    serial: svid.serial,
                    not_after: svid.not_after,
                });
            }
        }
        let agents: BTreeSet<String> = store
            .list_agents()
            .await?
            .into_iter()
            .filter(|a| a.status == AgentStatus::Active)
            .map(|a| a.spiffe_id)
            .collect();
        let scope = Scope {
            renew_agent_svid: true,
            notes: vec![format!(
                "CA {old} is tainted and CA {new} signs from now on; `mayflyd ca revoke` takes \
                 {old} out of the bundle once every agent has acknowledged"
            )],
            ..Scope::default()
        };
        let plan = Plan {
            kind: "ca".into(),
            target: old,
            scope,
            serials,
            agents,
            ban: None,
        };
        self.execute(plan, reason, actor, started, wait).await
    }

    /// `mayflyd ca revoke`: removes a retired CA from the bundle, refusing (and naming
    /// them) while any unexpired SVID it signed is not deny-listed, any agent still holds
    /// its own SVID from it, or any agent has not acknowledged its taint.
    pub async fn revoke_ca(
        &self,
        slot: Option<&str>,
        actor: &Actor,
    ) -> Result<String, RevokeError> {
        let store = self.registry.store();
        let slot = match slot.filter(|s| !s.is_empty()) {
            Some(slot) => slot.to_string(),
            None => store
                .list_revocations(1000)
                .await?
                .into_iter()
                .find(|r| r.kind == "ca")
                .map(|r| r.target)
                .ok_or_else(|| {
                    RevokeError::NotFound(
                        "no CA has been tainted; name the retired slot with --slot".into(),
                    )
                })?,
        };
        let now_s = unix(self.registry.now());
        let denied: BTreeSet<String> = store
            .deny_list(now_s)
            .await?
            .into_iter()
            .map(|s| s.serial)
            .collect();
        let live = store.live_serials_for_slot(&slot, now_s).await?;
        let agent_serials: BTreeSet<&str> = live
            .iter()
            .filter(|s| s.entry_id.is_empty())
            .map(|s| s.serial.as_str())
            .collect();
        let workloads = live
            .iter()
            .filter(|s| !s.entry_id.is_empty() && !denied.contains(&s.serial))
            .count();
        let mut on_old = Vec::new();
        for agent in store.list_agents().await? {
            if agent.status == AgentStatus::Active && agent_serials.contains(agent.serial.as_str())
            {
                on_old.push(agent.spiffe_id);
            }
        }
        let mut unacked = BTreeSet::new();
        for revocation in store.list_revocations(1000).await? {
            if revocation.kind == "ca" && revocation.target == slot {
                for ack in store.revocation_acks(&revocation.id).await? {
                    if ack.acked_at.is_none() {
                        unacked.insert(ack.agent_id);
                    }
                }
            }
        }
        let mut problems = Vec::new();
        if workloads > 0 {
            problems.push(format!(
                "{workloads} unexpired SVIDs it signed are not revoked (run `mayflyd ca taint` first)"
            ));
        }
        if !on_old.is_empty() {
            problems.push(format!(
                "agents still on an SVID it signed: {}",
                on_old.join(", ")
            ));
        }
        if !unacked.is_empty() {
            problems.push(format!(
                "agents that have not acknowledged its taint: {}",
                unacked.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        if !problems.is_empty() {
            let why = format!("CA {slot} is still depended on: {}", problems.join("; "));
            self.audit
                .note(Event::new(actor, "ca.revoke", &slot).failed(why.clone()));
            return Err(RevokeError::Failed(why));
        }
        self.registry
            .ca()
            .remove(&slot, self.registry.now())
            .await
            .map_err(|e| RevokeError::Failed(e.to_string()))?;
        self.audit
            .record(Event::new(actor, "ca.revoke", &slot).reason("removed from the bundle"))
            .await
            .map_err(|e| RevokeError::Failed(e.to_string()))?;
        Ok(slot)
    }
}
