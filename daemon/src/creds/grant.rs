//! Issuing and renewing: a lease on record before the backend is asked, the policies'
//! decision before either, and the grant on the audit trail before the agent hears of it.

use std::time::Duration;

use super::*;

impl Broker {
    // ----- issuing -----

    /// Issues credential `name` to `holder`, a workload `agent` serves, for `requested`
    /// (zero: the default). Refused, with an audit record and nothing issued, unless the
    /// definition grants it to `holder` (or an active elevation of `holder` does, until
    /// its end) and `agent` has an entry for `holder`.
    pub async fn issue(
        &self,
        agent: &str,
        holder: &str,
        name: &str,
        requested: Duration,
    ) -> Result<Granted, CredsError> {
        let actor = Actor::Spiffe(agent.to_string());
        let refuse = |why: String| {
            self.audit.note_refusal(
                Event::new(&actor, "credential.issue", name)
                    .scope(format!("for {holder}"))
                    .denied(why.clone()),
            );
            CredsError::Denied(why)
        };
        let loaded = match self.load(name).await {
            Ok(loaded) => loaded,
            Err(CredsError::NotFound(_)) => {
                return Err(refuse(format!("no credential named `{name}`")));
            }
            Err(e) => return Err(e),
        };
        let elevation = self.elevation_for(&loaded.spec, holder).await?;
        let decision = match self.view.credential_decision(
            agent,
            holder,
            &loaded.spec,
            elevation.is_some(),
            requested.as_secs() as i64,
            "IssueCredential",
        ) {
            Ok(decision) => decision,
            Err(CredentialRefusal::Unserved(why)) => return Err(refuse(why)),
            // On the trail already, with the deciding policies.
            Err(CredentialRefusal::Policy(why)) => {
                return Err(CredsError::Denied(format!(
                    "credential {name} for {holder}: {why}"
                )));
            }
        };
        self.issue_lease(
            &loaded,
            &actor,
            agent,
            holder,
            requested,
            elevation.as_ref(),
            &decision,
        )
        .await
    }

    /// Issues the credential of an active elevation to the operator who asked for it (an
    /// elevation of a workload is served through its agent, by `issue`). The elevation's
    /// activation was the decision; the record carries the policy set that made it.
    pub async fn issue_elevated(
        &self,
        elevation: &crate::store::ElevationRecord,
        requested: Duration,
    ) -> Result<Granted, CredsError> {
        let loaded = self.load(&elevation.scope_name).await?;
        let decision = PolicyDecision {
            allowed: true,
            policies: Vec::new(),
            errors: Vec::new(),
            hash: elevation.policy_set.clone(),
            enforce: true,
        };
        let actor = match elevation.requester.strip_prefix("uid:").map(str::parse) {
            Some(Ok(uid)) => Actor::Operator(uid),
            _ => Actor::Spiffe(elevation.requester.clone()),
        };
        self.issue_lease(
            &loaded,
            &actor,
            "",
            &elevation.requester,
            requested,
            Some(elevation),
            &decision,
        )
        .await
    }

    /// The active elevation that lets `holder` have `spec` when its definition does not
    /// grant it.
    async fn elevation_for(
        &self,
        spec: &CredentialSpec,
        holder: &str,
    ) -> Result<Option<crate::store::ElevationRecord>, CredsError> {
        if spec.grants.iter().any(|g| g == holder) {
            return Ok(None);
        }
        Ok(self
            .store
            .active_elevation(holder, "credential", &spec.name, self.now())
            .await?)
    }

