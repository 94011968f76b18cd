//! `mayfly.v1.Elevations` on the elevation socket. Unlike the admin socket, every local
//! user may connect: the caller is the uid of the socket's peer credentials (never anything
//! the request says), and each call is decided by the policies for that operator.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use mayfly_proto::v1;
use mayfly_proto::v1::elevations_server::Elevations as ElevationsService;

use crate::elevation::{Ask, Caller, ElevationError, ElevationView, Elevations};
use crate::store::{ElevationRecord, ElevationReview, ElevationState};

pub struct ElevationApi {
    elevations: Arc<Elevations>,
}

impl ElevationApi {
    pub fn new(elevations: Arc<Elevations>) -> Self {
        Self { elevations }
    }
}

/// The operator at the other end of the socket.
fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    let uid = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid())
        .ok_or_else(|| Status::unauthenticated("the caller's credentials are unknown"))?;
    let name = uzers::get_user_by_uid(uid)
        .map(|u| u.name().to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Caller::Operator { uid, name })
}

pub fn status(error: ElevationError) -> Status {
    match error {
        ElevationError::Invalid(m) => Status::invalid_argument(m),
        ElevationError::NotFound(m) => Status::not_found(m),
        ElevationError::Denied(m) => Status::permission_denied(m),
        ElevationError::Conflict(m) => Status::failed_precondition(m),
        ElevationError::Store(e) => crate::api::status::store_status(&e),
        ElevationError::Credentials(e) => e.into(),
        ElevationError::Revoke(e) => crate::api::status::revoke_status(e),
        ElevationError::Unavailable(m) => Status::unavailable(m),
    }
}

/// `ElevationRequest` as the engine takes it.
pub fn ask(request: v1::ElevationRequest) -> Result<Ask, Status> {
    if request.ttl_seconds <= 0 {
        return Err(Status::invalid_argument("ttl_seconds must be positive"));
    }
    Ok(Ask {
        scope_kind: request.scope_kind,
        scope_name: request.scope_name,
        ttl: Duration::from_secs(request.ttl_seconds as u64),
        reason: request.reason,
        ticket: request.ticket,
        break_glass: request.break_glass,
    })
}

pub fn message(record: &ElevationRecord, reviews: &[ElevationReview]) -> v1::Elevation {
    v1::Elevation {
        id: record.id.clone(),
        requester: record.requester.clone(),
        requester_name: record.requester_name.clone(),
        requester_kind: record.requester_kind.clone(),
        agent_id: record.agent_id.clone(),
        scope_kind: record.scope_kind.clone(),
        scope_name: record.scope_name.clone(),
        reason: record.reason.clone(),
        ticket: record.ticket.clone(),
        requested_ttl: record.requested_ttl,
        break_glass: record.break_glass,
        state: record.state().to_string(),
        created_at: record.created_at,
        pending_until: record.pending_until,
        activated_at: record.activated_at.unwrap_or_default(),
        ends_at: record.ends_at.unwrap_or_default(),
        ended_at: record.ended_at.unwrap_or_default(),
        ended_by: record.ended_by.clone(),
        end_reason: record.end_reason.clone(),
        revocation_id: record.revocation_id.clone(),
        review_required: record.review_required,
        reviewed_by: record.reviewed_by.clone(),
        reviewed_at: record.reviewed_at.unwrap_or_default(),
        review_comment: record.review_comment.clone(),
        policy_set: record.policy_set.clone(),
        reviews: reviews
            .iter()
            .map(|r| v1::ElevationReviewRecord {
                reviewer_uid: r.reviewer_uid,
                reviewer_name: r.reviewer_name.clone(),
                verdict: r.verdict.clone(),
                comment: r.comment.clone(),
                at: r.at,
            })
            .collect(),
        notices: Vec::new(),
        granted_entry: record.granted_entry.clone(),
    }
}

fn detail(view: ElevationView) -> v1::ElevationDetail {
    let mut elevation = message(&view.record, &view.reviews);
    elevation.notices = view.notices;
    v1::ElevationDetail {
        elevation: Some(elevation),
        leases: view.leases.iter().map(crate::api::convert::lease).collect(),
        revocation: view.revocation.as_ref().map(crate::revoke::report_message),
        svids: view
            .svids
            .iter()
            .map(|s| v1::ElevationSvid {
                serial: s.serial.clone(),
                spiffe_id: s.spiffe_id.clone(),
                agent_id: s.agent_id.clone(),
                issued_at: s.issued_at,
                not_after: s.not_after,
            })
            .collect(),
    }
}

impl ElevationApi {
    /// The record the caller just acted on, with its reviews.
    async fn with_reviews(&self, record: ElevationRecord) -> Result<v1::Elevation, Status> {
        let reviews = self.elevations.reviews(&record.id).await.map_err(status)?;
        Ok(message(&record, &reviews))
    }
}

