//! Wiring: the agent's identity, its sync stream, the SVID cache, the credential cache,
//! the Workload API and the operations endpoint, assembled here and nowhere else.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::watch;
use tonic::transport::Channel;

use mayfly_common::svid::parse_pem_certs;
use mayfly_common::tls::TrustBundle;
use mayfly_proto::v1::node_client::NodeClient;
use mayfly_proto::v1::{self};

use crate::attest::node::{self, IdentityFiles, NodeError, NodeIdentity};
use crate::config::AgentConfig;
use crate::credentials::{CredentialCache, CredentialFeed, CredentialIssuer};
use crate::ops::{AgentMetrics, AgentOps, Attestation};
use crate::sinks::runner::SinkProgress;
use crate::sinks::{Sink, SinkRunner};
use crate::state::{Bundle, JwtIssuer, WorkloadState};
use crate::sync::svids::SvidCache;
use crate::sync::{self, Authorized, Backoff, ClientCell, StreamEnd};

/// A started agent.
pub struct RunningAgent {
    pub socket_path: PathBuf,
    pub spiffe_id: String,
    pub state: watch::Receiver<Arc<WorkloadState>>,
    /// Where reloaded sinks go, when the agent runs sinks.
    sinks_reload: Option<watch::Sender<Arc<Vec<Sink>>>>,
    /// The credentials fetched for the sinks and `[exec]`.
    fetched: std::collections::HashSet<crate::credentials::CredentialKey>,
}

impl RunningAgent {
    /// Reloads `path` (the file the agent started with, `started` its text) on request.
    pub fn reloader(&self, path: PathBuf, started: String) -> crate::reload::Reloader {
        crate::reload::Reloader::new(
            path,
            started,
            self.sinks_reload.clone(),
            self.fetched.clone(),
        )
    }
}

/// Where a join token may come from, read again each time the agent must attest.
#[derive(Debug, Clone, Default)]
pub struct TokenSource {
    pub flag: Option<String>,
    pub config: Option<String>,
    pub file: Option<PathBuf>,
}

impl TokenSource {
    fn read(&self) -> Option<String> {
        let from_file = self
            .file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| t.trim().to_string());
        self.flag
            .clone()
            .or_else(|| std::env::var("MAYFLY_JOIN_TOKEN").ok())
            .or(from_file)
            .or_else(|| self.config.clone())
            .filter(|t| !t.is_empty())
    }
}

