//! The admin API behind the operator subcommands, served on a Unix socket (mode 0600).
//! Callers are checked by their peer credentials as well as by the socket's mode, once for
//! every method, in `operator`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use mayfly_proto::v1::admin_server::Admin;
use mayfly_proto::v1::{self};

use super::convert;
use operator::Operator;

mod audit;
mod credentials;
pub mod operator;
mod policy;
use crate::audit::{Audit, AuditHead, Event};
use crate::ca::{bundle_jwks, bundle_pem};
use crate::identity::{EntryChange, EntryInput, Registry};
use crate::revoke::{Revoker, Target, report_message};
use crate::secrets::engine::RotationEngine;
use crate::secrets::spec::{SecretSpec, Strategy};
use crate::store::{AgentStatus, EntryFilter, EntryRecord};
use mayfly_common::clock::unix;

pub struct AdminApi {
    registry: Arc<Registry>,
    secrets: Arc<RotationEngine>,
    broker: Arc<crate::creds::Broker>,
    audit: Audit,
    revoker: Arc<Revoker>,
    policy: Arc<crate::policy::PolicyEngine>,
    blast: Option<Arc<crate::blast::BlastRadius>>,
}

impl AdminApi {
    pub fn new(
        registry: Arc<Registry>,
        secrets: Arc<RotationEngine>,
        broker: Arc<crate::creds::Broker>,
        audit: Audit,
        revoker: Arc<Revoker>,
        policy: Arc<crate::policy::PolicyEngine>,
    ) -> Self {
        Self {
            registry,
            secrets,
            broker,
            audit,
            revoker,
            policy,
            blast: None,
        }
    }

    /// Answers `BlastRadius` with `blast`.
    pub fn with_blast_radius(mut self, blast: Arc<crate::blast::BlastRadius>) -> Self {
        self.blast = Some(blast);
        self
    }

    /// Every CA slot, as the CA subcommands print them.
    async fn ca_slots(&self) -> Result<Response<v1::ShowCaResponse>, Status> {
        let slots = self.registry.ca().slots().await?;
        Ok(Response::new(v1::ShowCaResponse {
            slots: slots.iter().map(convert::ca_slot).collect(),
        }))
    }

    /// Records an operator's change, waiting for the commit so that what the operator is
    /// told has happened is on the record.
    async fn record(&self, event: Event) -> Result<(), Status> {
        self.audit.record(event).await.map(|_| ()).map_err(|e| {
            tracing::error!(error = %e, "admin change not recorded in the audit log");
            Status::unavailable("the change was made but could not be recorded in the audit log; see the daemon's log")
        })
    }

    /// Evicts or bans an agent; its sync stream hears of it at once.
    async fn cut_off(
        &self,
        request: Request<v1::AgentRequest>,
        status: AgentStatus,
    ) -> Result<Response<v1::Agent>, Status> {
        let op = Operator::of(&request)?;
        let body = request.into_inner();
        non_empty("spiffe_id", &body.spiffe_id)?;
        let record = self
            .registry
            .set_agent_status(&body.spiffe_id, status, &body.reason)
            .await?;
        tracing::warn!(uid = op.uid, agent = %record.spiffe_id, status = %status, reason = %body.reason, "agent cut off");
        let action = if status == AgentStatus::Banned {
            "agent.ban"
        } else {
            "agent.evict"
        };
        self.record(op.event(action, &record.spiffe_id).reason(&body.reason))
            .await?;
        Ok(Response::new(convert::agent(&record)))
    }

    async fn summary(&self, name: &str) -> Result<v1::SecretSummary, Status> {
        let spec = self.secrets.spec(name).await?;
        let record = self.secrets.record(name).await?;
        Ok(v1::SecretSummary {
            name: spec.name.clone(),
            store: spec.store_kind().into(),
            target: spec.target_kind().into(),
            strategy: match spec.strategy {
                Strategy::SingleUser => "single-user".into(),
                Strategy::AlternatingUsers => "alternating-users".into(),
            },
            schedule: spec.schedule.clone(),
            source: record.source,
            next_run_at: record.next_run_at.unwrap_or(0),
            last_run_at: record.last_run_at.unwrap_or(0),
            last_outcome: record.last_outcome,
            grants: spec.grants.clone(),
        })
    }
}