#[tonic::async_trait]
impl ElevationsService for ElevationApi {
    async fn request_elevation(
        &self,
        request: Request<v1::ElevationRequest>,
    ) -> Result<Response<v1::Elevation>, Status> {
        let caller = caller(&request)?;
        let ask = ask(request.into_inner())?;
        let record = self
            .elevations
            .request(&caller, &ask)
            .await
            .map_err(status)?;
        Ok(Response::new(message(&record, &[])))
    }

    async fn review_elevation(
        &self,
        request: Request<v1::ReviewElevationRequest>,
    ) -> Result<Response<v1::Elevation>, Status> {
        let caller = caller(&request)?;
        let body = request.into_inner();
        let record = self
            .elevations
            .review(&caller, &body.id, body.approve, &body.comment)
            .await
            .map_err(status)?;
        Ok(Response::new(self.with_reviews(record).await?))
    }

    async fn end_elevation(
        &self,
        request: Request<v1::EndElevationRequest>,
    ) -> Result<Response<v1::ElevationDetail>, Status> {
        let caller = caller(&request)?;
        let body = request.into_inner();
        let record = self
            .elevations
            .end(&caller, &body.id, &body.reason, false)
            .await
            .map_err(status)?;
        let view = self
            .elevations
            .view(&caller, &record.id)
            .await
            .map_err(status)?;
        Ok(Response::new(detail(view)))
    }

    async fn cancel_elevation(
        &self,
        request: Request<v1::EndElevationRequest>,
    ) -> Result<Response<v1::Elevation>, Status> {
        let caller = caller(&request)?;
        let body = request.into_inner();
        let record = self
            .elevations
            .end(&caller, &body.id, &body.reason, true)
            .await
            .map_err(status)?;
        Ok(Response::new(self.with_reviews(record).await?))
    }

    async fn review_break_glass(
        &self,
        request: Request<v1::ReviewElevationRequest>,
    ) -> Result<Response<v1::Elevation>, Status> {
        let caller = caller(&request)?;
        let body = request.into_inner();
        let record = self
            .elevations
            .review_break_glass(&caller, &body.id, &body.comment)
            .await
            .map_err(status)?;
        Ok(Response::new(self.with_reviews(record).await?))
    }

    async fn list_elevations(
        &self,
        request: Request<v1::ListElevationsRequest>,
    ) -> Result<Response<v1::ListElevationsResponse>, Status> {
        let caller = caller(&request)?;
        let body = request.into_inner();
        let state = if body.state.is_empty() {
            None
        } else {
            Some(body.state.parse::<ElevationState>().map_err(|_| {
                Status::invalid_argument(format!(
                    "state `{}`: pending, active, rejected, expired, cancelled, ended or elapsed",
                    body.state
                ))
            })?)
        };
        let requester = Some(body.requester.as_str()).filter(|r| !r.is_empty());
        let listed = self
            .elevations
            .list(&caller, state, requester)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::ListElevationsResponse {
            elevations: listed
                .iter()
                .map(|(record, reviews)| message(record, reviews))
                .collect(),
        }))
    }

    async fn get_elevation(
        &self,
        request: Request<v1::GetElevationRequest>,
    ) -> Result<Response<v1::ElevationDetail>, Status> {
        let caller = caller(&request)?;
        let id = request.into_inner().id;
        let view = self.elevations.view(&caller, &id).await.map_err(status)?;
        Ok(Response::new(detail(view)))
    }

    async fn issue_elevated_credential(
        &self,
        request: Request<v1::IssueElevatedCredentialRequest>,
    ) -> Result<Response<v1::WorkloadCredential>, Status> {
        let caller = caller(&request)?;
        let body = request.into_inner();
        if body.ttl_seconds < 0 {
            return Err(Status::invalid_argument("ttl_seconds must not be negative"));
        }
        let granted = self
            .elevations
            .issue_credential(
                &caller,
                &body.id,
                Duration::from_secs(body.ttl_seconds as u64),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(v1::WorkloadCredential {
            name: granted.lease.credential.clone(),
            kind: granted.kind.to_string(),
            values: granted
                .values
                .into_iter()
                .map(|(key, value)| (key, value.expose().to_string()))
                .collect(),
            lease_id: granted.lease.id.clone(),
            issued_at: granted.lease.issued_at,
            expires_at: granted.lease.expires_at,
            spiffe_id: String::new(),
            notice: granted.notice.unwrap_or_default(),
        }))
    }

    async fn read_elevated_secret(
        &self,
        request: Request<v1::GetElevationRequest>,
    ) -> Result<Response<v1::ElevatedSecret>, Status> {
        let caller = caller(&request)?;
        let id = request.into_inner().id;
        let (record, value) = self
            .elevations
            .read_secret(&caller, &id)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::ElevatedSecret {
            elevation_id: record.id,
            name: value.secret.clone(),
            version: value.version.clone(),
            username: value.credential.username.clone(),
            value: value.credential.password.expose().as_bytes().to_vec(),
            ends_at: record.ends_at.unwrap_or_default(),
        }))
    }
}
