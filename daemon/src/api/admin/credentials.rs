//! The admin API's credential definitions: created from TOML, summarised with their live
//! lease count, deleted only when nothing issued under them is live.

use tonic::Status;

use mayfly_proto::v1;

use super::AdminApi;
use super::operator::Operator;
use crate::creds::spec::CredentialSpec;

impl AdminApi {
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
        self.broker.create(spec).await?;
        tracing::info!(uid = op.uid, credential = %name, "credential defined");
        self.record(op.event("credential.create", &name)).await?;
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
