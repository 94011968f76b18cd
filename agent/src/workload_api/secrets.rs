//! `mayfly.v1.WorkloadSecrets` beside the Workload API on the same socket: an attested
//! caller streams the secrets granted to the SPIFFE IDs of the entries it matches, whole,
//! at once and again whenever their versions change. `mayfly-agent exec` reads it.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use mayfly_common::Selector;
use mayfly_proto::v1::workload_secrets_server::WorkloadSecrets;
use mayfly_proto::v1::{WatchSecretsRequest, WatchSecretsResponse, WorkloadSecret};

use crate::state::{SecretView, WorkloadState};
use crate::workload_api::WorkloadApi;
use crate::workload_api::error::WorkloadApiError;
use crate::workload_api::streams::{ResponseStream, View};

/// The caller's granted secrets, by name.
#[derive(Debug, PartialEq)]
pub(crate) struct SecretsView {
    secrets: Vec<Arc<SecretView>>,
}

impl View for SecretsView {
    type Message = WatchSecretsResponse;

    /// Like FetchX509SVID: a caller that matches no entry is refused; before the first
    /// full state from the daemon there is nothing true to say yet, so wait.
    fn take(state: &WorkloadState, caller: &[Selector]) -> Result<Option<Self>, WorkloadApiError> {
        if state.entries_for(caller).is_empty() {
            return Err(WorkloadApiError::NoIdentityIssued { requested: None });
        }
        if !state.synced {
            return Ok(None);
        }
        // Granted by the daemon; the policies decide again with the caller's selectors: a
        // secret goes to the caller when one of its entries granted it may read it.
        let entries = state.entries_for(caller);
        let secrets = state
            .secrets_for(caller)
            .into_iter()
            .filter(|secret| {
                entries
                    .iter()
                    .filter(|e| secret.granted_to.iter().any(|g| g == e.spiffe_id.as_str()))
                    .any(|e| {
                        let ask = crate::policy::WorkloadAsk::Secret {
                            name: &secret.name,
                            granted_to: &secret.granted_to,
                            sets: &secret.sets,
                        };
                        crate::policy::check(state, e, caller, ask).is_ok()
                    })
            })
            .collect();
        Ok(Some(Self { secrets }))
    }

    fn encode(&self) -> WatchSecretsResponse {
        WatchSecretsResponse {
            secrets: self
                .secrets
                .iter()
                .map(|s| WorkloadSecret {
                    name: s.name.clone(),
                    version: s.version.clone(),
                    username: s.username.clone(),
                    value: s.value.to_vec(),
                })
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl WorkloadSecrets for WorkloadApi {
    type WatchSecretsStream = ResponseStream<WatchSecretsResponse>;

    async fn watch_secrets(
        &self,
        request: Request<WatchSecretsRequest>,
    ) -> Result<Response<Self::WatchSecretsStream>, Status> {
        self.registered_stream::<SecretsView, _>(&request, "WatchSecrets")
            .await
            .map(Response::new)
    }
}
