//! Join tokens and node attestation: single-use tokens stored by hash, and an agent's
//! first SVID in exchange for one.

use super::*;

impl Registry {
    pub async fn generate_join_token(
        &self,
        spiffe_id: &str,
        ttl: Option<Duration>,
    ) -> Result<IssuedJoinToken, IdentityError> {
        let spiffe_id = self.workload_id("spiffe_id", spiffe_id)?;
        // An agent may not attest as an identity entries give workloads.
        let given = self
            .store
            .list_entries(&EntryFilter {
                spiffe_id: Some(spiffe_id.to_string()),
                ..EntryFilter::default()
            })
            .await?;
        if !given.is_empty() {
            return Err(invalid(
                "spiffe_id",
                format!(
                    "{spiffe_id} is a workload's identity ({} entries give it); an agent needs \
                     its own, e.g. spiffe://{}/node/<host>",
                    given.len(),
                    self.trust_domain
                ),
            ));
        }
        let ttl = ttl.unwrap_or(self.join_token_ttl);
        if ttl.is_zero() || ttl > Duration::from_secs(30 * 24 * 3600) {
            return Err(invalid("ttl", "a join token lives between 1 s and 30 days"));
        }
        let mut raw = [0u8; 32];
        rand::fill(&mut raw);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let now = unix(self.now());
        let expires_at = now + ttl.as_secs() as i64;
        self.store
            .create_join_token(&token_hash(&token), spiffe_id.as_str(), expires_at, now)
            .await?;
        Ok(IssuedJoinToken {
            token,
            spiffe_id,
            expires_at,
        })
    }

    /// Trades a join token and a CSR for the agent's SVID. Nothing is written unless the
    /// token is valid and the CSR is acceptable.
    pub async fn attest(&self, token: &str, csr: &[u8]) -> Result<AgentSvid, IdentityError> {
        let hash = token_hash(token);
        let now = self.now();
        let pending = self.store.get_join_token(&hash, unix(now)).await?;
        let spiffe_id = self.member_id("join token", &pending.spiffe_id)?;
        if let Some(existing) = self.store.get_agent(spiffe_id.as_str()).await?
            && existing.status == AgentStatus::Banned
        {
            return Err(IdentityError::AgentBanned(spiffe_id.to_string()));
        }
        let signed = self.sign_agent(&spiffe_id, csr, now)?;
        let token_record = self.store.consume_join_token(&hash, unix(now)).await?;
        self.store
            .upsert_attested_agent(&AgentRecord {
                spiffe_id: spiffe_id.to_string(),
                serial: signed.serial.clone(),
                status: AgentStatus::Active,
                attested_at: unix(now),
                svid_expires_at: signed.expires_at,
                last_seen: unix(now),
                token_hash: token_record.hash,
            })
            .await?;
        self.forget_agent(spiffe_id.as_str());
        tracing::info!(agent = %spiffe_id, serial = %signed.serial, "agent attested");
        Ok(signed)
    }
}
