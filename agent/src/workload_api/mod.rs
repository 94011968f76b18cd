//! The SPIFFE Workload API served to local processes: who the caller is comes from the
//! Unix socket's peer credentials and the workload attestor; what it gets comes from the
//! agent's published [`WorkloadState`].

mod credentials;
mod elevation;
mod error;
pub(crate) mod grpc;
mod jwt;
mod secrets;
mod server;
mod streams;
#[cfg(test)]
mod tests;
mod writers;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::{BoxFuture, try_join_all};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use mayfly_common::{Selector, SpiffeId};
use mayfly_proto::WORKLOAD_HEADER;
use mayfly_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use mayfly_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svidRequest, X509svidResponse,
};

use crate::credentials::CredentialCache;
use crate::ops::AgentMetrics;
use crate::state::{Bundle, EntryView, JwtIssuer, WorkloadState};
use crate::workload_api::jwt::{JWT_CACHE_CAPACITY, JwtCache, JwtCacheKey, claims_to_struct};
use crate::workload_api::streams::{
    JwtBundlesView, ResponseStream, X509BundlesView, X509SvidView, watch_stream,
};

pub use error::{ServeError, WorkloadApiError};
pub use server::{ConnectionLimits, bind, serve, serve_listener};

/// The kernel's view of the process at the other end of the socket (`SO_PEERCRED`): one
/// type for the transport that reads it and the attestor that checks it.
pub use crate::attest::workload::PeerCredentials;

/// Why a caller could not be attested: the workload attestor's error, logged and never sent.
pub use crate::attest::workload::AttestError;

/// Turns a caller's credentials into selectors. Kept as a narrow trait so the Workload API
/// does not depend on how attestation is done; the agent adapts its workload attestor to it.
pub trait CallerAttestor: Send + Sync + 'static {
    /// The caller's selectors, or why they could not be found (logged, never sent).
    fn attest(&self, peer: PeerCredentials) -> BoxFuture<'_, Result<Vec<Selector>, AttestError>>;
}

pub use mayfly_common::clock::{Clock, SystemClock};

/// The Workload API service: hand it to [`serve`]. Its calls are the generated service
/// traits' methods; the transport puts the caller's [`PeerCredentials`] in each request's
/// extensions.
pub struct WorkloadApi {
    state: watch::Receiver<Arc<WorkloadState>>,
    attestor: Arc<dyn CallerAttestor>,
    jwt_issuer: Arc<dyn JwtIssuer>,
    clock: Arc<dyn Clock>,
    jwt_cache: JwtCache,
    /// Turned true on shutdown so that open streams end instead of holding the server.
    closing: Arc<watch::Sender<bool>>,
    /// Refusals go here, for the daemon's audit trail.
    denials: Option<crate::sync::denials::DenialSink>,
    /// Where `GetCredential` gets its credentials; without it the call is unimplemented.
    credentials: Option<CredentialCache>,
    /// Counts calls and connections for the agent's operations endpoint.
    metrics: Arc<AgentMetrics>,
    /// How many connections one uid, and all together, may hold open.
    limits: server::ConnectionLimits,
}

impl WorkloadApi {
    pub fn new(
        state: watch::Receiver<Arc<WorkloadState>>,
        attestor: Arc<dyn CallerAttestor>,
        jwt_issuer: Arc<dyn JwtIssuer>,
    ) -> Self {
        Self {
            state,
            attestor,
            jwt_issuer,
            clock: Arc::new(SystemClock),
            jwt_cache: JwtCache::new(JWT_CACHE_CAPACITY),
            closing: Arc::new(watch::Sender::new(false)),
            denials: None,
            credentials: None,
            metrics: Arc::new(AgentMetrics::default()),
            limits: server::ConnectionLimits::default(),
        }
    }

