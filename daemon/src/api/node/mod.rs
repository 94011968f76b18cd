//! The node API agents call over mTLS: attestation, renewal, the sync stream and batched
//! signing. Every call but `Attest` is authenticated by the agent SVID and re-checked
//! against the store, so an evicted agent is refused at once.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use mayfly_common::tls::{PeerIdentity, peer_identity};
use mayfly_proto::v1::node_server::Node;
use mayfly_proto::v1::{self, sync_message::Update};

use super::convert;
use crate::audit::{Actor, Audit, AuditError, Event};
use crate::creds::Broker;
use crate::identity::{IdentityError, Registry, SignedSvid};
use crate::metrics::{Metrics, SvidKind};
use crate::revoke::Revoker;
use crate::secrets::engine::RotationEngine;
use crate::store::{AgentRecord, IssuedSvidRecord};
use crate::visibility::Visibility;

mod limiter;
mod signer;
mod sync;

pub use limiter::RefusalLimiter;

/// The most denials one `ReportDenials` call may carry (agents send at most 500).
const MAX_DENIALS_PER_REPORT: usize = 1000;

/// Bundle refresh hint sent to agents, in seconds.
const REFRESH_HINT: i64 = 300;

/// A signing job's outcome: the SVIDs and how their audit commit went, or why the batch
/// was refused.
type Signing = Result<(Vec<SignedSvid>, Result<i64, AuditError>), IdentityError>;

#[derive(Clone)]
pub struct NodeApi {
    registry: Arc<Registry>,
    secrets: Arc<RotationEngine>,
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    audit: Audit,
    revoker: Arc<Revoker>,
    /// What each agent may see, from the registry's and the engine's snapshots.
    view: Visibility,
    elevations: Arc<crate::elevation::Elevations>,
    /// Budgets of refused calls per source address, for callers without a valid SVID.
    refusals: Arc<RefusalLimiter>,
    /// What each client certificate says, read once rather than at every call.
    peers: Arc<PeerCache>,
    /// Where batches are signed: off the async runtime, one thread per core.
    signer: Arc<signer::SigningPool>,
}

impl NodeApi {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        registry: Arc<Registry>,
        secrets: Arc<RotationEngine>,
        broker: Arc<Broker>,
        metrics: Arc<Metrics>,
        audit: Audit,
        revoker: Arc<Revoker>,
        view: Visibility,
        elevations: Arc<crate::elevation::Elevations>,
    ) -> std::io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let signer = Arc::new(signer::SigningPool::new(cores)?);
        Ok(Self {
            registry,
            secrets,
            broker,
            metrics,
            audit,
            revoker,
            view,
            elevations,
            refusals: Arc::default(),
            peers: Arc::default(),
            signer,
        })
    }

    /// Counts a refused call against the caller's address. `Err` when that address has
    /// already been refused too often: the caller is told to wait, and nothing more is
    /// recorded for it (the trail has the refusals that spent the budget).
    fn refused<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let source = request.remote_addr().map(|a| a.ip());
        let now = std::time::Instant::now();
        self.refusals
            .check(source, now)
            .map_err(|wait| slowed_down(source, wait))?;
        self.refusals.charge(source, now);
        Ok(())
    }

    /// Signs the batch on the signing pool (see [`signer`]). The signing thread queues its
    /// audit record and serials with the audit writer itself, with the signed SVIDs, and
    /// the writer answers the call once they are committed: the call's task wakes once,
    /// when the SVIDs may leave, and the commit starts without a trip through the runtime.
    async fn sign_off_runtime(
        &self,
        agent: &str,
        csrs: Vec<(String, Vec<u8>)>,
    ) -> Result<Signing, Status> {
        let registry = self.registry.clone();
        let audit = self.audit.clone();
        let agent = agent.to_owned();
        let coming = self.audit.expect();
        let (answer, answered) = tokio::sync::oneshot::channel();
        let spawned = self.signer.spawn(move || {
            let _coming = coming;
            match registry.sign_batch(&agent, &csrs) {
                Ok(signed) => {
                    let (event, issued) = issued_records(&registry, &agent, &signed);
                    audit.queue_issued_then(event, issued, move |committed| {
                        let _ = answer.send(Ok((signed, committed)));
                    });
                }
                Err(e) => {
                    let _ = answer.send(Err(e));
                }
            }
        });
        let answer = if spawned { answered.await.ok() } else { None };
        answer.ok_or_else(|| {
            tracing::error!("a signing job ended without an answer");
            Status::internal("signing failed")
        })
    }

    async fn authenticate<T>(
        &self,
        request: &Request<T>,
        call: &str,
    ) -> Result<AgentRecord, Status> {
        let peer = match self.peers.caller(request) {
            Ok(peer) => peer,
            Err(status) => {
                self.refused(request)?;
                return Err(status);
            }
        };
        let e = match self.registry.authenticate_agent(&peer).await {
            Ok(agent) => return Ok(agent),
            Err(e) => e,
        };
        self.refused(request)?;
        tracing::warn!(agent = %peer.spiffe_id, serial = %peer.serial, error = %e, "node API call refused");
        self.audit.note_refusal(
            Event::new(
                &Actor::Spiffe(peer.spiffe_id.to_string()),
                "node.denied",
                call,
            )
            .scope(format!("serial {}", peer.serial))
            .denied(e.to_string()),
        );
        Err(Status::from(e))
    }

    /// An agent's own SVID as the issued-SVID register keeps it (no entry).
    fn agent_svid_record(&self, svid: &crate::identity::AgentSvid) -> IssuedSvidRecord {
        IssuedSvidRecord {
            serial: svid.serial.clone(),
            entry_id: String::new(),
            spiffe_id: svid.spiffe_id.to_string(),
            agent_id: svid.spiffe_id.to_string(),
            ca_slot: self.registry.ca().current().active_slot.clone(),
            issued_at: mayfly_common::clock::unix(self.registry.now()),
            not_after: svid.expires_at,
        }
    }

    fn bundle(&self) -> v1::Bundle {
        let current = self.registry.ca().current();
        convert::bundle(
            self.registry.trust_domain().as_str(),
            &current.bundle,
            REFRESH_HINT,
        )
    }
}