/// Starts the agent: attests (or reuses the stored identity), then serves the Workload API
/// until `shutdown`. The handle resolves with an error if the agent is banned.
///
/// With `metrics_listen`, the operations endpoint serves from the start: alive at once,
/// ready once attested and synced. The first attestation is retried for as long as the
/// daemon cannot be reached (it may come up after the agent); any other refusal stops
/// the agent.
pub async fn start(
    config: AgentConfig,
    join_token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(RunningAgent, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let files = IdentityFiles::new(&config.data_dir);
    files.check().map_err(anyhow::Error::msg)?;
    let tokens = TokenSource {
        flag: join_token,
        config: config.join_token.clone(),
        file: config.join_token_file.clone(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let (attestation, attestation_rx) = watch::channel(Attestation::Pending(None));
    let metrics = Arc::new(AgentMetrics::new(
        attestation_rx.clone(),
        Arc::new(mayfly_common::clock::SystemClock),
    ));
    if let Some(addr) = config.metrics_listen {
        let listener = mayfly_common::ops::bind(addr).await?;
        tracing::info!(address = %addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(mayfly_common::ops::serve(
            listener,
            Arc::new(AgentOps::new(metrics.clone(), attestation_rx)),
            stop_rx.clone(),
        ));
    }
    let (identity, bundle) = match files.load()? {
        Some((identity, bundle)) if identity.not_after > unix_now() => {
            tracing::info!(agent = %identity.spiffe_id, "reusing the stored agent SVID");
            (identity, bundle)
        }
        _ => attest_first(&config, &files, &tokens, &attestation, stop_rx.clone()).await?,
    };
    let trust = TrustBundle::new(&bundle)?;
    let client = lazy_client(&config, trust.clone(), &identity)?;
    let client: ClientCell = Arc::new(watch::channel(client).0);
    let identity = Arc::new(watch::channel(identity).0);

    let (authorized_tx, authorized_rx) = watch::channel(Authorized::default());
    let authorized_tx = Arc::new(authorized_tx);
    let placeholder = Bundle {
        trust_domain: config.trust_domain.clone(),
        x509_authorities: bundle.clone(),
        jwt_keys: Vec::new(),
        sequence: 0,
    };
    let (state_tx, state_rx) = watch::channel(Arc::new(WorkloadState::empty(placeholder)));
    attestation.send_replace(Attestation::Attested(state_rx.clone()));
    tokio::spawn(
        SvidCache::new(
            config.trust_domain.clone(),
            identity.borrow().spiffe_id.to_string(),
            config.max_csr_batch,
            client.clone(),
            authorized_rx,
            state_tx,
        )
        .run(),
    );

    // Why the agent must stop by itself (banned, a sink that cannot be rendered, the
    // supervised child gone), as the message it ends with.
    let (fatal_tx, mut fatal_rx) = watch::channel(None::<Stop>);
    let credentials = CredentialCache::new(
        Arc::new(DaemonCredentialIssuer {
            client: client.clone(),
        }),
        Arc::new(crate::workload_api::SystemClock),
        state_rx.clone(),
    );
    tokio::spawn(credentials.clone().follow());
    let Started {
        progress,
        sinks_reload,
        fetched,
    } = start_sinks_and_exec(
        &config,
        state_rx.clone(),
        credentials.clone(),
        fatal_tx.clone(),
        metrics.clone(),
    )?;
    let renew_now = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(sync::revocations::acknowledge(
        sync::revocations::Acknowledger {
            client: client.clone(),
            authorized: authorized_tx.clone(),
            state: state_rx.clone(),
            progress: progress.clone(),
            credentials: credentials.progress(),
            identity: identity.subscribe(),
            renew_now: renew_now.clone(),
        },
    ));
    tokio::spawn(sync_loop(
        SyncContext {
            config: config.clone(),
            files: files.clone(),
            tokens,
            trust: trust.clone(),
            client: client.clone(),
            identity: identity.clone(),
            authorized: authorized_tx,
            state: state_rx.clone(),
            progress,
            metrics: metrics.clone(),
        },
        fatal_tx,
    ));
    tokio::spawn(renew_loop(
        config.clone(),
        files.clone(),
        trust.clone(),
        client.clone(),
        identity.clone(),
        renew_now,
    ));

    let (denials, report_denials) = sync::denials::reporter(client.clone());
    tokio::spawn(report_denials);
    let api = crate::workload_api::WorkloadApi::new(
        state_rx.clone(),
        Arc::new(crate::attest::workload::WorkloadAttestor::new()),
        Arc::new(DaemonJwtIssuer {
            client: client.clone(),
        }),
    )
    .with_denials(denials)
    .with_credentials(credentials)
    .with_metrics(metrics)
    .with_limits(config.connection_limits());
    let socket = config.socket_path.clone();
    let listener = crate::workload_api::bind(&socket)?;
    let spiffe_id = identity.borrow().spiffe_id.to_string();
    let mut api_stop = stop_rx.clone();
    let handle = tokio::spawn(async move {
        let served = crate::workload_api::serve_listener(listener, api, async move {
            let _ = api_stop.wait_for(|s| *s).await;
        });
        let mut stop = stop_rx;
        tokio::select! {
            result = served => result.context("Workload API")?,
            _ = stop.wait_for(|s| *s) => {}
            fatal = fatal_rx.wait_for(|f| f.is_some()) => {
                // The supervised child ending well is a normal stop.
                if let Some(Stop::Fatal(why)) = fatal.ok().and_then(|stop| stop.clone()) {
                    anyhow::bail!("{why}");
                }
            }
        }
        Ok(())
    });
    tracing::info!(agent = %spiffe_id, socket = %socket.display(), "mayfly-agent serving the Workload API");
    Ok((
        RunningAgent {
            socket_path: socket,
            spiffe_id,
            state: state_rx,
            sinks_reload,
            fetched,
        },
        handle,
    ))
}

/// Why the agent stops by itself, told through one watch channel by whoever decides it.
#[derive(Debug, Clone)]
enum Stop {
    /// The `[exec]` child exited with 0: the agent's work is done.
    ChildDone,
    /// Something the agent cannot go on without: a sink that cannot be written, a ban,
    /// the supervised child failing.
    Fatal(String),
}

/// What [`start_sinks_and_exec`] started.
#[derive(Default)]
struct Started {
    /// The sinks' progress, when there are sinks.
    progress: Option<watch::Receiver<SinkProgress>>,
    /// Takes reloaded sinks, when there is a sink runner.
    sinks_reload: Option<watch::Sender<Arc<Vec<Sink>>>>,
    /// The credentials fetched for the sinks and `[exec]`.
    fetched: std::collections::HashSet<crate::credentials::CredentialKey>,
}

/// Starts the sinks (with the feed of the credentials they write) and, under `[exec]`,
/// the supervised child once the sinks' first files are written. A sink that cannot be
/// rendered from the first full state stops the agent before anything is written; so
/// does the child's exit (with its code when not 0).
fn start_sinks_and_exec(
    config: &AgentConfig,
    state: watch::Receiver<Arc<WorkloadState>>,
    cache: CredentialCache,
    fatal: watch::Sender<Option<Stop>>,
    metrics: Arc<AgentMetrics>,
) -> anyhow::Result<Started> {
    let sinks = config.checked_sinks().map_err(anyhow::Error::msg)?;
    let spec = config
        .exec
        .as_ref()
        .map(|exec| exec.child_spec(&config.socket_path))
        .transpose()
        .map_err(|e| anyhow::anyhow!("[exec]: {e}"))?;
    if sinks.is_empty() && spec.is_none() {
        return Ok(Started::default());
    }
    let exec_credentials = match &config.exec {
        Some(exec) => exec
            .credential_keys(&config.socket_path)
            .map_err(|e| anyhow::anyhow!("[exec]: {e}"))?,
        None => Vec::new(),
    };
    let (exec_tx, exec_rx) = tokio::sync::mpsc::channel(4);
    let wanted: Vec<_> = sinks
        .iter()
        .flat_map(Sink::credential_keys)
        .chain(exec_credentials.iter().cloned())
        .collect();
    let fetched = wanted.iter().cloned().collect();
    let feed = CredentialFeed::new(cache, wanted);
    let held = feed.subscribe();
    tokio::spawn(feed.run(state.clone()));
    let (sinks_reload, reloaded) = watch::channel(Arc::new(Vec::new()));
    let runner = SinkRunner::new(sinks, spec.is_some().then_some(exec_tx))
        .with_exec_credentials(exec_credentials)
        .with_metrics(metrics)
        .with_reload(reloaded);
    let progress = runner.progress();
    let started = Started {
        progress: Some(progress),
        sinks_reload: Some(sinks_reload),
        fetched,
    };
    let sink_fatal = fatal.clone();
    tokio::spawn(async move {
        if let Err(e) = runner.run(state, held).await {
            tracing::error!(error = %e, "stopping: a sink cannot be written");
            let _ = sink_fatal.send(Some(Stop::Fatal(e.to_string())));
        }
    });
    let Some(spec) = spec else {
        return Ok(started);
    };
    tokio::spawn(async move {
        let program = spec.program.clone();
        let why = match crate::exec::supervise(spec, exec_rx).await {
            Ok(0) => Stop::ChildDone,
            Ok(code) => Stop::Fatal(format!(
                "the supervised child {program} exited with code {code}"
            )),
            Err(e) => Stop::Fatal(format!("[exec]: {e}")),
        };
        let _ = fatal.send(Some(why));
    });
    Ok(started)
}

/// The first attestation, retried with backoff while the daemon cannot be reached, each
/// failure told to `/readyz`; any other error (no join token, the token refused) is final,
/// and so is `stop`.
async fn attest_first(
    config: &AgentConfig,
    files: &IdentityFiles,
    tokens: &TokenSource,
    attestation: &watch::Sender<Attestation>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(NodeIdentity, Vec<Vec<u8>>)> {
    let mut backoff = Backoff::default();
    loop {
        let error = match attest_now(config, files, tokens).await {
            Ok(attested) => return Ok(attested),
            Err(e @ NodeError::Unreachable { .. }) => e,
            Err(e) => return Err(e.into()),
        };
        let delay = backoff.next_delay();
        tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "cannot attest yet; retrying");
        attestation.send_replace(Attestation::Pending(Some(error.to_string())));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => anyhow::bail!("stopped before the agent could attest: {error}"),
        }
    }
}

async fn attest_now(
    config: &AgentConfig,
    files: &IdentityFiles,
    tokens: &TokenSource,
) -> Result<(NodeIdentity, Vec<Vec<u8>>), NodeError> {
    let token = tokens.read().ok_or(NodeError::NoJoinToken)?;
    let bootstrap = match &config.trust_bundle_path {
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|source| NodeError::Io {
                path: path.clone(),
                source,
            })?;
            parse_pem_certs(&pem)?
        }
        None => files.stored_bundle().ok_or(NodeError::NoBootstrapBundle)?,
    };
    let (identity, bundle) = node::attest(
        &config.daemon_address,
        &config.trust_domain,
        &bootstrap,
        &token,
    )
    .await?;
    files.save(&identity, &bundle.x509_authorities)?;
    tracing::info!(agent = %identity.spiffe_id, serial = %identity.serial, "attested to the daemon");
    Ok((identity, bundle.x509_authorities))
}

fn lazy_client(
    config: &AgentConfig,
    trust: TrustBundle,
    identity: &NodeIdentity,
) -> anyhow::Result<NodeClient<Channel>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let chain = identity
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_pkcs8.to_vec()));
    let tls = mayfly_common::tls::client_config(
        mayfly_common::tls::server_id(&config.trust_domain)?,
        trust,
        Some((chain, key)),
    )?;
    let channel = mayfly_common::tls::connect_lazy(&config.daemon_address, tls)?;
    Ok(NodeClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// What the sync loop works with.
struct SyncContext {
    config: AgentConfig,
    files: IdentityFiles,
    tokens: TokenSource,
    trust: TrustBundle,
    client: ClientCell,
    identity: Arc<watch::Sender<NodeIdentity>>,
    authorized: Arc<watch::Sender<Authorized>>,
    state: watch::Receiver<Arc<WorkloadState>>,
    progress: Option<watch::Receiver<SinkProgress>>,
    metrics: Arc<AgentMetrics>,
}

async fn sync_loop(context: SyncContext, fatal: watch::Sender<Option<Stop>>) {
    let SyncContext {
        config,
        files,
        tokens,
        trust,
        client,
        identity,
        authorized,
        state,
        progress,
        metrics,
    } = context;
    let mut backoff = Backoff::default();
    let save_files = files.clone();
    let on_bundle = move |bundle: &v1::Bundle| {
        if let Err(e) = save_files.save_bundle(&bundle.x509_authorities) {
            tracing::warn!(error = %e, "could not store the new bundle");
        }
    };
    loop {
        let mut current = client.borrow().clone();
        let started = std::time::Instant::now();
        match sync::follow(&mut current, &authorized, &trust, &on_bundle, &metrics).await {
            StreamEnd::Broken(reason) => {
                if started.elapsed() > Duration::from_secs(5) {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, "sync stream lost; serving cached SVIDs");
                tokio::time::sleep(delay).await;
            }
            StreamEnd::Banned(reason) => {
                tracing::error!(%reason, "this agent is banned; removing what it held, then stopping");
                // Nothing it held may outlive it: sinks remove or blank their files, and
                // the ban's revocation is acknowledged, before the agent goes.
                authorized.send_modify(|a| {
                    a.revoked_ids
                        .extend(a.entries.values().map(|e| e.spiffe_id.clone()));
                    a.entries.clear();
                    a.secrets.clear();
                    a.revoked_all = true;
                });
                sync::revocations::settle(
                    &authorized,
                    &state,
                    progress.as_ref(),
                    Duration::from_secs(5),
                )
                .await;
                let _ = files.clear();
                let _ = fatal.send(Some(Stop::Fatal(format!(
                    "the daemon banned this agent: {reason}"
                ))));
                return;
            }
            StreamEnd::Evicted(reason) => {
                tracing::warn!(%reason, "the daemon no longer accepts this agent; re-attesting");
                let _ = files.clear();
                loop {
                    match attest_now(&config, &files, &tokens).await {
                        Ok((fresh, bundle)) => {
                            let _ = trust.replace(&bundle);
                            match lazy_client(&config, trust.clone(), &fresh) {
                                Ok(new_client) => {
                                    client.send_replace(new_client);
                                    identity.send_replace(fresh);
                                    backoff.reset();
                                    break;
                                }
                                Err(e) => tracing::error!(error = %e, "building the client failed"),
                            }
                        }
                        Err(e) => {
                            let delay = backoff.next_delay().max(Duration::from_secs(1));
                            tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "re-attestation failed; supply a new join token");
                            tokio::time::sleep(delay).await;
                        }
                    }
                }
            }
        }
    }
}

