//! `mayflyd dev`: a throwaway daemon on a temporary data_dir, like `vault server -dev`.
//! Prints how to reach it and what to try, then runs until Ctrl-C.

use std::future::Future;

use anyhow::Context;

use mayfly_proto::TrustDomain;

use crate::cli::DevArgs;
use crate::config::DaemonConfig;
use crate::server;

pub async fn run(
    args: DevArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let trust_domain = TrustDomain::new(&args.trust_domain)
        .with_context(|| format!("--trust-domain {}", args.trust_domain))?;
    let dir = tempfile::Builder::new()
        .prefix("mayfly-dev-")
        .tempdir()
        .context("creating a temporary data_dir")?;
    let mut config = DaemonConfig::dev(dir.path().to_path_buf(), trust_domain.clone());
    config.node_listen = args.node_listen;
    let (daemon, handle) = server::start(config, shutdown).await?;
    let socket = daemon.admin_socket.display();
    println!(
        "\nMayfly dev daemon is running (data in {dir}, deleted on exit).\n\n  \
         trust domain:  {td}\n  node API:      {node}\n  admin socket:  {socket}\n\n\
         Try, in another shell:\n\n  \
         export MAYFLY_ADMIN_SOCKET={socket}\n  \
         cargo run --release --bin mayflyd -- token generate --spiffe-id spiffe://{td}/node/dev\n  \
         cargo run --release --bin mayflyd -- entry create --spiffe-id spiffe://{td}/app \\\n      \
         --parent-id spiffe://{td}/node/dev --selector unix:uid:{uid}\n  \
         cargo run --release --bin mayflyd -- entry list\n  \
         cargo run --release --bin mayflyd -- bundle show\n\n\
         Press Ctrl-C to stop.\n",
        dir = dir.path().display(),
        td = trust_domain,
        node = daemon.node_addr,
        // SAFETY: getuid has no preconditions and cannot fail.
        uid = unsafe { libc::getuid() },
    );
    handle.await.context("daemon task")??;
    drop(dir);
    Ok(())
}
