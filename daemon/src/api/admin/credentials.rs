//! The admin API's credential definitions: created from TOML (a redefinition that drops a
//! grant revokes what that holder holds), summarised with their live lease count, deleted
//! only when nothing issued under them is live; an agent's leases for an identity it no
//! longer serves revoked when its last entry goes.

use tonic::Status;

use mayfly_proto::v1;

use super::AdminApi;
use super::operator::Operator;
use crate::creds::spec::CredentialSpec;
use crate::revoke::Target;
use crate::store::{EntryFilter, EntryRecord, LeaseFilter};

impl AdminApi {
    /// After `deleted` is gone: if no entry has its parent serve its SPIFFE ID any more,
    /// what that agent holds for the identity is revoked (acknowledged like any other).
    pub(super) async fn revoke_unserved(
        &self,
        deleted: &EntryRecord,
        op: &Operator,
    ) -> Result<(), Status> {
        let still_served = self
            .registry
            .list_entries(&EntryFilter {
                parent_id: Some(deleted.parent_id.clone()),
                spiffe_id: Some(deleted.spiffe_id.clone()),
            })
            .await?
            .iter()
            .any(|e| e.id != deleted.id);
        if still_served {
            return Ok(());
        }
        let held = self
            .broker
            .leases(&LeaseFilter {
                holder: Some(deleted.spiffe_id.clone()),
                ..Default::default()
            })
            .await?
            .iter()
            .any(|l| l.agent_id == deleted.parent_id);
        if !held {
            return Ok(());
        }
        let report = self
            .revoker
            .revoke(
                Target::Unserved {
                    spiffe_id: deleted.spiffe_id.clone(),
                    agent: deleted.parent_id.clone(),
                },
                "the entry that let the agent serve this identity was deleted",
                &op.actor(),
                Some(std::time::Duration::from_secs(1)),
            )
            .await
            .map_err(crate::api::status::revoke_status)?;
        tracing::warn!(spiffe_id = %deleted.spiffe_id, agent = %deleted.parent_id, leases = report.scope.lease_ids.len(), "revoked the leases of an identity its agent no longer serves");
        Ok(())
    }

    pub(super) async fn credential_summary(
        &self,
        name: &str,
    ) -> Result<v1::CredentialSummary, Status> {
        let (spec, source, live) = self.broker.describe(name).await?;
        Ok(v1::CredentialSummary {
            name: spec.name.clone(),
            kind: spec.kind().into(),
            grants: spec.grants.clone(),
            default_ttl: spec.default_ttl.as_secs() as i64,
            max_ttl: spec.max().as_secs() as i64,
            source,
            live_leases: live,
        })
    }

    pub(super) async fn credential_list(&self) -> Result<v1::ListCredentialsResponse, Status> {
        let mut credentials = Vec::new();
        for name in self.broker.names().await? {
            credentials.push(self.credential_summary(&name).await?);
        }
        Ok(v1::ListCredentialsResponse { credentials })
    }

    pub(super) async fn lease_list(
        &self,
        body: v1::ListLeasesRequest,
    ) -> Result<v1::ListLeasesResponse, Status> {
        let leases = self
            .broker
            .leases(&crate::store::LeaseFilter {
                holder: Some(body.holder).filter(|s| !s.is_empty()),
                credential: Some(body.credential).filter(|s| !s.is_empty()),
                elevation_id: None,
                all: body.all,
            })
            .await?;
        Ok(v1::ListLeasesResponse {
            leases: leases.iter().map(super::convert::lease).collect(),
        })
    }

    pub(super) async fn define_credential(
        &self,
        op: Operator,
        definition: &str,
    ) -> Result<v1::CredentialSummary, Status> {
        let spec = CredentialSpec::from_toml(definition)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = spec.name.clone();
        let grants = spec.grants.clone();
        self.broker.create(spec).await?;
        tracing::info!(uid = op.uid, credential = %name, "credential defined");
        self.record(op.event("credential.create", &name)).await?;
        // A redefinition that grants fewer holders takes back what they hold, through
        // the acknowledged revocation so that agents drop their copies too.
        let ungranted = self
            .broker
            .leases(&LeaseFilter {
                credential: Some(name.clone()),
                ..Default::default()
            })
            .await?
            .iter()
            .any(|l| !grants.contains(&l.holder));
        if ungranted {
            let report = self
                .revoker
                .revoke(
                    Target::Ungranted { name: name.clone() },
                    "the credential's definition no longer grants its holder",
                    &op.actor(),
                    // The backend revocation is done before this returns; agents that
                    // have not acknowledged within a second stay pending on the record.
                    Some(std::time::Duration::from_secs(1)),
                )
                .await
                .map_err(crate::api::status::revoke_status)?;
            tracing::warn!(credential = %name, leases = report.scope.lease_ids.len(), "revoked the leases of holders the new definition does not grant");
        }
        self.credential_summary(&name).await
    }

    pub(super) async fn remove_credential(
        &self,
        op: Operator,
        name: &str,
    ) -> Result<v1::CredentialSummary, Status> {
        let summary = self.credential_summary(name).await?;
        self.broker.delete(name).await?;
        tracing::info!(uid = op.uid, credential = %name, "credential deleted");
        self.record(op.event("credential.delete", name)).await?;
        Ok(summary)
    }
}