    /// Records, issues and audits one lease of a decided grant.
    #[allow(clippy::too_many_arguments)]
    async fn issue_lease(
        &self,
        loaded: &Loaded,
        actor: &Actor,
        agent: &str,
        holder: &str,
        requested: Duration,
        elevation: Option<&crate::store::ElevationRecord>,
        decision: &PolicyDecision,
    ) -> Result<Granted, CredsError> {
        let name = loaded.spec.name.as_str();
        let (ttl, mut notice) = loaded.spec.ttl_for(requested);
        let issued_at = self.now();
        let mut expires_at = issued_at + ttl.as_secs() as i64;
        if let Some(elevation) = elevation {
            let end = elevation.ends_at.unwrap_or(issued_at);
            if end <= issued_at {
                return Err(CredsError::Denied(format!(
                    "elevation {} has ended",
                    elevation.id
                )));
            }
            if end < expires_at {
                expires_at = end;
                notice = Some(format!("cut to the end of elevation {}", elevation.id));
                if !loaded.backend.revocable() && end - issued_at < sts::MIN_TTL.as_secs() as i64 {
                    expires_at = issued_at + sts::MIN_TTL.as_secs() as i64;
                    notice = Some(format!(
                        "STS issues no session shorter than 15 minutes and AWS cannot end one \
                         early: this one outlives elevation {} by {} s",
                        elevation.id,
                        expires_at - end
                    ));
                }
            }
        }
        let id = format!("ls-{}", &uuid::Uuid::new_v4().simple().to_string()[..20]);
        let mut lease = CredentialLease {
            backend_id: loaded.backend.backend_id(&id),
            id,
            credential: name.to_string(),
            holder: holder.to_string(),
            agent_id: agent.to_string(),
            issued_at,
            expires_at,
            state: LeaseState::Issuing,
            revoked_at: None,
            reason: String::new(),
            elevation_id: elevation.map(|e| e.id.clone()).unwrap_or_default(),
        };
        // On record before the backend creates anything.
        self.store.insert_lease(&lease).await?;
        let (issued, expires_at) = match loaded
            .backend
            .issue(
                &lease.backend_id,
                holder,
                issued_at,
                expires_at - issued_at,
                &lease.elevation_id,
            )
            .await
        {
            Ok(issued) => issued,
            Err(e) => {
                // It may have been half created: the sweeper cleans up what exists.
                let _ = self
                    .store
                    .set_lease_state(&lease.id, LeaseState::RevokeFailed, None, &e.to_string())
                    .await;
                self.audit.note(
                    Event::new(actor, "credential.issue", name)
                        .scope(format!("lease {} for {holder}", lease.id))
                        .failed(e.to_string()),
                );
                return Err(e.into());
            }
        };
        let notice = match notice {
            None if expires_at < lease.expires_at => Some(format!(
                "the backend granted {} s, not the {} s asked",
                expires_at - issued_at,
                lease.expires_at - issued_at
            )),
            notice => notice,
        };
        lease.state = LeaseState::Active;
        lease.backend_id = issued.backend_id.clone();
        lease.expires_at = expires_at;
        self.store
            .activate_lease(&lease.id, &lease.backend_id, expires_at)
            .await?;
        self.record_grant(
            "credential.issue",
            actor,
            &lease,
            expires_at - issued_at,
            &notice,
            decision,
        )
        .await?;
        tracing::info!(lease = %lease.id, credential = %name, %holder, ttl_secs = expires_at - issued_at, "credential issued");
        // An elevation grants it to the holder as the definition would, until its end.
        let granted = elevation.is_some() || loaded.spec.grants.iter().any(|g| g == holder);
        let facts = mayfly_proto::v1::CredentialFacts {
            grants: if granted {
                vec![holder.to_string()]
            } else {
                Vec::new()
            },
            sets: loaded.spec.sets.clone(),
            max_ttl_seconds: loaded.spec.max().as_secs() as i64,
        };
        Ok(Granted {
            kind: loaded.spec.kind(),
            lease,
            values: issued.values,
            notice,
            facts,
        })
    }

