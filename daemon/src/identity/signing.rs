//! Signing decisions: the agent's own SVID, batches of workload CSRs for entries the
//! agent serves, and JWT-SVIDs.

use super::*;
use crate::policy::{Access, AccessContext, Action, Principal, Resource, Source};

impl Registry {
    pub(super) fn sign_agent(
        &self,
        spiffe_id: &SpiffeId,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<AgentSvid, IdentityError> {
        let authorities = self.ca.current();
        let issued = authorities
            .x509
            .sign_svid(
                csr,
                &SvidRequest {
                    spiffe_id: spiffe_id.as_str(),
                    dns_names: &[],
                    ip_addresses: &[],
                    ttl: self.agent_ttl,
                },
                now,
            )
            .map_err(|source| IdentityError::Csr {
                entry: "agent".into(),
                source,
            })?;
        Ok(AgentSvid {
            spiffe_id: spiffe_id.clone(),
            chain: vec![issued.cert_der.clone()],
            serial: issued.serial_hex.clone(),
            expires_at: issued.not_after,
        })
    }

    // ----- workload SVIDs -----

    /// Signs each CSR for its entry. The whole batch is refused if any entry is not the
    /// caller's or any CSR is unacceptable, so a caller never gets a partial answer.
    pub fn sign_batch(
        &self,
        agent: &str,
        csrs: &[(String, Vec<u8>)],
    ) -> Result<Vec<SignedSvid>, IdentityError> {
        if csrs.len() > self.max_batch {
            return Err(IdentityError::BatchTooLarge {
                max: self.max_batch,
                got: csrs.len(),
            });
        }
        let index = self.entries.borrow().clone();
        let authorities = self.ca.current();
        let now = self.now();
        let mut out = Vec::with_capacity(csrs.len());
        for (entry_id, csr) in csrs {
            let entry = index
                .get(entry_id)
                .ok_or_else(|| IdentityError::EntryNotFound(entry_id.clone()))?;
            if entry.parent_id != agent {
                return Err(IdentityError::EntryNotYours {
                    entry: entry_id.clone(),
                    agent: agent.to_string(),
                });
            }
            let ttl = capped(
                entry,
                match entry.x509_svid_ttl {
                    t if t > 0 => Duration::from_secs(t as u64),
                    _ => self.default_x509_ttl,
                },
                now,
            )?;
            self.authorize_for(
                agent,
                entry,
                (Action::SignX509Svid, "SignSvids", "svid.sign"),
                Resource::Entry(crate::policy::entry_facts(entry)),
                ttl,
                || format!("X509-SVID for entry {entry_id} ({})", entry.spiffe_id),
            )?;
            let issued = authorities
                .x509
                .sign_svid(
                    csr,
                    &SvidRequest {
                        spiffe_id: &entry.spiffe_id,
                        dns_names: &entry.dns_names,
                        ip_addresses: &[],
                        ttl,
                    },
                    now,
                )
                .map_err(|source| IdentityError::Csr {
                    entry: entry_id.clone(),
                    source,
                })?;
            out.push(SignedSvid {
                entry_id: entry.id.clone(),
                spiffe_id: entry.spiffe_id.clone(),
                chain: vec![issued.cert_der.clone()],
                issued,
            });
        }
        Ok(out)
    }

    /// Mints a JWT-SVID for one of the caller's entries.
    pub fn mint_jwt(
        &self,
        agent: &str,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, String, i64), IdentityError> {
        if audience.is_empty() || audience.iter().any(|a| a.is_empty()) {
            return Err(invalid(
                "audience",
                "at least one non-empty audience is required",
            ));
        }
        let index = self.entries.borrow().clone();
        let entry = index
            .get(entry_id)
            .ok_or_else(|| IdentityError::EntryNotFound(entry_id.to_string()))?;
        if entry.parent_id != agent {
            return Err(IdentityError::EntryNotYours {
                entry: entry_id.to_string(),
                agent: agent.to_string(),
            });
        }
        let ttl = capped(
            entry,
            match entry.jwt_svid_ttl {
                t if t > 0 => Duration::from_secs(t as u64),
                _ => self.default_jwt_ttl,
            },
            self.now(),
        )?;
        for aud in audience {
            self.authorize_for(
                agent,
                entry,
                (Action::MintJwtSvid, "MintJwtSvid", "jwt.mint"),
                Resource::Audience(aud),
                ttl,
                || format!("JWT-SVID for {} with audience {aud}", entry.spiffe_id),
            )?;
        }
        let now = self.now();
        let token = self
            .ca
            .current()
            .jwt
            .sign(&entry.spiffe_id, audience, ttl, now)
            .map_err(IdentityError::Signing)?;
        Ok((
            entry.spiffe_id.clone(),
            token,
            unix(now) + ttl.as_secs() as i64,
        ))
    }

    /// The policies' decision on `entry`'s workload getting `resource` through `agent`,
    /// for `ttl`; `(action, node API method, audit action)`. A denial names `what`.
    fn authorize_for(
        &self,
        agent: &str,
        entry: &EntryRecord,
        (action, method, audit_action): (Action, &str, &str),
        resource: Resource<'_>,
        ttl: Duration,
        what: impl FnOnce() -> String,
    ) -> Result<(), IdentityError> {
        let access = Access {
            principal: Principal::Workload {
                spiffe_id: &entry.spiffe_id,
            },
            action,
            resource,
            context: AccessContext {
                node: agent,
                selectors: &entry.selectors,
                ttl_seconds: ttl.as_secs() as i64,
                source: Source::NodeApi,
                method,
                elevation: None,
            },
        };
        self.policy
            .authorize(&access, audit_action)
            .map(|_| ())
            .map_err(|denied| IdentityError::PolicyDenied {
                what: what(),
                reason: denied.reason,
            })
    }
}

/// `ttl`, cut so that nothing signed for `entry` outlives its expiry; an expired entry
/// signs nothing.
fn capped(
    entry: &EntryRecord,
    ttl: Duration,
    now: std::time::SystemTime,
) -> Result<Duration, IdentityError> {
    if entry.expires_at <= 0 {
        return Ok(ttl);
    }
    let left = entry.expires_at - unix(now);
    if left <= 0 {
        return Err(IdentityError::EntryNotFound(format!(
            "{} (it expired at {})",
            entry.id, entry.expires_at
        )));
    }
    Ok(ttl.min(Duration::from_secs(left as u64)))
}
