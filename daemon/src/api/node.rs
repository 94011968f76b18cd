//! The node API agents call over mTLS: attestation, renewal, the sync stream and batched
//! signing. Every call but `Attest` is authenticated by the agent SVID and re-checked
//! against the store, so an evicted agent is refused at once.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use mayfly_proto::tls::{PeerIdentity, peer_identity};
use mayfly_proto::v1::node_server::Node;
use mayfly_proto::v1::{self, sync_message::Update};

use super::convert;
use crate::identity::{Change, Registry};
use crate::metrics::{Metrics, SvidKind};
use crate::secrets::engine::RotationEngine;
use crate::store::AgentRecord;

/// Bundle refresh hint sent to agents, in seconds.
const REFRESH_HINT: i64 = 300;

pub struct NodeApi {
    registry: Arc<Registry>,
    secrets: Arc<RotationEngine>,
    metrics: Arc<Metrics>,
}

impl NodeApi {
    pub fn new(
        registry: Arc<Registry>,
        secrets: Arc<RotationEngine>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            registry,
            secrets,
            metrics,
        }
    }

    /// Secrets granted to any SPIFFE ID this agent serves, with the IDs they go to.
    fn granted(&self, agent: &str) -> Vec<(String, Vec<String>)> {
        let ids: std::collections::BTreeSet<String> = self
            .registry
            .entries_for(agent)
            .iter()
            .map(|e| e.spiffe_id.clone())
            .collect();
        self.secrets
            .specs()
            .into_iter()
            .filter_map(|spec| {
                let to: Vec<String> = spec
                    .grants
                    .iter()
                    .filter(|g| ids.contains(*g) || g.as_str() == agent)
                    .cloned()
                    .collect();
                (!to.is_empty()).then_some((spec.name, to))
            })
            .collect()
    }

    async fn secret_version(
        &self,
        name: &str,
        granted_to: Vec<String>,
    ) -> Option<v1::GrantedSecret> {
        match self.secrets.current(name).await {
            Ok(Some((version, credential))) => Some(v1::GrantedSecret {
                name: name.to_string(),
                version,
                username: credential.username,
                value: credential.password.expose().as_bytes().to_vec(),
                granted_to,
            }),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(secret = %name, error = %e, "could not read a granted secret for an agent");
                None
            }
        }
    }

    async fn granted_secrets(&self, agent: &str) -> Vec<v1::GrantedSecret> {
        let mut out = Vec::new();
        for (name, to) in self.granted(agent) {
            if let Some(version) = self.secret_version(&name, to).await {
                out.push(version);
            }
        }
        out
    }

    async fn authenticate<T>(&self, request: &Request<T>) -> Result<AgentRecord, Status> {
        let peer = caller(request)?;
        self.registry.authenticate_agent(&peer).await.map_err(|e| {
            tracing::warn!(agent = %peer.spiffe_id, serial = %peer.serial, error = %e, "node API call refused");
            Status::from(e)
        })
    }

    fn bundle(&self) -> v1::Bundle {
        let current = self.registry.ca().current();
        convert::bundle(
            self.registry.trust_domain().as_str(),
            &current.bundle,
            REFRESH_HINT,
        )
    }

    async fn full_state(&self, agent: &str) -> v1::SyncMessage {
        v1::SyncMessage {
            update: Some(Update::FullState(v1::FullState {
                entries: self
                    .registry
                    .entries_for(agent)
                    .iter()
                    .map(|e| convert::entry(e))
                    .collect(),
                bundle: Some(self.bundle()),
                secrets: self.granted_secrets(agent).await,
            })),
        }
    }
}