    /// Extends lease `lease_id`, held by `agent`, for `requested` from now (zero: the
    /// default), up to the definition's max TTL from its issue. Refused, with an audit
    /// record, unless `agent` holds it, still serves its holder and the definition still
    /// grants it; `NotRenewable` when it is revoked, expired, at its max TTL or an STS
    /// session. Returns the lease as extended, when (unix seconds), and a notice when it
    /// got less than asked.
    pub async fn renew(
        &self,
        agent: &str,
        lease_id: &str,
        requested: Duration,
    ) -> Result<(CredentialLease, i64, Option<String>), CredsError> {
        let actor = Actor::Spiffe(agent.to_string());
        let refuse = |what: &str, why: String| {
            self.audit.note_refusal(
                Event::new(&actor, "credential.renew", what)
                    .scope(format!("lease {lease_id}"))
                    .denied(why.clone()),
            );
            CredsError::Denied(why)
        };
        let mut lease = match self.store.get_credential_lease(lease_id).await {
            Ok(lease) => lease,
            Err(StoreError::NotFound { .. }) => {
                return Err(refuse("", format!("no lease with id {lease_id}")));
            }
            Err(e) => return Err(e.into()),
        };
        if lease.agent_id != agent {
            return Err(refuse(
                &lease.credential,
                format!("lease {lease_id} is not held by agent {agent}"),
            ));
        }
        let now = self.now();
        if lease.state != LeaseState::Active || lease.expires_at <= now {
            return Err(CredsError::NotRenewable(format!(
                "lease {lease_id} is {}",
                if lease.state == LeaseState::Active {
                    "expired"
                } else {
                    lease.state.as_str()
                }
            )));
        }
        let loaded = self.load(&lease.credential).await?;
        let holder = lease.holder.clone();
        // A lease of an elevation lasts no longer than it, and not past its end.
        let elevation_end = if lease.elevation_id.is_empty() {
            None
        } else {
            let elevation = self.store.get_elevation(&lease.elevation_id).await?;
            match elevation.ends_at {
                Some(end) if elevation.state() == crate::store::ElevationState::Active => Some(end),
                _ => {
                    return Err(CredsError::NotRenewable(format!(
                        "lease {lease_id} was issued under elevation {}, which is {}",
                        elevation.id,
                        elevation.state()
                    )));
                }
            }
        };
        let decision = match self.view.credential_decision(
            agent,
            &holder,
            &loaded.spec,
            elevation_end.is_some(),
            requested.as_secs() as i64,
            "RenewCredential",
        ) {
            Ok(decision) => decision,
            Err(CredentialRefusal::Unserved(why)) => return Err(refuse(&lease.credential, why)),
            Err(CredentialRefusal::Policy(why)) => {
                return Err(CredsError::Denied(format!(
                    "credential {} for {holder}: {why}",
                    lease.credential
                )));
            }
        };
        let (ttl, _) = loaded.spec.ttl_for(requested);
        let wanted = now + ttl.as_secs() as i64;
        let cap = (lease.issued_at + loaded.spec.max().as_secs() as i64)
            .min(elevation_end.unwrap_or(i64::MAX));
        let target = wanted.min(cap);
        if target <= lease.expires_at {
            // Never shortened: OpenBao would cut a lease renewed with less than it has.
            return Err(CredsError::NotRenewable(if cap <= lease.expires_at {
                format!(
                    "lease {lease_id} has reached the max TTL of credential {} ({})",
                    lease.credential,
                    humantime::format_duration(loaded.spec.max())
                )
            } else {
                format!(
                    "lease {lease_id} already lasts longer than the {} asked",
                    humantime::format_duration(ttl)
                )
            }));
        }
        let Some(expires_at) = loaded
            .backend
            .extend(&lease.backend_id, now, target)
            .await?
        else {
            return Err(CredsError::NotRenewable(format!(
                "lease {lease_id} is an STS session, which cannot be extended"
            )));
        };
        // The backend may grant less (Vault's role max); never record less than before.
        let expires_at = expires_at.max(lease.expires_at);
        if !self.store.extend_lease(lease_id, expires_at, now).await? {
            return Err(CredsError::NotRenewable(format!(
                "lease {lease_id} was revoked meanwhile"
            )));
        }
        let notice = (expires_at < wanted).then(|| {
            format!(
                "extended {} s, not the {} s asked: {}",
                expires_at - now,
                wanted - now,
                if elevation_end == Some(target) {
                    "the end of its elevation"
                } else if target < wanted {
                    "the credential's max TTL"
                } else {
                    "the backend's limit"
                }
            )
        });
        self.record_grant(
            "credential.renew",
            &actor,
            &lease,
            expires_at - now,
            &notice,
            &decision,
        )
        .await?;
        tracing::info!(lease = %lease_id, credential = %lease.credential, %holder, ttl_secs = expires_at - now, "lease renewed");
        lease.expires_at = expires_at;
        Ok((lease, now, notice))
    }

    /// The audit record of a grant (`action`: an issue or a renewal) of `ttl_secs`,
    /// committed before the agent hears of it.
    async fn record_grant(
        &self,
        action: &str,
        actor: &Actor,
        lease: &CredentialLease,
        ttl_secs: i64,
        notice: &Option<String>,
        decision: &PolicyDecision,
    ) -> Result<(), CredsError> {
        let mut event = Event::new(actor, action, &lease.credential)
            .scope(format!(
                "lease {} for {} as {}",
                lease.id, lease.holder, lease.backend_id
            ))
            .ttl_secs(ttl_secs)
            .detail(if lease.elevation_id.is_empty() {
                serde_json::json!({
                    "policy_set": decision.hash,
                    "deciding": decision.policies,
                })
            } else {
                serde_json::json!({
                    "policy_set": decision.hash,
                    "deciding": decision.policies,
                    "elevation": lease.elevation_id,
                })
            });
        if let Some(notice) = notice {
            event = event.reason(notice.clone());
        }
        self.audit
            .record(event)
            .await
            .map(|_| ())
            .map_err(|e| CredsError::Internal(e.to_string()))
    }
}
