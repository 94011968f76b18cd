//! What a revocation covers: the target resolved from the store into the entries, serials,
//! secrets and agents it reaches, so it works on entries another daemon made.

use super::*;

impl Revoker {
    /// What revoking `target` covers, from the store; changes nothing (but a secret's
    /// replacement rotations, which must succeed before its old value can be revoked).
    pub(super) async fn resolve(
        &self,
        target: &Target,
        reason: &str,
        actor: &Actor,
    ) -> Result<Plan, RevokeError> {
        let now_s = unix(self.registry.now());
        let store = self.registry.store();
        let mut scope = Scope::default();
        let mut serials: Vec<RevokedSerialRecord> = Vec::new();
        let mut agents: BTreeSet<String> = BTreeSet::new();
        let mut ban: Option<String> = None;
        match target {
            Target::Svid { serial } => {
                let issued = store.issued_svid(serial).await?.ok_or_else(|| {
                    RevokeError::NotFound(format!(
                        "serial {serial} was not issued by this trust domain's daemon, or it \
                         expired and has been forgotten"
                    ))
                })?;
                if issued.not_after <= now_s {
                    return Err(RevokeError::Invalid(format!(
                        "serial {serial} ({}) already expired; nothing to revoke",
                        issued.spiffe_id
                    )));
                }
                if issued.entry_id.is_empty() {
                    return Err(RevokeError::Invalid(format!(
                        "serial {serial} is agent {}'s own SVID: revoke the agent with \
                         `mayflyd revoke agent --id {}`",
                        issued.agent_id, issued.agent_id
                    )));
                }
                // The entry's current parent holds it; if the entry moved, the old one may too.
                agents.insert(issued.agent_id.clone());
                if let Ok(entry) = self.registry.get_entry(&issued.entry_id).await {
                    agents.insert(entry.parent_id);
                }
                scope.notes.push(format!(
                    "the entry stays: agents get a fresh SVID for {} under a new key",
                    issued.spiffe_id
                ));
                serials.push(RevokedSerialRecord {
                    serial: issued.serial,
                    not_after: issued.not_after,
                });
            }
            Target::Entry { .. } | Target::Selector { .. } => {
                // From the store, not this daemon's index: another daemon sharing the
                // store may have made the entries.
                let (filter, wanted, none) = match target {
                    Target::Entry { spiffe_id } => (
                        EntryFilter {
                            spiffe_id: Some(spiffe_id.to_string()),
                            ..EntryFilter::default()
                        },
                        None,
                        format!("no entry gives {spiffe_id}; `mayflyd entry list` shows them"),
                    ),
                    Target::Selector { selector } => (
                        EntryFilter::default(),
                        Some(selector.to_string()),
                        format!("no entry has the selector {selector}"),
                    ),
                    _ => unreachable!("matched above"),
                };
                let entries: Vec<_> = self
                    .registry
                    .list_entries(&filter)
                    .await?
                    .into_iter()
                    .filter(|e| wanted.as_ref().is_none_or(|w| e.selectors.contains(w)))
                    .collect();
                if entries.is_empty() {
                    return Err(RevokeError::NotFound(none));
                }
                self.cover_entries(&entries, &mut scope, &mut agents, &mut serials, now_s)
                    .await?;
                // What those identities hold through those agents goes too.
                let served: BTreeSet<(&str, &str)> = entries
                    .iter()
                    .map(|e| (e.spiffe_id.as_str(), e.parent_id.as_str()))
                    .collect();
                let live = self
                    .broker
                    .leases(&crate::store::LeaseFilter::default())
                    .await?
                    .into_iter()
                    .filter(|l| served.contains(&(l.holder.as_str(), l.agent_id.as_str())))
                    .collect();
                self.cover_leases(live, reason, actor, &mut scope, &mut agents)
                    .await;
            }
            Target::Agent { spiffe_id } => {
                let agent = store.get_agent(spiffe_id.as_str()).await?.ok_or_else(|| {
                    RevokeError::NotFound(format!(
                        "agent {spiffe_id} is not known; `mayflyd agent list` shows them"
                    ))
                })?;
                if agent.status == AgentStatus::Banned {
                    return Err(RevokeError::Invalid(format!(
                        "agent {spiffe_id} is already banned"
                    )));
                }
                for svid in store
                    .live_serials_for_agent(&agent.spiffe_id, now_s)
                    .await?
                {
                    serials.push(RevokedSerialRecord {
                        serial: svid.serial,
                        not_after: svid.not_after,
                    });
                }
                if agent.svid_expires_at > now_s {
                    serials.push(RevokedSerialRecord {
                        serial: agent.serial.clone(),
                        not_after: agent.svid_expires_at,
                    });
                }
                scope.everything = true;
                scope.spiffe_ids = store
                    .entries_for_parent(&agent.spiffe_id)
                    .await?
                    .iter()
                    .map(|e| e.spiffe_id.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                scope.notes.push(format!(
                    "agent {spiffe_id} is banned: it may not attest again"
                ));
                agents.insert(agent.spiffe_id.clone());
                // Every credential it holds for its workloads is revoked at the backend.
                let live = self
                    .broker
                    .leases(&crate::store::LeaseFilter::default())
                    .await?
                    .into_iter()
                    .filter(|l| l.agent_id == agent.spiffe_id)
                    .collect();
                self.cover_leases(live, reason, actor, &mut scope, &mut agents)
                    .await;
                ban = Some(agent.spiffe_id);
            }
            Target::Secret { name } => {
                self.replace_secret(name, &mut scope, &mut agents).await?;
            }
            Target::Lease { id } => {
                // Gone at the backend before the agents are told: they only drop copies.
                let lease = self.broker.lease(id).await?;
                self.broker.revoke_lease(&lease, actor, reason).await?;
                scope.lease_ids.push(lease.id.clone());
                scope.notes.push(format!(
                    "lease {} of {} for {} revoked at the backend ({})",
                    lease.id, lease.credential, lease.holder, lease.backend_id
                ));
                agents.insert(lease.agent_id);
            }
            Target::Credential { name } | Target::Ungranted { name } => {
                let (spec, _, _) = self.broker.describe(name).await?;
                let mut live = self
                    .broker
                    .leases(&crate::store::LeaseFilter {
                        credential: Some(name.clone()),
                        ..Default::default()
                    })
                    .await?;
                if matches!(target, Target::Ungranted { .. }) {
                    live.retain(|l| !spec.grants.contains(&l.holder));
                }
                self.cover_leases(live, reason, actor, &mut scope, &mut agents)
                    .await;
            }
            Target::Unserved { spiffe_id, agent } => {
                let live = self
                    .broker
                    .leases(&crate::store::LeaseFilter {
                        holder: Some(spiffe_id.clone()),
                        ..Default::default()
                    })
                    .await?
                    .into_iter()
                    .filter(|l| l.agent_id == *agent)
                    .collect();
                self.cover_leases(live, reason, actor, &mut scope, &mut agents)
                    .await;
            }
            Target::Elevation { id } => {
                let elevation = store.get_elevation(id).await?;
                match elevation.scope_kind.as_str() {
                    "entry" if !elevation.granted_entry.is_empty() => {
                        // The temporary entry goes, with every SVID signed for it.
                        let entries: Vec<_> = self
                            .registry
                            .get_entry(&elevation.granted_entry)
                            .await
                            .ok()
                            .into_iter()
                            .collect();
                        if !entries.is_empty() {
                            self.cover_entries(
                                &entries,
                                &mut scope,
                                &mut agents,
                                &mut serials,
                                now_s,
                            )
                            .await?;
                        }
                    }
                    "secret" => {
                        // A workload's grant is taken back where nothing else gives it
                        // the secret (another elevation, the definition); then the value it
                        // saw is replaced, so a copy kept is worth nothing.
                        let holder = &elevation.requester;
                        let agent = &elevation.agent_id;
                        if !agent.is_empty()
                            && self
                                .view
                                .grant(agent, &elevation.scope_name)
                                .is_none_or(|g| !g.to.contains(holder))
                        {
                            scope.withdrawn.push(Withdrawn {
                                secret: elevation.scope_name.clone(),
                                agent: agent.clone(),
                                spiffe_ids: vec![holder.clone()],
                            });
                            agents.insert(agent.clone());
                        }
                        if let Err(e) = self
                            .replace_secret(&elevation.scope_name, &mut scope, &mut agents)
                            .await
                        {
                            // Taken back all the same; the value stays until it rotates.
                            scope.notes.push(format!(
                                "secret {} could not be rotated ({e}): the value the elevation \
                                 gave stays valid until its next rotation",
                                elevation.scope_name
                            ));
                        }
                    }
                    _ => {}
                }
                let live = self
                    .broker
                    .leases(&crate::store::LeaseFilter {
                        elevation_id: Some(id.clone()),
                        ..Default::default()
                    })
                    .await?;
                self.cover_leases(live, reason, actor, &mut scope, &mut agents)
                    .await;
                // An operator's leases went to the admin socket, not to an agent: gone
                // at the backend is all there is to it.
                agents.remove("");
            }
        }

        Ok(Plan {
            kind: target.kind().to_string(),
            target: target.text(),
            scope,
            serials,
            agents,
            ban,
        })
    }

    /// Rotates `name` until no value handed out before is valid (one round for a single
    /// user, two for alternating users, whose other user keeps the previous value), and
    /// puts the agents that hold it in the plan, to get the new value with it.
    async fn replace_secret(
        &self,
        name: &str,
        scope: &mut Scope,
        agents: &mut BTreeSet<String>,
    ) -> Result<(), RevokeError> {
        let spec = self.secrets.spec(name).await?;
        // Rotate first: until a new value works on the target, the old one is still the
        // only one, and revoking it would only break the apps.
        let rounds = match spec.strategy {
            Strategy::SingleUser => 1,
            // The other user keeps the previous value valid for zero-downtime rotation; a
            // second rotation gives that user a fresh one too.
            Strategy::AlternatingUsers => 2,
        };
        for round in 0..rounds {
            let outcome = self
                .secrets
                .rotate_now(name, crate::store::TriggerKind::Revoke)
                .await?;
            if outcome.job.state != crate::store::JobState::Promoted {
                return Err(RevokeError::Failed(format!(
                    "the rotation that replaces secret {name} failed ({}); the old value is \
                     still valid",
                    outcome.job.last_error
                )));
            }
            scope.notes.push(format!(
                "rotation {} of {rounds} promoted version {} for user {}",
                round + 1,
                outcome.job.token,
                outcome.job.username
            ));
        }
        scope.secrets.push(name.to_string());
        for agent in self.registry.store().list_agents().await? {
            if agent.status == AgentStatus::Active
                && self.view.grant(&agent.spiffe_id, &spec.name).is_some()
            {
                agents.insert(agent.spiffe_id);
            }
        }
        Ok(())
    }

    pub(super) async fn cover_entries(
        &self,
        entries: &[crate::store::EntryRecord],
        scope: &mut Scope,
        agents: &mut BTreeSet<String>,
        serials: &mut Vec<RevokedSerialRecord>,
        now_s: i64,
    ) -> Result<(), RevokeError> {
        let mut ids = BTreeSet::new();
        let spiffe_ids: HashMap<&str, &str> = entries
            .iter()
            .map(|e| (e.id.as_str(), e.spiffe_id.as_str()))
            .collect();
        for entry in entries {
            scope.entry_ids.push(entry.id.clone());
            ids.insert(entry.spiffe_id.clone());
            agents.insert(entry.parent_id.clone());
            let held = scope.held.entry(entry.parent_id.clone()).or_default();
            held.entry_ids.insert(entry.id.clone());
            held.spiffe_ids.insert(entry.spiffe_id.clone());
        }
        scope.spiffe_ids = ids.into_iter().collect();
        for svid in self
            .registry
            .store()
            .live_serials_for_entries(&scope.entry_ids, now_s)
            .await?
        {
            // An entry that moved between agents: the old parent may still hold an SVID.
            let held = scope.held.entry(svid.agent_id.clone()).or_default();
            held.serials.insert(svid.serial.clone());
            held.entry_ids.insert(svid.entry_id.clone());
            held.spiffe_ids.insert(
                spiffe_ids
                    .get(svid.entry_id.as_str())
                    .map_or_else(|| svid.spiffe_id.clone(), |id| id.to_string()),
            );
            agents.insert(svid.agent_id);
            serials.push(RevokedSerialRecord {
                serial: svid.serial,
                not_after: svid.not_after,
            });
        }
        Ok(())
    }

    /// Revokes `live` at their backends and puts those revoked in the scope; any that
    /// fail stay live, are named in the notes and retried by the sweeper.
    async fn cover_leases(
        &self,
        live: Vec<crate::store::CredentialLease>,
        reason: &str,
        actor: &Actor,
        scope: &mut Scope,
        agents: &mut BTreeSet<String>,
    ) {
        if live.is_empty() {
            return;
        }
        let holders: HashMap<String, String> = live
            .iter()
            .map(|l| (l.id.clone(), l.agent_id.clone()))
            .collect();
        let (_, errors) = self.broker.revoke_many(live, actor, Some(reason)).await;
        let before = scope.lease_ids.len();
        for (id, agent) in holders {
            if !errors.iter().any(|(failed, _)| *failed == id) {
                scope.lease_ids.push(id);
                agents.insert(agent);
            }
        }
        scope.lease_ids.sort();
        scope.notes.push(format!(
            "{} credential leases revoked at the backend",
            scope.lease_ids.len() - before
        ));
        if !errors.is_empty() {
            let failed: Vec<String> = errors.iter().map(|(id, e)| format!("{id}: {e}")).collect();
            // Those revoked stay revoked; the sweeper retries the others.
            scope.notes.push(format!(
                "{} could not be revoked yet and are retried: {}",
                failed.len(),
                failed.join("; ")
            ));
        }
    }
}
