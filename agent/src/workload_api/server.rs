//! The Workload API's Unix socket: binding it (open to every local process, since identity
//! comes from the kernel's peer credentials, not from who may connect) and serving it until
//! shutdown, ending open streams so that shutdown does not wait on them forever.

use std::future::Future;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use mayfly_proto::v1::workload_secrets_server::WorkloadSecretsServer;
use mayfly_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;

use crate::workload_api::WorkloadApi;
use crate::workload_api::error::ServeError;

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
    std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(socket_error)?;
    Ok(listener)
}

/// Serves `api` on a listener from [`bind`] until `shutdown` completes. Open streams are
/// then ended with `Unavailable` (clients reconnect to the next agent) and in-flight unary
/// calls are let finish.
pub async fn serve_listener(
    listener: UnixListener,
    api: WorkloadApi,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let closing = api.closing_handle();
    let api = std::sync::Arc::new(api);
    tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::from_arc(api.clone()))
        .add_service(WorkloadSecretsServer::from_arc(api))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            shutdown.await;
            closing.send_replace(true);
        })
        .await?;
    Ok(())
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
