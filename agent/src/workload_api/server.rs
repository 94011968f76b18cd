//! The Workload API's Unix socket: binding it (open to every local process, since identity
//! comes from the kernel's peer credentials, not from who may connect) and serving it until
//! shutdown, ending open streams so that shutdown does not wait on them forever.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::workload_api::error::ServeError;
use crate::workload_api::{PeerCredentials, WorkloadApi, grpc, writers};

/// Any local process may connect: the Workload API decides what to give from the caller's
/// attested selectors, and an unregistered caller gets nothing.
const SOCKET_MODE: u32 = 0o777;

/// Binds the Workload API socket at `socket_path`: creates the parent directory if missing,
/// replaces a stale socket file left by a previous run, and refuses to steal the socket of a
/// running agent. Must be called inside a Tokio runtime.
pub fn bind(socket_path: &Path) -> Result<UnixListener, ServeError> {
    let socket_error = |source| ServeError::Socket {
        path: socket_path.to_owned(),
        source,
    };
    if let Some(dir) = socket_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(socket_error)?;
    }
    if socket_path.exists() {
        if std::os::unix::net::UnixStream::connect(socket_path).is_ok() {
            return Err(ServeError::SocketInUse(socket_path.to_owned()));
        }
        std::fs::remove_file(socket_path).map_err(socket_error)?;
    }
    let listener = UnixListener::bind(socket_path).map_err(socket_error)?;
    // Accepted connections inherit it: what a client writes carries its writer's pid.
    crate::sys::pass_credentials(std::os::fd::AsRawFd::as_raw_fd(&listener))
        .map_err(socket_error)?;
    std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(socket_error)?;
    Ok(listener)
}

/// Serves `api` on a listener from [`bind`] until `shutdown` completes. Then no new
/// connection is accepted, open streams end with `Unavailable` (clients reconnect to the
/// next agent), in-flight unary calls are let finish, and every connection is told to go
/// away; this returns once all of them have closed.
pub async fn serve_listener(
    listener: UnixListener,
    api: WorkloadApi,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let closing = api.closing_handle();
    let limits = api.limits();
    let api = Arc::new(api);
    let http2 = http2_settings();
    let open_by_uid: Arc<std::sync::Mutex<HashMap<u32, usize>>> = Arc::default();
    let refused_note = std::sync::Mutex::new(std::collections::HashSet::<u32>::new());
    // Each connection task holds a sender; recv() returns None once every one is gone.
    let (open_tx, mut all_closed) = mpsc::channel::<Infallible>(1);
    let mut shutdown = pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let peer = peer_credentials(&stream);
                    // One uid (or everyone together) holding too many connections open
                    // would leave the agent out of descriptors for registered workloads,
                    // its sinks and its daemon: beyond the cap a connection is closed at
                    // once, before it costs more than the accept.
                    let uid = peer.as_ref().map_or(u32::MAX, |p| p.uid);
                    let Some(slot) = ConnectionSlot::take(&open_by_uid, uid, limits) else {
                        let mut noted = refused_note.lock().unwrap_or_else(|p| p.into_inner());
                        if noted.insert(uid) {
                            tracing::warn!(uid, per_uid = limits.per_uid, total = limits.total, "Workload API connection refused: too many open (logged once per uid)");
                        }
                        drop(stream);
                        continue;
                    };
                    tokio::spawn(serve_connection(
                        &http2,
                        stream,
                        peer,
                        api.clone(),
                        closing.subscribe(),
                        open_tx.clone(),
                        slot,
                        limits.first_request,
                    ));
                }
                Err(e) => {
                    // Out of descriptors or a connection reset before it was accepted: the
                    // listener itself is fine, so keep serving the workloads already here.
                    tracing::warn!(error = %e, "accepting a Workload API connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    closing.send_replace(true);
    drop(open_tx);
    let _ = all_closed.recv().await;
    Ok(())
}

/// How long the accept loop pauses after a failed accept (EMFILE would otherwise spin).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Caps on open Workload API connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Per peer uid.
    pub per_uid: usize,
    /// All uids together.
    pub total: usize,
    /// A connection that has sent no request by then (its HTTP/2 preface included) is
    /// closed: an idle connection holds a descriptor and gives nothing.
    pub first_request: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            per_uid: 1024,
            total: 16_384,
            first_request: Duration::from_secs(10),
        }
    }
}

