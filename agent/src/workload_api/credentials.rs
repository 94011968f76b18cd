//! `mayfly.v1.WorkloadCredentials` beside the Workload API on the same socket: an attested
//! caller asks for a TTL-bound credential as one of the SPIFFE IDs of the entries it
//! matches, and gets it from the agent's credential cache. `mayfly-agent creds` reads it.

use tonic::{Request, Response, Status};

use mayfly_common::{Selector, SpiffeId};
use mayfly_proto::v1::workload_credentials_server::WorkloadCredentials;
use mayfly_proto::v1::{GetCredentialRequest, WorkloadCredential};

use crate::credentials::CredentialKey;
use crate::workload_api::WorkloadApi;
use crate::workload_api::error::WorkloadApiError;

/// The call's name on the audit trail, as the others are named.
const CALL: &str = "GetCredential";

impl WorkloadApi {
    async fn get_workload_credential(
        &self,
        request: Request<GetCredentialRequest>,
    ) -> Result<WorkloadCredential, WorkloadApiError> {
        let caller = self.attest_caller(&request, CALL).await?;
        let GetCredentialRequest {
            name,
            spiffe_id,
            ttl_seconds,
        } = request.into_inner();
        if name.is_empty() {
            return Err(WorkloadApiError::MissingField("name"));
        }
        if ttl_seconds < 0 {
            return Err(WorkloadApiError::NegativeTtl(ttl_seconds));
        }
        let Some(cache) = &self.credentials else {
            return Err(WorkloadApiError::NoCredentials);
        };
        let spiffe_id = self.credential_holder(&caller, &spiffe_id)?;
        let key = CredentialKey {
            spiffe_id,
            name,
            ttl_seconds,
        };
        let credential = cache
            .get(&key)
            .await
            .map_err(WorkloadApiError::Credential)?;
        Ok(credential.to_message())
    }

    /// Which of the caller's SPIFFE IDs asks: the one it names, which must be one of its
    /// entries', or its only one. Refusals are reported like every Workload API denial.
    fn credential_holder(
        &self,
        caller: &[Selector],
        requested: &str,
    ) -> Result<SpiffeId, WorkloadApiError> {
        let requested = if requested.is_empty() {
            None
        } else {
            Some(SpiffeId::parse(requested).map_err(WorkloadApiError::InvalidSpiffeId)?)
        };
        let mut held: Vec<SpiffeId> = Vec::new();
        for entry in self.state.borrow().entries_for(caller) {
            if !held.contains(&entry.spiffe_id) {
                held.push(entry.spiffe_id.clone());
            }
        }
        let chosen = match &requested {
            Some(id) => held.iter().find(|held| *held == id).cloned(),
            None if held.len() > 1 => {
                return Err(WorkloadApiError::AmbiguousSpiffeId(
                    held.iter().map(|id| id.as_str().to_owned()).collect(),
                ));
            }
            None => held.into_iter().next(),
        };
        chosen.ok_or_else(|| {
            let error = WorkloadApiError::NoIdentityIssued {
                requested: requested.map(|id| id.as_str().to_owned()),
            };
            self.deny(CALL, caller, &error);
            error
        })
    }
}

#[tonic::async_trait]
impl WorkloadCredentials for WorkloadApi {
    async fn get_credential(
        &self,
        request: Request<GetCredentialRequest>,
    ) -> Result<Response<WorkloadCredential>, Status> {
        self.get_workload_credential(request)
            .await
            .map(Response::new)
            .map_err(WorkloadApiError::into_status)
    }
}