    /// Counts calls and connections into `metrics`.
    pub fn with_limits(mut self, limits: server::ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    pub(crate) fn limits(&self) -> server::ConnectionLimits {
        self.limits
    }

    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub(crate) fn metrics(&self) -> &Arc<AgentMetrics> {
        &self.metrics
    }

    /// Serves `GetCredential` from `cache`.
    pub fn with_credentials(mut self, cache: CredentialCache) -> Self {
        self.credentials = Some(cache);
        self
    }

    /// Reports every refused request (no identity, missing security header) to `sink`.
    pub fn with_denials(mut self, sink: crate::sync::denials::DenialSink) -> Self {
        self.denials = Some(sink);
        self
    }

    fn deny(&self, call: &str, caller: &[Selector], error: &WorkloadApiError) {
        if let Some(sink) = &self.denials {
            sink.deny(call, caller, &error.to_string());
        }
    }

    /// Replaces the wall clock (JWT cache lifetimes, JWT-SVID validation).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Lets [`serve_listener`] end this service's streams once the server is shutting down.
    pub(crate) fn closing_handle(&self) -> Arc<watch::Sender<bool>> {
        self.closing.clone()
    }

    /// The checks every call makes: the security header, then the caller's selectors.
    async fn attest_caller<T>(
        &self,
        request: &Request<T>,
        call: &'static str,
    ) -> Result<Vec<Selector>, WorkloadApiError> {
        let header_ok = request
            .metadata()
            .get(WORKLOAD_HEADER)
            .is_some_and(|v| v.as_bytes() == b"true");
        if !header_ok {
            let error = WorkloadApiError::MissingSecurityHeader;
            self.deny(call, &[], &error);
            return Err(error);
        }
        let peer = *request
            .extensions()
            .get::<PeerCredentials>()
            .ok_or(WorkloadApiError::NoPeerCredentials)?;
        let selectors = match self.attestor.attest(peer).await {
            Ok(selectors) => selectors,
            Err(source) => {
                // A process that changed under its connection (it executed another
                // program, the pid was reused) is what a borrowed connection looks like:
                // the daemon's trail hears of it, with the reason the caller is not told.
                if matches!(
                    source,
                    crate::attest::workload::AttestError::ProcessChanged { .. }
                ) {
                    tracing::warn!(pid = ?peer.pid, uid = peer.uid, error = %source, "Workload API call refused");
                    if let Some(sink) = &self.denials {
                        sink.deny(call, &[Selector::Uid(peer.uid)], &source.to_string());
                    }
                }
                return Err(WorkloadApiError::Attestation { source });
            }
        };
        tracing::debug!(pid = ?peer.pid, uid = peer.uid, selectors = selectors.len(), "workload attested");
        Ok(selectors)
    }

    fn stream<V: streams::View>(&self, caller: Vec<Selector>) -> ResponseStream<V::Message> {
        watch_stream::<V>(self.state.clone(), self.closing.subscribe(), caller)
    }

    /// A stream for a caller that matches at least one entry; an unregistered caller is
    /// refused from the call itself, before any stream starts.
    async fn registered_stream<V: streams::View, T>(
        &self,
        request: &Request<T>,
        call: &'static str,
    ) -> Result<ResponseStream<V::Message>, Status> {
        let caller = self
            .attest_caller(request, call)
            .await
            .map_err(WorkloadApiError::into_status)?;
        if self.state.borrow().entries_for(&caller).is_empty() {
            let error = WorkloadApiError::NoIdentityIssued { requested: None };
            self.deny(call, &caller, &error);
            return Err(error.into_status());
        }
        Ok(self.stream::<V>(caller))
    }

    async fn fetch_jwt_svids(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<JwtsvidResponse, WorkloadApiError> {
        let caller = self.attest_caller(&request, "FetchJWTSVID").await?;
        let JwtsvidRequest {
            audience,
            spiffe_id,
        } = request.into_inner();
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(WorkloadApiError::MissingField("audience"));
        }
        let requested = if spiffe_id.is_empty() {
            None
        } else {
            Some(SpiffeId::parse(&spiffe_id).map_err(WorkloadApiError::InvalidSpiffeId)?)
        };

        let entries = self.state.borrow().entries_for(&caller);
        let mut chosen: Vec<Arc<EntryView>> = Vec::new();
        for entry in entries {
            // A JWT-SVID carries only the SPIFFE ID, so two entries granting the same ID
            // would yield interchangeable tokens: the first (in entry order) stands for both.
            let wanted = requested.as_ref().is_none_or(|id| *id == entry.spiffe_id);
            if wanted && !chosen.iter().any(|c| c.spiffe_id == entry.spiffe_id) {
                chosen.push(entry);
            }
        }
        if chosen.is_empty() {
            let error = WorkloadApiError::NoIdentityIssued {
                requested: requested.map(|id| id.as_str().to_owned()),
            };
            self.deny("FetchJWTSVID", &caller, &error);
            return Err(error);
        }
        // Decided here too, with the caller's own selectors, before the daemon is asked.
        let denied = {
            let state = self.state.borrow();
            chosen.iter().find_map(|entry| {
                audience.iter().find_map(|aud| {
                    crate::policy::check(
                        &state,
                        entry,
                        &caller,
                        crate::policy::WorkloadAsk::JwtSvid { audience: aud },
                    )
                    .err()
                })
            })
        };
        if let Some(why) = denied {
            let error = WorkloadApiError::PolicyDenied(why);
            self.deny("FetchJWTSVID", &caller, &error);
            return Err(error);
        }

        let svids = try_join_all(chosen.iter().map(|entry| self.jwt_for(entry, &audience))).await?;
        Ok(JwtsvidResponse { svids })
    }

    async fn jwt_for(
        &self,
        entry: &EntryView,
        audience: &[String],
    ) -> Result<Jwtsvid, WorkloadApiError> {
        let key = JwtCacheKey::new(&entry.id, entry.spiffe_id.as_str(), audience);
        // A clock before 1970 disables the cache rather than making every token look fresh.
        let now = unix_seconds(self.clock.now());
        let cached = now.and_then(|now| self.jwt_cache.get(&key, now));
        let token = match cached {
            Some(token) => token,
            None => {
                let (token, expires) = self
                    .jwt_issuer
                    .mint(&entry.id, audience)
                    .await
                    .map_err(WorkloadApiError::Mint)?;
                if let Some(now) = now {
                    self.jwt_cache.insert(key, token.clone(), now, expires);
                }
                token
            }
        };
        Ok(Jwtsvid {
            spiffe_id: entry.spiffe_id.as_str().to_owned(),
            svid: token,
            hint: entry.hint.clone(),
        })
    }

    async fn validate(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<ValidateJwtsvidResponse, WorkloadApiError> {
        self.attest_caller(&request, "ValidateJWTSVID").await?;
        let ValidateJwtsvidRequest { audience, svid } = request.into_inner();
        if audience.is_empty() {
            return Err(WorkloadApiError::MissingField("audience"));
        }
        if svid.is_empty() {
            return Err(WorkloadApiError::MissingField("svid"));
        }
        let bundle = self.state.borrow().bundle.clone();
        validate_jwt_svid(&svid, &audience, &bundle, self.clock.now())
    }
}

/// The answer to `ValidateJWTSVID` for a token checked against the trust domain's JWT keys.
pub(crate) fn validate_jwt_svid(
    svid: &str,
    audience: &str,
    bundle: &Bundle,
    now: SystemTime,
) -> Result<ValidateJwtsvidResponse, WorkloadApiError> {
    let claims = mayfly_common::svid::validate_jwt(svid, audience, &bundle.jwt_keys, now)
        .map_err(WorkloadApiError::InvalidJwt)?;
    // The keys are this trust domain's: they vouch only for subjects inside it.
    let subject = SpiffeId::parse(&claims.sub).map_err(WorkloadApiError::InvalidSpiffeId)?;
    if !subject.is_member_of(&bundle.trust_domain) {
        return Err(WorkloadApiError::ForeignTrustDomain(
            subject.trust_domain().as_str().to_owned(),
        ));
    }
    Ok(ValidateJwtsvidResponse {
        spiffe_id: claims.sub,
        claims: Some(claims_to_struct(&claims.raw)),
    })
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.registered_stream::<X509SvidView, _>(&request, "FetchX509SVID")
            .await
            .map(Response::new)
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = self
            .attest_caller(&request, "FetchX509Bundles")
            .await
            .map_err(WorkloadApiError::into_status)?;
        Ok(Response::new(self.stream::<X509BundlesView>(caller)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        self.fetch_jwt_svids(request)
            .await
            .map(Response::new)
            .map_err(WorkloadApiError::into_status)
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let caller = self
            .attest_caller(&request, "FetchJWTBundles")
            .await
            .map_err(WorkloadApiError::into_status)?;
        Ok(Response::new(self.stream::<JwtBundlesView>(caller)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.validate(request)
            .await
            .map(Response::new)
            .map_err(WorkloadApiError::into_status)
    }
}

/// Whole seconds since the epoch, or `None` for a clock before 1970 (or past i64).
fn unix_seconds(t: SystemTime) -> Option<i64> {
    let since = t.duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(since.as_secs()).ok()
}