/// Renews the agent's own SVID at half-life (or at once when told: its CA is tainted)
/// and swaps the client to the new one.
async fn renew_loop(
    config: AgentConfig,
    files: IdentityFiles,
    trust: TrustBundle,
    client: ClientCell,
    identity: Arc<watch::Sender<NodeIdentity>>,
    renew_now: Arc<tokio::sync::Notify>,
) {
    let mut changes = identity.subscribe();
    loop {
        let current = changes.borrow_and_update().clone();
        let due = mayfly_common::svid::renewal_due(current.not_before, current.not_after, 0.5);
        let wait = Duration::from_secs((due - unix_now()).max(0) as u64);
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            _ = tokio::time::sleep(wait) => {}
            _ = renew_now.notified() => {
                tracing::warn!("the CA behind this agent's SVID is tainted; renewing it now");
            }
        }
        let mut active = client.borrow().clone();
        match node::renew(&mut active, &current).await {
            Ok((renewed, bundle)) => {
                let _ = trust.replace(&bundle.x509_authorities);
                if let Err(e) = files.save(&renewed, &bundle.x509_authorities) {
                    tracing::error!(error = %e, "could not store the renewed agent SVID");
                }
                match lazy_client(&config, trust.clone(), &renewed) {
                    Ok(new_client) => {
                        client.send_replace(new_client);
                        tracing::info!(serial = %renewed.serial, "renewed the agent SVID");
                        identity.send_replace(renewed);
                    }
                    Err(e) => tracing::error!(error = %e, "building the renewed client failed"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent SVID renewal failed; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// JWT-SVIDs come from the daemon, which holds the signing key.
struct DaemonJwtIssuer {
    client: ClientCell,
}

#[tonic::async_trait]
impl JwtIssuer for DaemonJwtIssuer {
    async fn mint(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, i64), tonic::Status> {
        let mut client = self.client.borrow().clone();
        let minted = client
            .mint_jwt_svid(v1::MintJwtSvidRequest {
                entry_id: entry_id.to_string(),
                audience: audience.to_vec(),
            })
            .await?
            .into_inner();
        Ok((minted.token, minted.expires_at))
    }
}

/// Credentials come from the daemon, which holds the backends' admin access.
struct DaemonCredentialIssuer {
    client: ClientCell,
}

#[tonic::async_trait]
impl CredentialIssuer for DaemonCredentialIssuer {
    async fn issue(
        &self,
        request: v1::IssueCredentialRequest,
    ) -> Result<v1::IssuedCredential, tonic::Status> {
        let mut client = self.client.borrow().clone();
        Ok(client.issue_credential(request).await?.into_inner())
    }

    async fn renew(
        &self,
        request: v1::RenewCredentialRequest,
    ) -> Result<v1::RenewedCredential, tonic::Status> {
        let mut client = self.client.borrow().clone();
        Ok(client.renew_credential(request).await?.into_inner())
    }

    async fn request_elevation(
        &self,
        request: v1::HolderElevationRequest,
    ) -> Result<v1::Elevation, tonic::Status> {
        let mut client = self.client.borrow().clone();
        Ok(client.request_elevation(request).await?.into_inner())
    }

    async fn end_elevation(
        &self,
        request: v1::HolderEndElevationRequest,
    ) -> Result<v1::Elevation, tonic::Status> {
        let mut client = self.client.borrow().clone();
        Ok(client.end_elevation(request).await?.into_inner())
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
