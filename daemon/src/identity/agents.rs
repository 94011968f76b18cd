//! Attested agents: every call authenticated against the store (cached for a second),
//! renewal of the agent SVID, eviction and bans.

use super::*;

impl Registry {
    /// Checks the client certificate of a node API call against the store.
    pub async fn authenticate_agent(
        &self,
        peer: &mayfly_common::tls::PeerIdentity,
    ) -> Result<AgentRecord, IdentityError> {
        self.authenticate(peer, false).await
    }

    /// As [`Self::authenticate_agent`], but a banned agent still holding its last SVID
    /// passes: it may report what it did about its own revocation, nothing else.
    pub async fn authenticate_banned_agent(
        &self,
        peer: &mayfly_common::tls::PeerIdentity,
    ) -> Result<AgentRecord, IdentityError> {
        self.authenticate(peer, true).await
    }

    pub(super) async fn authenticate(
        &self,
        peer: &mayfly_common::tls::PeerIdentity,
        banned_ok: bool,
    ) -> Result<AgentRecord, IdentityError> {
        let id = peer.spiffe_id.as_str();
        let agent = match self.cached_agent(id) {
            Some(agent) => agent,
            None => {
                let agent = self
                    .store
                    .get_agent(id)
                    .await?
                    .ok_or_else(|| IdentityError::UnknownAgent(id.to_string()))?;
                self.agent_cache()
                    .insert(id.to_string(), (agent.clone(), Instant::now()));
                agent
            }
        };
        match agent.status {
            AgentStatus::Active => {}
            AgentStatus::Evicted => return Err(IdentityError::AgentEvicted(id.to_string())),
            AgentStatus::Banned if banned_ok => {}
            AgentStatus::Banned => return Err(IdentityError::AgentBanned(id.to_string())),
        }
        if agent.serial != peer.serial {
            return Err(IdentityError::StaleAgentSvid {
                agent: id.to_string(),
                presented: peer.serial.clone(),
            });
        }
        Ok(agent)
    }

    pub(super) fn agent_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (AgentRecord, Instant)>> {
        self.agent_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn cached_agent(&self, id: &str) -> Option<AgentRecord> {
        let cache = self.agent_cache();
        cache
            .get(id)
            .filter(|(_, at)| at.elapsed() < AGENT_CACHE_TTL)
            .map(|(agent, _)| agent.clone())
    }

    pub(super) fn forget_agent(&self, id: &str) {
        self.agent_cache().remove(id);
    }

    pub async fn renew_agent(
        &self,
        agent: &AgentRecord,
        csr: &[u8],
    ) -> Result<AgentSvid, IdentityError> {
        let spiffe_id = self.member_id("agent", &agent.spiffe_id)?;
        let now = self.now();
        let signed = self.sign_agent(&spiffe_id, csr, now)?;
        self.store
            .update_agent_svid(spiffe_id.as_str(), &signed.serial, signed.expires_at)
            .await?;
        self.forget_agent(spiffe_id.as_str());
        Ok(signed)
    }

    pub async fn set_agent_status(
        &self,
        spiffe_id: &str,
        status: AgentStatus,
        reason: &str,
    ) -> Result<AgentRecord, IdentityError> {
        let id = self.member_id("spiffe_id", spiffe_id)?;
        let record = self
            .store
            .set_agent_status(id.as_str(), status)
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => IdentityError::UnknownAgent(id.to_string()),
                other => other.into(),
            })?;
        self.forget_agent(id.as_str());
        let _ = self.changes.send(Change::AgentEvicted {
            spiffe_id: id.to_string(),
            banned: status == AgentStatus::Banned,
            reason: reason.to_string(),
        });
        if status != AgentStatus::Active {
            self.store
                .announce(&crate::cluster::Notice::Agent {
                    spiffe_id: id.to_string(),
                })
                .await;
        }
        Ok(record)
    }

    /// Takes up another daemon's eviction or ban of `spiffe_id`: its stream here, if it
    /// has one, ends at once.
    pub async fn take_agent_change(&self, spiffe_id: &str) -> Result<(), IdentityError> {
        self.forget_agent(spiffe_id);
        let Some(agent) = self.store.get_agent(spiffe_id).await? else {
            return Ok(());
        };
        self.tell_evicted(&agent);
        Ok(())
    }

    /// Tells the streams here of every agent another daemon evicted or banned that they
    /// have not heard of.
    pub async fn resync_agents(&self) -> Result<(), IdentityError> {
        for agent in self.store.list_agents().await? {
            self.tell_evicted(&agent);
        }
        Ok(())
    }

    fn tell_evicted(&self, agent: &AgentRecord) {
        let mut told = self.told_evicted.lock().unwrap_or_else(|p| p.into_inner());
        if agent.status == AgentStatus::Active {
            told.remove(&agent.spiffe_id);
            return;
        }
        if told.get(&agent.spiffe_id) == Some(&agent.status) {
            return;
        }
        told.insert(agent.spiffe_id.clone(), agent.status);
        self.forget_agent(&agent.spiffe_id);
        let _ = self.changes.send(Change::AgentEvicted {
            spiffe_id: agent.spiffe_id.clone(),
            banned: agent.status == AgentStatus::Banned,
            reason: "evicted through another daemon".into(),
        });
    }
}
