//! `mayfly.v1.WorkloadCredentials` beside the Workload API on the same socket: an attested
//! caller asks for a TTL-bound credential as one of the SPIFFE IDs of the entries it
//! matches, and gets it from the agent's credential cache. `mayfly-agent creds` reads it.

use tonic::{Request, Response, Status};

use mayfly_common::{Selector, SpiffeId};
use mayfly_proto::v1::workload_credentials_server::WorkloadCredentials;
use mayfly_proto::v1::{GetCredentialRequest, WorkloadCredential};

use crate::credentials::{Credential, CredentialKey};
use crate::policy::WorkloadAsk;
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
        let spiffe_id = self.credential_holder(&caller, &spiffe_id, CALL)?;
        let key = CredentialKey {
            spiffe_id,
            name,
            ttl_seconds,
        };
        let credential = cache
            .get(&key)
            .await
            .map_err(WorkloadApiError::Credential)?;
        self.check_credential_policy(&caller, &credential, ttl_seconds)?;
        Ok(credential.to_message())
    }

    /// The policies decide every hand-out, a cached credential's too, on the facts the
    /// daemon sent with it: a `forbid` pushed later holds while the daemon is unreachable.
    /// Allowed when one of the caller's entries for the holder may have it.
    fn check_credential_policy(
        &self,
        caller: &[Selector],
        credential: &Credential,
        ttl_seconds: i64,
    ) -> Result<(), WorkloadApiError> {
        let Some(facts) = &credential.facts else {
            return Ok(());
        };
        let state = self.state.borrow();
        let ask = WorkloadAsk::Credential {
            name: &credential.name,
            kind: &credential.kind,
            facts,
            ttl_seconds,
        };
        let mut denial = None;
        for entry in state
            .entries_for(caller)
            .iter()
            .filter(|e| e.spiffe_id == credential.spiffe_id)
        {
            match crate::policy::check(&state, entry, caller, ask) {
                Ok(()) => return Ok(()),
                Err(why) => denial = Some(why),
            }
        }
        let error = WorkloadApiError::PolicyDenied(
            denial.unwrap_or_else(|| format!("no entry of the caller is {}", credential.spiffe_id)),
        );
        self.deny(CALL, caller, &error);
        Err(error)
    }

    /// Which of the caller's SPIFFE IDs asks: the one it names, which must be one of its
    /// entries', or its only one. Refusals are reported like every Workload API denial.
    pub(super) fn credential_holder(
        &self,
        caller: &[Selector],
        requested: &str,
        call: &str,
    ) -> Result<SpiffeId, WorkloadApiError> {
        let requested = if requested.is_empty() {
            None
        } else {
            Some(SpiffeId::parse(requested).map_err(WorkloadApiError::InvalidSpiffeId)?)
        };
        let mut held: Vec<SpiffeId> = Vec::new();
        // Identities an elevation gave for a while are used when named; unnamed, the
        // caller is who it is without them.
        let mut lasting: Vec<SpiffeId> = Vec::new();
        for entry in self.state.borrow().entries_for(caller) {
            if !held.contains(&entry.spiffe_id) {
                held.push(entry.spiffe_id.clone());
            }
            if entry.expires_at == 0 && !lasting.contains(&entry.spiffe_id) {
                lasting.push(entry.spiffe_id.clone());
            }
        }
        if requested.is_none() && held.len() > 1 && lasting.len() == 1 {
            held = lasting;
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
            self.deny(call, caller, &error);
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
