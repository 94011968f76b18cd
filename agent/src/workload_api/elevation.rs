//! `mayfly.v1.WorkloadElevation` beside the Workload API on the same socket: an attested
//! caller asks for temporary access as one of the SPIFFE IDs of the entries it matches
//! (an AI agent as any other workload), and ends it when its task is done. The daemon
//! decides; the agent only establishes who asks. `mayfly-agent elevate` is the client.

use tonic::{Request, Response, Status};

use mayfly_proto::v1::workload_elevation_server::WorkloadElevation;
use mayfly_proto::v1::{Elevation, HolderElevationRequest, HolderEndElevationRequest};

use crate::workload_api::WorkloadApi;
use crate::workload_api::error::WorkloadApiError;

impl WorkloadApi {
    async fn forward_request(
        &self,
        request: Request<HolderElevationRequest>,
    ) -> Result<Elevation, Status> {
        const CALL: &str = "RequestElevation";
        let caller = self
            .attest_caller(&request, CALL)
            .await
            .map_err(WorkloadApiError::into_status)?;
        let Some(cache) = &self.credentials else {
            return Err(WorkloadApiError::NoCredentials.into_status());
        };
        let mut body = request.into_inner();
        let holder = self
            .credential_holder(&caller, &body.spiffe_id, CALL)
            .map_err(WorkloadApiError::into_status)?;
        body.spiffe_id = holder.as_str().to_owned();
        cache.issuer().request_elevation(body).await
    }

    async fn forward_end(
        &self,
        request: Request<HolderEndElevationRequest>,
    ) -> Result<Elevation, Status> {
        const CALL: &str = "EndElevation";
        let caller = self
            .attest_caller(&request, CALL)
            .await
            .map_err(WorkloadApiError::into_status)?;
        let Some(cache) = &self.credentials else {
            return Err(WorkloadApiError::NoCredentials.into_status());
        };
        let mut body = request.into_inner();
        if body.id.is_empty() {
            return Err(WorkloadApiError::MissingField("id").into_status());
        }
        let holder = self
            .credential_holder(&caller, &body.spiffe_id, CALL)
            .map_err(WorkloadApiError::into_status)?;
        body.spiffe_id = holder.as_str().to_owned();
        cache.issuer().end_elevation(body).await
    }
}

#[tonic::async_trait]
impl WorkloadElevation for WorkloadApi {
    async fn request_elevation(
        &self,
        request: Request<HolderElevationRequest>,
    ) -> Result<Response<Elevation>, Status> {
        self.forward_request(request).await.map(Response::new)
    }

    async fn end_elevation(
        &self,
        request: Request<HolderEndElevationRequest>,
    ) -> Result<Response<Elevation>, Status> {
        self.forward_end(request).await.map(Response::new)
    }
}