fn caller<T>(request: &Request<T>) -> Result<PeerIdentity, Status> {
    let certs = request.peer_certs().ok_or_else(|| {
        Status::unauthenticated("this call requires the agent's SVID as the TLS client certificate")
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("the client presented no certificate"))?;
    peer_identity(leaf.as_ref())
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<v1::SyncMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Node for NodeApi {
    async fn attest(
        &self,
        request: Request<v1::AttestRequest>,
    ) -> Result<Response<v1::AttestResponse>, Status> {
        let body = request.into_inner();
        if body.join_token.is_empty() {
            return Err(Status::invalid_argument("join_token is required"));
        }
        let svid = self
            .registry
            .attest(&body.join_token, &body.csr)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "attestation refused");
                Status::from(e)
            })?;
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
        let agent = self.authenticate(&request).await?;
        let svid = self
            .registry
            .renew_agent(&agent, &request.into_inner().csr)
            .await?;
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
        let agent = self.authenticate(&request).await?;
        let agent_id = agent.spiffe_id.clone();
        // Subscribe before taking the snapshot so no change falls between the two.
        let mut changes = self.registry.subscribe_changes();
        let mut authorities = self.registry.ca().subscribe();
        let mut closing = self.registry.closing();
        let mut promoted = self.secrets.subscribe();
        let (tx, rx) = mpsc::channel(256);
        tx.send(Ok(self.full_state(&agent_id).await))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;
        let registry = self.registry.clone();
        let api = NodeApi::new(registry.clone(), self.secrets.clone(), self.metrics.clone());
        let connected = self.metrics.agent_connected();
        tokio::spawn(async move {
            let _connected = connected;
            tracing::debug!(agent = %agent_id, "sync stream open");
            loop {
                let message = tokio::select! {
                    _ = tx.closed() => break,
                    _ = async { let _ = closing.wait_for(|c| *c).await; } => break,
                    change = changes.recv() => match change {
                        Ok(Change::EntryUpserted(entry)) if entry.parent_id == agent_id => {
                            Update::EntryUpserted(convert::entry(&entry))
                        }
                        Ok(Change::EntryDeleted { id, parent_id }) if parent_id == agent_id => {
                            Update::EntryDeleted(id)
                        }
                        Ok(Change::AgentEvicted { spiffe_id, banned, reason })
                            if spiffe_id == agent_id =>
                        {
                            let _ = tx
                                .send(Ok(v1::SyncMessage {
                                    update: Some(Update::Evicted(v1::AgentEvicted { reason, banned })),
                                }))
                                .await;
                            break;
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // Missed changes: resend everything rather than guess.
                            match api.full_state(&agent_id).await.update {
                                Some(update) => update,
                                None => continue,
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    promotion = promoted.recv() => match promotion {
                        Ok(p) => {
                            let Some((_, to)) = api.granted(&agent_id).into_iter().find(|(n, _)| *n == p.secret) else {
                                continue;
                            };
                            match api.secret_version(&p.secret, to).await {
                                Some(version) => Update::SecretUpdated(version),
                                None => continue,
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            match api.full_state(&agent_id).await.update {
                                Some(update) => update,
                                None => continue,
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    changed = authorities.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        Update::BundleChanged(api.bundle())
                    }
                };
                if tx
                    .send(Ok(v1::SyncMessage {
                        update: Some(message),
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            tracing::debug!(agent = %agent_id, "sync stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn sign_svids(
        &self,
        request: Request<v1::SignSvidsRequest>,
    ) -> Result<Response<v1::SignSvidsResponse>, Status> {
        let agent = self.authenticate(&request).await?;
        let csrs: Vec<(String, Vec<u8>)> = request
            .into_inner()
            .csrs
            .into_iter()
            .map(|c| (c.entry_id, c.csr))
            .collect();
        if csrs.is_empty() {
            return Err(Status::invalid_argument("the batch carries no CSR"));
        }
        let signed = self
            .registry
            .sign_batch(&agent.spiffe_id, &csrs)
            .map_err(|e| {
                tracing::warn!(agent = %agent.spiffe_id, error = %e, "signing refused");
                Status::from(e)
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
        let agent = self.authenticate(&request).await?;
        let body = request.into_inner();
        let (spiffe_id, token, expires_at) =
            self.registry
                .mint_jwt(&agent.spiffe_id, &body.entry_id, &body.audience)?;
        self.metrics.svids_signed(SvidKind::Jwt, 1);
        Ok(Response::new(v1::MintJwtSvidResponse {
            spiffe_id,
            token,
            expires_at,
        }))
    }
}