/// What a source that spent its budget of refused calls is told.
fn slowed_down(source: Option<std::net::IpAddr>, wait: std::time::Duration) -> Status {
    let from = source.map_or_else(|| "this address".to_string(), |ip| ip.to_string());
    Status::resource_exhausted(format!(
        "too many refused calls from {from} (a wrong join token or no valid agent SVID); retry in {} s",
        wait.as_secs().max(1)
    ))
}

/// Client certificates already read, by their DER bytes: an agent makes every call on
/// one connection with one certificate, and parsing it cost more than the call's policy
/// decision. What a certificate says depends on its bytes alone, and the TLS handshake
/// has verified it; the store is still asked about the agent at every call.
#[derive(Default)]
struct PeerCache {
    read: std::sync::Mutex<std::collections::HashMap<Vec<u8>, PeerIdentity>>,
}

/// Certificates remembered at most; past it the cache starts again (agents renew their
/// SVIDs, so old ones would otherwise stay forever).
const PEER_CACHE_MAX: usize = 16_384;

impl PeerCache {
    fn caller<T>(&self, request: &Request<T>) -> Result<PeerIdentity, Status> {
        let certs = request.peer_certs().ok_or_else(|| {
            Status::unauthenticated(
                "this call requires the agent's SVID as the TLS client certificate",
            )
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("the client presented no certificate"))?;
        let der = leaf.as_ref();
        if let Some(peer) = self.lock().get(der) {
            return Ok(peer.clone());
        }
        let peer = peer_identity(der)
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        let mut read = self.lock();
        if read.len() >= PEER_CACHE_MAX {
            read.clear();
        }
        read.insert(der.to_vec(), peer.clone());
        Ok(peer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Vec<u8>, PeerIdentity>> {
        self.read
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<v1::SyncMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Node for NodeApi {
    async fn attest(
        &self,
        request: Request<v1::AttestRequest>,
    ) -> Result<Response<v1::AttestResponse>, Status> {
        // A source refused too often waits before its next attempt costs a CSR check.
        let source = request.remote_addr().map(|a| a.ip());
        let now = std::time::Instant::now();
        if let Err(wait) = self.refusals.check(source, now) {
            return Err(slowed_down(source, wait));
        }
        let body = request.into_inner();
        if body.join_token.is_empty() {
            return Err(Status::invalid_argument("join_token is required"));
        }
        let token = crate::identity::token_hash(&body.join_token);
        let presenter = Actor::Unauthenticated(format!("join token {}", &token[..12]));
        let svid = match self.registry.attest(&body.join_token, &body.csr).await {
            Ok(svid) => svid,
            Err(e) => {
                self.refusals.charge(source, now);
                tracing::warn!(error = %e, "attestation refused");
                // One kind per source and reason, whatever token it makes up, so the
                // trail summarises a loop of guesses instead of keeping each.
                let from = Actor::Unauthenticated(source.map_or_else(
                    || "an unknown address".to_string(),
                    |ip| format!("address {ip}"),
                ));
                self.audit.note_refusal(
                    Event::new(&from, "agent.attest", "")
                        .scope(format!("join token sha256:{}", &token[..12]))
                        .denied(e.to_string()),
                );
                return Err(Status::from(e));
            }
        };
        let event = Event::new(&presenter, "agent.attest", svid.spiffe_id.as_str())
            .scope(format!(
                "join token sha256:{} used; serial {}",
                &token[..12],
                svid.serial
            ))
            .ttl_secs(svid.expires_at - mayfly_common::clock::unix(self.registry.now()));
        if let Err(e) = self
            .audit
            .record_issued(event, vec![self.agent_svid_record(&svid)])
            .await
        {
            tracing::error!(error = %e, "attestation not recorded in the audit log");
        }
        self.metrics.svids_signed(SvidKind::X509, 1);
        Ok(Response::new(v1::AttestResponse {
            spiffe_id: svid.spiffe_id.to_string(),
            svid_chain: svid.chain,
            bundle: Some(self.bundle()),
        }))
    }

    async fn renew_agent(
        &self,
        request: Request<v1::RenewAgentRequest>,
    ) -> Result<Response<v1::RenewAgentResponse>, Status> {
        let agent = self.authenticate(&request, "RenewAgent").await?;
        let svid = self
            .registry
            .renew_agent(&agent, &request.into_inner().csr)
            .await?;
        let event = Event::new(
            &Actor::Spiffe(agent.spiffe_id.clone()),
            "agent.renew",
            &agent.spiffe_id,
        )
        .scope(format!("serial {}", svid.serial))
        .ttl_secs(svid.expires_at - mayfly_common::clock::unix(self.registry.now()));
        if let Err(e) = self
            .audit
            .record_issued(event, vec![self.agent_svid_record(&svid)])
            .await
        {
            tracing::error!(error = %e, "agent renewal not recorded in the audit log");
        }
        self.metrics.svids_signed(SvidKind::X509, 1);
        Ok(Response::new(v1::RenewAgentResponse {
            svid_chain: svid.chain,
            bundle: Some(self.bundle()),
        }))
    }

    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<v1::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        // Subscribe before checking the agent and taking the snapshot, so that no change
        // falls in between: an eviction or ban made after the check reaches this stream.
        let subscriptions = sync::Subscriptions::take(self);
        let agent = self.authenticate(&request, "Sync").await?;
        self.open_sync(agent.spiffe_id, subscriptions).await
    }

    async fn sign_svids(
        &self,
        request: Request<v1::SignSvidsRequest>,
    ) -> Result<Response<v1::SignSvidsResponse>, Status> {
        let agent = self.authenticate(&request, "SignSvids").await?;
        let csrs: Vec<(String, Vec<u8>)> = request
            .into_inner()
            .csrs
            .into_iter()
            .map(|c| (c.entry_id, c.csr))
            .collect();
        if csrs.is_empty() {
            return Err(Status::invalid_argument("the batch carries no CSR"));
        }
        let actor = Actor::Spiffe(agent.spiffe_id.clone());
        let count = csrs.len();
        let (signed, committed) = self
            .sign_off_runtime(&agent.spiffe_id, csrs)
            .await?
            .map_err(|e| {
                tracing::warn!(agent = %agent.spiffe_id, error = %e, "signing refused");
                // A policy's denial is on the trail already, with its deciding policies.
                if !matches!(e, IdentityError::PolicyDenied { .. }) {
                    self.audit.note_refusal(
                        Event::new(&actor, "svid.sign", "")
                            .scope(format!("{count} CSRs"))
                            .denied(e.to_string()),
                    );
                }
                Status::from(e)
            })?;
        // The serials are on record before anyone holds them, so a revocation finds them.
        committed.map_err(|e| {
            tracing::error!(error = %e, "signed SVIDs not recorded; refusing to hand them out");
            Status::unavailable("the daemon could not record the signed SVIDs; retry")
        })?;
        tracing::debug!(agent = %agent.spiffe_id, count = signed.len(), "signed SVIDs");
        self.metrics
            .svids_signed(SvidKind::X509, signed.len() as u64);
        Ok(Response::new(v1::SignSvidsResponse {
            svids: signed
                .into_iter()
                .map(|s| v1::SignedSvid {
                    entry_id: s.entry_id,
                    spiffe_id: s.spiffe_id,
                    svid_chain: s.chain,
                    serial: s.issued.serial_hex,
                    expires_at: s.issued.not_after,
                })
                .collect(),
        }))
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<v1::MintJwtSvidRequest>,
    ) -> Result<Response<v1::MintJwtSvidResponse>, Status> {
        let agent = self.authenticate(&request, "MintJwtSvid").await?;
        let body = request.into_inner();
        let actor = Actor::Spiffe(agent.spiffe_id.clone());
        let (spiffe_id, token, expires_at) =
            match self
                .registry
                .mint_jwt(&agent.spiffe_id, &body.entry_id, &body.audience)
            {
                Ok(minted) => minted,
                Err(e) => {
                    if !matches!(e, IdentityError::PolicyDenied { .. }) {
                        self.audit.note_refusal(
                            Event::new(&actor, "jwt.mint", &body.entry_id)
                                .scope(format!("aud {}", body.audience.join(",")))
                                .denied(e.to_string()),
                        );
                    }
                    return Err(e.into());
                }
            };
        self.audit.note(
            Event::new(&actor, "jwt.mint", &spiffe_id)
                .scope(format!("aud {}", body.audience.join(",")))
                .ttl_secs(expires_at - mayfly_common::clock::unix(self.registry.now()))
                .detail(serde_json::json!({ "policy_set": self.registry.policy_set() })),
        );
        self.metrics.svids_signed(SvidKind::Jwt, 1);
        Ok(Response::new(v1::MintJwtSvidResponse {
            spiffe_id,
            token,
            expires_at,
        }))
    }

    async fn ack_revocation(
        &self,
        request: Request<v1::RevocationAck>,
    ) -> Result<Response<v1::RevocationAckResponse>, Status> {
        let peer = self.peers.caller(&request)?;
        let agent = self
            .registry
            .authenticate_banned_agent(&peer)
            .await
            .map_err(Status::from)?;
        let ack = request.into_inner();
        if ack.revocation_id.is_empty() {
            return Err(Status::invalid_argument("revocation_id is required"));
        }
        self.revoker
            .acknowledge(&agent.spiffe_id, &ack)
            .await
            .map_err(super::status::revoke_status)?;
        tracing::info!(agent = %agent.spiffe_id, revocation = %ack.revocation_id, dropped = ack.dropped_serials.len(), removed = ack.files_removed.len(), "revocation acknowledged");
        Ok(Response::new(v1::RevocationAckResponse {}))
    }

    async fn report_denials(
        &self,
        request: Request<v1::DenialReport>,
    ) -> Result<Response<v1::DenialReportResponse>, Status> {
        let agent = self.authenticate(&request, "ReportDenials").await?;
        let report = request.into_inner();
        if report.denials.len() > MAX_DENIALS_PER_REPORT {
            return Err(Status::out_of_range(format!(
                "a report may carry at most {MAX_DENIALS_PER_REPORT} denials; this one has {}",
                report.denials.len()
            )));
        }
        let actor = Actor::Spiffe(agent.spiffe_id.clone());
        // A workload looping on a refused call must not write a record per attempt: the
        // first of each kind is kept, the rest counted into the window's summary.
        for denial in report.denials {
            self.audit.note_refusal(
                Event::new(&actor, "workload.denied", &denial.call)
                    .scope(format!("workload {}", denial.selectors.join(" ")))
                    .denied(denial.reason)
                    .detail(serde_json::json!({ "agent_time_ms": denial.at_ms })),
            );
        }
        if report.dropped > 0 {
            self.audit
                .note(Event::new(&actor, "workload.denied", "").denied(format!(
                    "{} more denials not reported: the agent's queue was full",
                    report.dropped
                )));
        }
        Ok(Response::new(v1::DenialReportResponse {}))
    }

    async fn request_elevation(
        &self,
        request: Request<v1::HolderElevationRequest>,
    ) -> Result<Response<v1::Elevation>, Status> {
        let agent = self.authenticate(&request, "RequestElevation").await?;
        let body = request.into_inner();
        let ask = crate::api::elevation::ask(body.request.unwrap_or_default())?;
        let caller = crate::elevation::Caller::Workload {
            spiffe_id: body.spiffe_id,
            agent: agent.spiffe_id,
        };
        let record = self
            .elevations
            .request(&caller, &ask)
            .await
            .map_err(crate::api::elevation::status)?;
        Ok(Response::new(crate::api::elevation::message(&record, &[])))
    }

    async fn end_elevation(
        &self,
        request: Request<v1::HolderEndElevationRequest>,
    ) -> Result<Response<v1::Elevation>, Status> {
        let agent = self.authenticate(&request, "EndElevation").await?;
        let body = request.into_inner();
        let caller = crate::elevation::Caller::Workload {
            spiffe_id: body.spiffe_id,
            agent: agent.spiffe_id,
        };
        // A workload ends only its own elevations: the engine refuses (and audits) others.
        let record = self
            .elevations
            .end(&caller, &body.id, &body.reason, body.cancel)
            .await
            .map_err(crate::api::elevation::status)?;
        Ok(Response::new(crate::api::elevation::message(&record, &[])))
    }

    async fn issue_credential(
        &self,
        request: Request<v1::IssueCredentialRequest>,
    ) -> Result<Response<v1::IssuedCredential>, Status> {
        let agent = self.authenticate(&request, "IssueCredential").await?;
        let body = request.into_inner();
        if body.name.is_empty() || body.spiffe_id.is_empty() {
            return Err(Status::invalid_argument("name and spiffe_id are required"));
        }
        if body.ttl_seconds < 0 {
            return Err(Status::invalid_argument("ttl_seconds must not be negative"));
        }
        let granted = self
            .broker
            .issue(
                &agent.spiffe_id,
                &body.spiffe_id,
                &body.name,
                std::time::Duration::from_secs(body.ttl_seconds as u64),
            )
            .await?;
        Ok(Response::new(v1::IssuedCredential {
            lease_id: granted.lease.id,
            name: granted.lease.credential,
            kind: granted.kind.to_string(),
            values: granted
                .values
                .into_iter()
                .map(|(key, value)| (key, value.expose().to_string()))
                .collect(),
            issued_at: granted.lease.issued_at,
            expires_at: granted.lease.expires_at,
            notice: granted.notice.unwrap_or_default(),
            facts: Some(granted.facts),
        }))
    }

    async fn renew_credential(
        &self,
        request: Request<v1::RenewCredentialRequest>,
    ) -> Result<Response<v1::RenewedCredential>, Status> {
        let agent = self.authenticate(&request, "RenewCredential").await?;
        let body = request.into_inner();
        if body.lease_id.is_empty() {
            return Err(Status::invalid_argument("lease_id is required"));
        }
        if body.ttl_seconds < 0 {
            return Err(Status::invalid_argument("ttl_seconds must not be negative"));
        }
        let (lease, renewed_at, notice) = self
            .broker
            .renew(
                &agent.spiffe_id,
                &body.lease_id,
                std::time::Duration::from_secs(body.ttl_seconds as u64),
            )
            .await?;
        Ok(Response::new(v1::RenewedCredential {
            lease_id: lease.id,
            renewed_at,
            expires_at: lease.expires_at,
            notice: notice.unwrap_or_default(),
        }))
    }
}

/// The audit record of a signed batch and the serials it issued.
fn issued_records(
    registry: &Registry,
    agent: &str,
    signed: &[SignedSvid],
) -> (Event, Vec<IssuedSvidRecord>) {
    let ca_slot = registry.ca().current().active_slot.clone();
    let issued = signed
        .iter()
        .map(|s| IssuedSvidRecord {
            serial: s.issued.serial_hex.clone(),
            entry_id: s.entry_id.clone(),
            spiffe_id: s.spiffe_id.clone(),
            agent_id: agent.to_owned(),
            ca_slot: ca_slot.clone(),
            issued_at: s.issued.not_before,
            not_after: s.issued.not_after,
        })
        .collect();
    let subjects: std::collections::BTreeSet<&str> =
        signed.iter().map(|s| s.spiffe_id.as_str()).collect();
    let ttl = signed
        .iter()
        .map(|s| s.issued.not_after - s.issued.not_before)
        .max()
        .unwrap_or(0);
    let event = Event::new(
        &Actor::Spiffe(agent.to_owned()),
        "svid.sign",
        subjects.into_iter().collect::<Vec<_>>().join(","),
    )
    .scope(format!("{} X509-SVIDs", signed.len()))
    .ttl_secs(ttl)
    .detail(serde_json::json!({
        "serials": signed
            .iter()
            .map(|s| (s.entry_id.as_str(), s.issued.serial_hex.as_str()))
            .collect::<Vec<_>>(),
        "policy_set": registry.policy_set(),
    }));
    (event, issued)
}