/// A revocation's `wait_ms`: 0 for the default.
fn wait_of(wait_ms: i64) -> Result<Option<Duration>, Status> {
    if wait_ms < 0 {
        return Err(Status::invalid_argument("wait_ms must not be negative"));
    }
    Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms as u64)))
}

/// The audit record of an entry made by `op`.
fn entry_created(op: &Operator, record: &EntryRecord) -> Event {
    op.event("entry.create", &record.spiffe_id)
        .scope(format!(
            "entry {} parent {} selectors {}",
            record.id,
            record.parent_id,
            record.selectors.join(",")
        ))
        .ttl_secs(record.x509_svid_ttl)
}

/// What an operator asked for an entry, as the registry checks it.
fn entry_input(body: v1::CreateEntryRequest) -> EntryInput {
    EntryInput {
        spiffe_id: body.spiffe_id,
        parent_id: body.parent_id,
        selectors: body.selectors,
        x509_svid_ttl: body.x509_svid_ttl,
        jwt_svid_ttl: body.jwt_svid_ttl,
        dns_names: body.dns_names,
        hint: body.hint,
        sets: body.sets,
        expires_at: 0,
    }
}

fn non_empty(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_entry(
        &self,
        request: Request<v1::CreateEntryRequest>,
    ) -> Result<Response<v1::Entry>, Status> {
        let op = Operator::of(&request)?;
        let body = request.into_inner();
        non_empty("spiffe_id", &body.spiffe_id)?;
        non_empty("parent_id", &body.parent_id)?;
        let record = self.registry.create_entry(entry_input(body)).await?;
        tracing::info!(uid = op.uid, entry = %record.id, spiffe_id = %record.spiffe_id, "entry created");
        self.record(entry_created(&op, &record)).await?;
        Ok(Response::new(convert::entry(&record)))
    }

    async fn batch_create_entry(
        &self,
        request: Request<v1::BatchCreateEntryRequest>,
    ) -> Result<Response<v1::BatchCreateEntryResponse>, Status> {
        let op = Operator::of(&request)?;
        let inputs = request
            .into_inner()
            .entries
            .into_iter()
            .map(entry_input)
            .collect();
        let outcomes = self.registry.create_entries(inputs).await?;
        let mut events = Vec::new();
        let results = outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Ok(record) => {
                    events.push(entry_created(&op, &record));
                    v1::BatchCreateEntryResult {
                        entry: Some(convert::entry(&record)),
                        code: 0,
                        message: String::new(),
                    }
                }
                Err(refused) => {
                    let status = Status::from(refused);
                    v1::BatchCreateEntryResult {
                        entry: None,
                        code: status.code() as i32,
                        message: status.message().to_string(),
                    }
                }
            })
            .collect();
        tracing::info!(uid = op.uid, created = events.len(), "entries created");
        self.audit.record_all(events).await.map_err(|e| {
            tracing::error!(error = %e, "admin change not recorded in the audit log");
            Status::unavailable(
                "the entries were created but could not be recorded in the audit log; see the daemon's log",
            )
        })?;
        Ok(Response::new(v1::BatchCreateEntryResponse { results }))
    }

    async fn list_entries(
        &self,
        request: Request<v1::ListEntriesRequest>,
    ) -> Result<Response<v1::ListEntriesResponse>, Status> {
        Operator::of(&request)?;
        let body = request.into_inner();
        let filter = EntryFilter {
            parent_id: Some(body.parent_id).filter(|s| !s.is_empty()),
            spiffe_id: Some(body.spiffe_id).filter(|s| !s.is_empty()),
        };
        let entries = self.registry.list_entries(&filter).await?;
        Ok(Response::new(v1::ListEntriesResponse {
            entries: entries.iter().map(convert::entry).collect(),
        }))
    }

    async fn get_entry(
        &self,
        request: Request<v1::GetEntryRequest>,
    ) -> Result<Response<v1::Entry>, Status> {
        Operator::of(&request)?;
        let id = request.into_inner().id;
        non_empty("id", &id)?;
        Ok(Response::new(convert::entry(
            &self.registry.get_entry(&id).await?,
        )))
    }

    async fn update_entry(
        &self,
        request: Request<v1::UpdateEntryRequest>,
    ) -> Result<Response<v1::Entry>, Status> {
        let op = Operator::of(&request)?;
        let body = request.into_inner();
        non_empty("id", &body.id)?;
        let record = self
            .registry
            .update_entry(
                &body.id,
                EntryChange {
                    spiffe_id: body.spiffe_id,
                    parent_id: body.parent_id,
                    selectors: Some(body.selectors).filter(|s| !s.is_empty()),
                    x509_svid_ttl: body.x509_svid_ttl,
                    jwt_svid_ttl: body.jwt_svid_ttl,
                    dns_names: body.dns_names.map(|d| d.names),
                    hint: body.hint,
                    sets: body.sets.map(|s| s.names),
                },
            )
            .await?;
        tracing::info!(uid = op.uid, entry = %record.id, "entry updated");
        self.record(
            op.event("entry.update", &record.spiffe_id)
                .scope(format!(
                    "entry {} parent {} selectors {}",
                    record.id,
                    record.parent_id,
                    record.selectors.join(",")
                ))
                .ttl_secs(record.x509_svid_ttl),
        )
        .await?;
        Ok(Response::new(convert::entry(&record)))
    }

    async fn delete_entry(
        &self,
        request: Request<v1::DeleteEntryRequest>,
    ) -> Result<Response<v1::DeleteEntryResponse>, Status> {
        let op = Operator::of(&request)?;
        let id = request.into_inner().id;
        non_empty("id", &id)?;
        let deleted = self.registry.delete_entry(&id).await?;
        tracing::info!(uid = op.uid, entry = %deleted.id, "entry deleted");
        self.record(
            op.event("entry.delete", &deleted.spiffe_id)
                .scope(format!("entry {}", deleted.id)),
        )
        .await?;
        self.revoke_unserved(&deleted, &op).await?;
        Ok(Response::new(v1::DeleteEntryResponse { id: deleted.id }))
    }

    async fn generate_join_token(
        &self,
        request: Request<v1::GenerateJoinTokenRequest>,
    ) -> Result<Response<v1::GenerateJoinTokenResponse>, Status> {
        let op = Operator::of(&request)?;
        let body = request.into_inner();
        non_empty("spiffe_id", &body.spiffe_id)?;
        if body.ttl < 0 {
            return Err(Status::invalid_argument("ttl must not be negative"));
        }
        let ttl = (body.ttl > 0).then(|| Duration::from_secs(body.ttl as u64));
        let issued = self
            .registry
            .generate_join_token(&body.spiffe_id, ttl)
            .await?;
        tracing::info!(uid = op.uid, spiffe_id = %issued.spiffe_id, expires_at = issued.expires_at, "join token generated");
        let hash = crate::identity::token_hash(&issued.token);
        self.record(
            Event::new(&op.actor(), "token.create", issued.spiffe_id.as_str())
                .scope(format!("join token sha256:{}", &hash[..12]))
                .ttl_secs(issued.expires_at - unix(self.registry.now())),
        )
        .await?;
        Ok(Response::new(v1::GenerateJoinTokenResponse {
            token: issued.token,
            spiffe_id: issued.spiffe_id.to_string(),
            expires_at: issued.expires_at,
        }))
    }

    async fn list_agents(
        &self,
        request: Request<v1::ListAgentsRequest>,
    ) -> Result<Response<v1::ListAgentsResponse>, Status> {
        Operator::of(&request)?;
        let agents = self
            .registry
            .store()
            .list_agents()
            .await
            .map_err(|e| super::status::store_status(&e))?;
        Ok(Response::new(v1::ListAgentsResponse {
            agents: agents.iter().map(convert::agent).collect(),
        }))
    }

    async fn evict_agent(
        &self,
        request: Request<v1::AgentRequest>,
    ) -> Result<Response<v1::Agent>, Status> {
        self.cut_off(request, AgentStatus::Evicted).await
    }

    async fn ban_agent(
        &self,
        request: Request<v1::AgentRequest>,
    ) -> Result<Response<v1::Agent>, Status> {
        self.cut_off(request, AgentStatus::Banned).await
    }

    async fn get_bundle(
        &self,
        request: Request<v1::GetBundleRequest>,
    ) -> Result<Response<v1::GetBundleResponse>, Status> {
        Operator::of(&request)?;
        let current = self.registry.ca().current();
        let snapshot = &current.bundle;
        let jwks = bundle_jwks(
            &snapshot.x509_authorities,
            &snapshot.jwt_keys,
            snapshot.sequence,
            300,
        );
        Ok(Response::new(v1::GetBundleResponse {
            bundle: Some(convert::bundle(
                self.registry.trust_domain().as_str(),
                snapshot,
                300,
            )),
            pem: bundle_pem(&snapshot.x509_authorities),
            jwks: serde_json::to_string_pretty(&jwks)
                .map_err(|e| Status::internal(format!("bundle encoding: {e}")))?,
        }))
    }

    async fn show_ca(
        &self,
        request: Request<v1::ShowCaRequest>,
    ) -> Result<Response<v1::ShowCaResponse>, Status> {
        Operator::of(&request)?;
        self.ca_slots().await
    }

    async fn prepare_ca(
        &self,
        request: Request<v1::PrepareCaRequest>,
    ) -> Result<Response<v1::ShowCaResponse>, Status> {
        let op = Operator::of(&request)?;
        let slot = self.registry.ca().prepare(self.registry.now()).await?;
        tracing::info!(uid = op.uid, slot = %slot.id, "CA prepared by operator");
        self.record(op.event("ca.prepare", &slot.id)).await?;
        self.ca_slots().await
    }

    async fn activate_ca(
        &self,
        request: Request<v1::ActivateCaRequest>,
    ) -> Result<Response<v1::ShowCaResponse>, Status> {
        let op = Operator::of(&request)?;
        let slot = self.registry.ca().activate(self.registry.now()).await?;
        tracing::info!(uid = op.uid, slot = %slot.id, at = unix(self.registry.now()), "CA activated by operator");
        self.record(op.event("ca.activate", &slot.id)).await?;
        self.ca_slots().await
    }

    async fn taint_ca(
        &self,
        request: Request<v1::TaintCaRequest>,
    ) -> Result<Response<v1::RevocationReport>, Status> {
        let op = Operator::of(&request)?;
        let body = request.into_inner();
        let wait = wait_of(body.wait_ms)?;
        let report = self
            .revoker
            .taint_ca(&body.reason, &op.actor(), wait)
            .await
            .map_err(super::status::revoke_status)?;
        Ok(Response::new(report_message(&report)))
    }

    async fn revoke_ca(
        &self,
        request: Request<v1::RevokeCaRequest>,
    ) -> Result<Response<v1::ShowCaResponse>, Status> {
        let op = Operator::of(&request)?;
        let slot = request.into_inner().slot_id;
        let removed = self
            .revoker
            .revoke_ca(Some(slot.as_str()), &op.actor())
            .await
            .map_err(super::status::revoke_status)?;
        tracing::warn!(uid = op.uid, slot = %removed, "CA revoked by operator");
        self.ca_slots().await
    }

    async fn create_secret(
        &self,
        request: Request<v1::CreateSecretRequest>,
    ) -> Result<Response<v1::SecretSummary>, Status> {
        let op = Operator::of(&request)?;
        let body = request.into_inner();
        let spec = SecretSpec::from_toml(&body.definition)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = spec.name.clone();
        let current = if body.current_value.is_empty() {
            None
        } else {
            if !matches!(spec.store, crate::secrets::spec::StoreSpec::Local) {
                return Err(Status::invalid_argument(format!(
                    "secret {name}: a current value is imported into a local store only; a \
                     Vault or AWS secret's value is adopted where it lives, at the first rotation"
                )));
            }
            let value = String::from_utf8(body.current_value).map_err(|_| {
                Status::invalid_argument(format!("secret {name}: the current value is not UTF-8"))
            })?;
            Some(crate::secrets::Credential {
                username: spec.users.first().cloned().unwrap_or_default(),
                password: crate::secrets::SecretValue::new(value),
            })
        };
        self.secrets.create(spec).await?;
        tracing::info!(uid = op.uid, secret = %name, "secret defined");
        self.record(op.event("secret.create", &name)).await?;
        if let Some(current) = current
            && let Err(e) = self.secrets.import_current(&name, &current).await
        {
            // Nothing stays half made: the definition goes with the failed import.
            let _ = self.secrets.delete(&name).await;
            return Err(e.into());
        }
        Ok(Response::new(self.summary(&name).await?))
    }

    async fn list_secrets(
        &self,
        request: Request<v1::ListSecretsRequest>,
    ) -> Result<Response<v1::ListSecretsResponse>, Status> {
        Operator::of(&request)?;
        let mut secrets = Vec::new();
        for spec in self.secrets.specs().iter() {
            secrets.push(self.summary(&spec.name).await?);
        }
        Ok(Response::new(v1::ListSecretsResponse { secrets }))
    }

    async fn get_secret_status(
        &self,
        request: Request<v1::SecretRequest>,
    ) -> Result<Response<v1::SecretStatus>, Status> {
        Operator::of(&request)?;
        let name = request.into_inner().name;
        let secret = self.summary(&name).await?;
        let versions = self
            .secrets
            .versions(&name)
            .await?
            .into_iter()
            .map(|v| v1::SecretVersion {
                id: v.id,
                stages: v.stages,
                created_at: v.created_at.unwrap_or(0),
            })
            .collect();
        let jobs = self
            .secrets
            .jobs(&name, 20)
            .await?
            .iter()
            .map(convert::job)
            .collect();
        Ok(Response::new(v1::SecretStatus {
            secret: Some(secret),
            versions,
            jobs,
        }))
    }

    async fn delete_secret(
        &self,
        request: Request<v1::SecretRequest>,
    ) -> Result<Response<v1::SecretSummary>, Status> {
        let op = Operator::of(&request)?;
        let name = request.into_inner().name;
        let summary = self.summary(&name).await?;
        if summary.source == "config" {
            return Err(Status::failed_precondition(format!(
                "secret {name} is defined in daemon.toml; remove it there"
            )));
        }
        self.secrets.delete(&name).await?;
        tracing::info!(uid = op.uid, secret = %name, "secret deleted");
        self.record(op.event("secret.delete", &name)).await?;
        Ok(Response::new(summary))
    }

    async fn rotate_secret(
        &self,
        request: Request<v1::SecretRequest>,
    ) -> Result<Response<v1::RotationOutcome>, Status> {
        let op = Operator::of(&request)?;
        let name = request.into_inner().name;
        tracing::info!(uid = op.uid, secret = %name, "rotation requested by operator");
        self.record(op.event("secret.rotate", &name)).await?;
        let outcome = self
            .secrets
            .rotate_now(&name, crate::store::TriggerKind::Manual)
            .await?;
        Ok(Response::new(v1::RotationOutcome {
            job: Some(convert::job(&outcome.job)),
        }))
    }

    async fn get_secret_value(
        &self,
        request: Request<v1::SecretRequest>,
    ) -> Result<Response<v1::SecretValueResponse>, Status> {
        let op = Operator::of(&request)?;
        let name = request.into_inner().name;
        let (version, credential) = self.secrets.current(&name).await?.ok_or_else(|| {
            Status::not_found(format!("secret {name} has no current version yet"))
        })?;
        tracing::warn!(uid = op.uid, secret = %name, version = %version, "secret value read by operator");
        self.record(
            op.event("secret.read", &name)
                .scope(format!("version {version}")),
        )
        .await?;
        Ok(Response::new(v1::SecretValueResponse {
            name,
            version,
            username: credential.username,
            value: credential.password.expose().to_string(),
        }))
    }

    async fn create_credential(
        &self,
        request: Request<v1::CreateCredentialRequest>,
    ) -> Result<Response<v1::CredentialSummary>, Status> {
        let op = Operator::of(&request)?;
        self.define_credential(op, &request.into_inner().definition)
            .await
            .map(Response::new)
    }

    async fn list_credentials(
        &self,
        request: Request<v1::ListCredentialsRequest>,
    ) -> Result<Response<v1::ListCredentialsResponse>, Status> {
        Operator::of(&request)?;
        self.credential_list().await.map(Response::new)
    }

    async fn get_credential(
        &self,
        request: Request<v1::CredentialRequest>,
    ) -> Result<Response<v1::CredentialSummary>, Status> {
        Operator::of(&request)?;
        let name = request.into_inner().name;
        Ok(Response::new(self.credential_summary(&name).await?))
    }

    async fn delete_credential(
        &self,
        request: Request<v1::CredentialRequest>,
    ) -> Result<Response<v1::CredentialSummary>, Status> {
        let op = Operator::of(&request)?;
        self.remove_credential(op, &request.into_inner().name)
            .await
            .map(Response::new)
    }

    async fn list_leases(
        &self,
        request: Request<v1::ListLeasesRequest>,
    ) -> Result<Response<v1::ListLeasesResponse>, Status> {
        Operator::of(&request)?;
        self.lease_list(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_lease(
        &self,
        request: Request<v1::LeaseRequest>,
    ) -> Result<Response<v1::Lease>, Status> {
        Operator::of(&request)?;
        let id = request.into_inner().id;
        non_empty("id", &id)?;
        Ok(Response::new(convert::lease(
            &self.broker.lease(&id).await?,
        )))
    }

    async fn revoke(
        &self,
        request: Request<v1::RevokeRequest>,
    ) -> Result<Response<v1::RevocationReport>, Status> {
        let op = Operator::of(&request)?;
        let body = request.into_inner();
        let target =
            Target::parse(&body.kind, &body.target).map_err(super::status::revoke_status)?;
        let wait = wait_of(body.wait_ms)?;
        let report = self
            .revoker
            .revoke(target, &body.reason, &op.actor(), wait)
            .await
            .map_err(super::status::revoke_status)?;
        Ok(Response::new(report_message(&report)))
    }

    async fn list_revocations(
        &self,
        request: Request<v1::ListRevocationsRequest>,
    ) -> Result<Response<v1::ListRevocationsResponse>, Status> {
        Operator::of(&request)?;
        let reports = self
            .revoker
            .list(1000)
            .await
            .map_err(super::status::revoke_status)?;
        Ok(Response::new(v1::ListRevocationsResponse {
            revocations: reports.iter().map(report_message).collect(),
        }))
    }

    async fn get_revocation(
        &self,
        request: Request<v1::GetRevocationRequest>,
    ) -> Result<Response<v1::RevocationReport>, Status> {
        Operator::of(&request)?;
        let id = request.into_inner().id;
        non_empty("id", &id)?;
        let report = self
            .revoker
            .report(&id)
            .await
            .map_err(super::status::revoke_status)?;
        Ok(Response::new(report_message(&report)))
    }

    type ListAuditStream = audit::AuditStream;

    async fn list_audit(
        &self,
        request: Request<v1::ListAuditRequest>,
    ) -> Result<Response<Self::ListAuditStream>, Status> {
        Operator::of(&request)?;
        Ok(Response::new(self.audit_pages(request.into_inner())))
    }

    async fn show_policy(
        &self,
        request: Request<v1::ShowPolicyRequest>,
    ) -> Result<Response<v1::ActivePolicySet>, Status> {
        Operator::of(&request)?;
        let active = self.policy.current();
        Ok(Response::new(
            self.policy_set(&active, request.get_ref().text),
        ))
    }

    async fn reload_policy(
        &self,
        request: Request<v1::ReloadPolicyRequest>,
    ) -> Result<Response<v1::ActivePolicySet>, Status> {
        let op = Operator::of(&request)?;
        Ok(Response::new(self.reload_policy_set(&op).await?))
    }

    async fn blast_radius(
        &self,
        request: Request<v1::BlastRadiusRequest>,
    ) -> Result<Response<v1::BlastRadiusReport>, Status> {
        Operator::of(&request)?;
        let body = request.into_inner();
        let Some(blast) = &self.blast else {
            return Err(Status::unimplemented(
                "this daemon has no blast-radius report",
            ));
        };
        let principal = if body.all {
            None
        } else if body.principal.is_empty() {
            return Err(Status::invalid_argument(
                "name a principal (a SPIFFE ID or uid:N) or ask for --all",
            ));
        } else {
            Some(body.principal.as_str())
        };
        let report = blast.report(principal).await.map_err(|e| match e {
            crate::blast::BlastError::Invalid(m) => Status::invalid_argument(m),
            crate::blast::BlastError::Store(e) => crate::api::status::store_status(&e),
            crate::blast::BlastError::Credentials(e) => e.into(),
        })?;
        Ok(Response::new(v1::BlastRadiusReport {
            zero_standing: report.zero_standing() as i64,
            notes: report.notes.clone(),
            elapsed_ms: report.elapsed_ms,
            decisions: report.decisions as i64,
            principals: report
                .principals
                .iter()
                .map(|r| v1::Reach {
                    principal: r.principal.clone(),
                    kind: r.kind.to_string(),
                    svids: r.svids.clone(),
                    secrets: r.secrets.clone(),
                    credentials: r.credentials.clone(),
                    eligible: r.eligible.clone(),
                    zero_standing_privilege: r.zero_standing_privilege(),
                    exposure_seconds: r.exposure_seconds(),
                    weighted_exposure: r.weighted_exposure(),
                    exposure: r
                        .exposure
                        .iter()
                        .map(|e| v1::Exposure {
                            lease_id: e.lease_id.clone(),
                            credential: e.credential.clone(),
                            sensitivity: e.sensitivity.clone(),
                            remaining_seconds: e.remaining_seconds,
                            elevation_id: e.elevation_id.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn test_policy(
        &self,
        request: Request<v1::TestPolicyRequest>,
    ) -> Result<Response<v1::PolicyDecision>, Status> {
        Operator::of(&request)?;
        Ok(Response::new(self.decide_test(request.into_inner()).await?))
    }

    async fn backup(
        &self,
        request: Request<v1::BackupRequest>,
    ) -> Result<Response<v1::BackupResponse>, Status> {
        let op = Operator::of(&request)?;
        let path = std::path::PathBuf::from(request.into_inner().path);
        if !path.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "backup path {}: give an absolute path (the daemon writes it)",
                path.display()
            )));
        }
        let bytes = self
            .registry
            .store()
            .backup_to(&path)
            .await
            .map_err(|e| crate::api::status::store_status(&e))?;
        tracing::info!(uid = op.uid, path = %path.display(), bytes, "datastore backed up");
        self.record(
            op.event("datastore.backup", &path.display().to_string())
                .scope(format!("{bytes} bytes")),
        )
        .await?;
        Ok(Response::new(v1::BackupResponse {
            path: path.display().to_string(),
            bytes,
        }))
    }

    async fn verify_audit(
        &self,
        request: Request<v1::VerifyAuditRequest>,
    ) -> Result<Response<v1::VerifyAuditResponse>, Status> {
        Operator::of(&request)?;
        let body = request.into_inner();
        let head = (body.head_seq != 0 || !body.head_hash.is_empty())
            .then(|| AuditHead::new(body.head_seq, &body.head_hash))
            .transpose()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let verdict = self
            .audit
            .verify(head)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(convert::verification(verdict)))
    }
}