/// One open connection counted against its uid; released when dropped.
struct ConnectionSlot {
    open: Arc<std::sync::Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl ConnectionSlot {
    fn take(
        open: &Arc<std::sync::Mutex<HashMap<u32, usize>>>,
        uid: u32,
        limits: ConnectionLimits,
    ) -> Option<Self> {
        let mut counts = open.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = counts.values().sum();
        let mine = counts.get(&uid).copied().unwrap_or(0);
        if mine >= limits.per_uid || total >= limits.total {
            return None;
        }
        *counts.entry(uid).or_insert(0) += 1;
        Some(Self {
            open: open.clone(),
            uid,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// HTTP/2 as a local gRPC server needs it: request bodies are a few hundred bytes, so small
/// flow-control windows bound what a workload can make the agent buffer; no HPACK table
/// for what workloads send (a workload sends one or two header blocks per connection, and
/// the table would otherwise hold them for as long as the connection lives); and no `date`
/// header (gRPC has no use for it).
fn http2_settings() -> http2::Builder<TokioExecutor> {
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .initial_stream_window_size(REQUEST_WINDOW)
        .initial_connection_window_size(REQUEST_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .header_table_size(0)
        .auto_date_header(false);
    http2
}

/// Flow-control window for what workloads send: room for the largest request and more.
const REQUEST_WINDOW: u32 = 2 * grpc::MAX_REQUEST_BYTES as u32;

/// Request headers are a path, a content type and a few short metadata values.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

type HandlerFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<grpc::GrpcBody>, Infallible>> + Send>>;

/// The workload's credentials, read once when it connects.
fn peer_credentials(stream: &UnixStream) -> Option<PeerCredentials> {
    match stream.peer_cred() {
        Ok(cred) => Some(PeerCredentials::from_ucred(&cred)),
        Err(e) => {
            tracing::warn!(error = %e, "no peer credentials on a Workload API connection");
            None
        }
    }
}

/// Drives one workload's connection until it closes, or until `closing` turns true: then
/// the connection is told to go away and closes once its calls have ended. `open` is
/// dropped when it has.
///
/// Both the connection and each call's handler are boxed: a task is as large as the future
/// it runs for as long as it runs, so an inline handler would be paid for by every open
/// stream long after it returned, and an inline connection would be laid out twice.
#[allow(clippy::too_many_arguments)]
fn serve_connection(
    http2: &http2::Builder<TokioExecutor>,
    stream: UnixStream,
    peer: Option<PeerCredentials>,
    api: Arc<WorkloadApi>,
    mut closing: watch::Receiver<bool>,
    open: mpsc::Sender<Infallible>,
    slot: ConnectionSlot,
    first_request: Duration,
) -> impl Future<Output = ()> + Send + 'static {
    let connected = api.metrics().workload_connected();
    let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asked_here = asked.clone();
    let (stream, other_writer) = writers::WatchedStream::new(stream, peer.and_then(|p| p.pid));
    let service = service_fn(move |request| -> HandlerFuture {
        let api = api.clone();
        asked_here.store(true, std::sync::atomic::Ordering::Relaxed);
        // A request whose connection another process wrote to is not the connecting
        // process's to make: attestation refuses it.
        let peer = peer.map(|p| PeerCredentials {
            written_by: other_writer.get(),
            ..p
        });
        Box::pin(async move { Ok(grpc::handle(&api, peer, request).await) })
    });
    let mut connection = Box::pin(http2.serve_connection(TokioIo::new(stream), service));
    async move {
        let _open = open;
        let _connected = connected;
        let _slot = slot;
        let idle = async {
            tokio::time::sleep(first_request).await;
            if asked.load(std::sync::atomic::Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = async { let _ = closing.wait_for(|closing| *closing).await; } => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            () = idle => {
                tracing::debug!(?first_request, "Workload API connection closed: no request in time");
                return;
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "Workload API connection ended with an error");
        }
    }
}

/// Binds `socket_path` (see [`bind`]) and serves `api` on it until `shutdown` completes;
/// the socket file is removed on the way out.
pub async fn serve(
    socket_path: &Path,
    api: WorkloadApi,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let listener = bind(socket_path)?;
    tracing::info!(socket = %socket_path.display(), "Workload API serving");
    let result = serve_listener(listener, api, shutdown).await;
    // Best effort: a leftover file is replaced by the next bind anyway.
    let _ = std::fs::remove_file(socket_path);
    result
}
