//! `mayflyd dev`: a throwaway daemon and an agent beside it on a temporary data_dir, like
//! `vault server -dev`, with an entry for the invoking user. Runs until Ctrl-C.

use std::future::Future;

use anyhow::Context;

use mayfly_agent::config::AgentConfig;
use mayfly_proto::TrustDomain;
use mayfly_proto::svid::bundle_pem;

use mayfly_proto::v1;

use crate::cli::{Connection, DevArgs, OutputFormat, operator};
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
    let mut config = DaemonConfig::dev(dir.path().join("daemon"), trust_domain.clone());
    config.node_listen = args.node_listen;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let daemon_stop = wait_for(stop_rx.clone());
    let (daemon, daemon_handle) = server::start(config, daemon_stop).await?;

    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let node_id = format!("spiffe://{trust_domain}/node/dev");
    let workload_id = format!("spiffe://{trust_domain}/dev/uid-{uid}");
    // Through the admin socket, as an operator would: the token and the entry are on the
    // audit trail like any operator change.
    let mut admin = operator::connect(&Connection {
        socket: Some(daemon.admin_socket.clone()),
        config: None,
        output: OutputFormat::Json,
    })
    .await?;
    let token = admin
        .generate_join_token(v1::GenerateJoinTokenRequest {
            spiffe_id: node_id.clone(),
            ttl: 600,
        })
        .await
        .context("creating the dev agent's join token")?
        .into_inner();
    admin
        .create_entry(v1::CreateEntryRequest {
            spiffe_id: workload_id.clone(),
            parent_id: node_id.clone(),
            selectors: vec![format!("unix:uid:{uid}")],
            hint: "dev".into(),
            ..v1::CreateEntryRequest::default()
        })
        .await
        .context("creating the dev entry")?;
    let registry = &daemon.registry;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let bootstrap = agent_dir.join("bootstrap-bundle.pem");
    std::fs::write(
        &bootstrap,
        bundle_pem(&registry.ca().current().bundle.x509_authorities),
    )?;
    let mut agent_config = AgentConfig::dev(
        trust_domain.clone(),
        daemon.node_addr.to_string(),
        agent_dir.clone(),
    );
    agent_config.trust_bundle_path = Some(bootstrap);
    let (agent, agent_handle) =
        mayfly_agent::run::start(agent_config, Some(token.token), wait_for(stop_rx)).await?;
    // Any local user may reach the socket; what it gets depends on who it is.
    let _ = std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    );
    let _ = std::fs::set_permissions(
        &agent_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    );

    let socket = agent.socket_path.display();
    let admin = daemon.admin_socket.display();
    println!(
        "\nMayfly dev mode is running (data in {dir}, deleted on exit).\n\n  \
         trust domain:         {trust_domain}\n  \
         node API:             {node}\n  \
         admin socket:         {admin}\n  \
         Workload API socket:  {socket}\n  \
         agent:                {agent_id}\n  \
         entry for uid {uid}:   {workload_id}\n\n\
         Try, in another shell:\n\n  \
         export SPIFFE_ENDPOINT_SOCKET=unix://{socket}\n  \
         export MAYFLY_ADMIN_SOCKET={admin}\n  \
         cargo run --release --bin mayfly-agent -- api fetch x509\n  \
         cargo run --release --bin mayfly-agent -- api fetch jwt --audience demo\n  \
         cargo run --release --bin mayflyd -- entry list\n  \
         cargo run --release --bin mayflyd -- entry create --spiffe-id spiffe://{trust_domain}/web \\\n      \
         --parent-id {node_id} --selector unix:uid:{uid}\n\n\
         Press Ctrl-C to stop.\n",
        dir = dir.path().display(),
        node = daemon.node_addr,
        agent_id = agent.spiffe_id,
    );
    shutdown.await;
    let _ = stop_tx.send(true);
    agent_handle.await.context("agent task")??;
    daemon_handle.await.context("daemon task")??;
    drop(dir);
    Ok(())
}

async fn wait_for(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
