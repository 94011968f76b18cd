//! `mayflyd dev`: a throwaway daemon on a temporary data_dir, like `vault server -dev`, and
//! the real `mayfly-agent` binary beside it as a child process, with an entry for the
//! invoking user made through the admin socket. Runs until Ctrl-C. The daemon does not
//! link the agent: dev mode runs the binary that sits next to `mayflyd` (and, under
//! `cargo run`, builds it first, so the README's first command stays one command).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use mayfly_common::TrustDomain;
use mayfly_common::svid::bundle_pem;
use mayfly_proto::v1;

use crate::cli::{Connection, DevArgs, OutputFormat, operator};
use crate::config::DaemonConfig;
use crate::server;

/// How long the agent may take to attest and open its Workload API socket.
const AGENT_START: Duration = Duration::from_secs(60);

pub async fn run(
    args: DevArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let trust_domain = TrustDomain::new(&args.trust_domain)
        .with_context(|| format!("--trust-domain {}", args.trust_domain))?;
    let agent_binary = agent_binary().await?;
    let dir = tempfile::Builder::new()
        .prefix("mayfly-dev-")
        .tempdir()
        .context("creating a temporary data_dir")?;
    let mut config = DaemonConfig::dev(dir.path().join("daemon"), trust_domain.clone());
    config.node_listen = args.node_listen;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let daemon_stop = wait_for(stop_rx);
    let (daemon, daemon_handle) = server::start(config, daemon_stop).await?;

    let uid = crate::sys::uid();
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

    let agent_dir = dir.path().join("agent");
    let socket = agent_dir.join("api.sock");
    write_agent_config(
        &agent_dir,
        &trust_domain,
        &daemon.node_addr.to_string(),
        &bundle_pem(&daemon.registry.ca().current().bundle.x509_authorities),
        &token.token,
    )?;
    let mut agent = start_agent(&agent_binary, &agent_dir, &socket).await?;
    // Any local user may reach the socket; what it gets depends on who it is.
    let _ = std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    );
    let _ = std::fs::set_permissions(
        &agent_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    );

    let admin_path = daemon.admin_socket.display();
    println!(
        "\nMayfly dev mode is running (data in {dir}, deleted on exit).\n\n  \
         trust domain:         {trust_domain}\n  \
         node API:             {node}\n  \
         admin socket:         {admin_path}\n  \
         Workload API socket:  {socket}\n  \
         agent:                {node_id}\n  \
         entry for uid {uid}:   {workload_id}\n\n\
         Try, in another shell:\n\n  \
         export SPIFFE_ENDPOINT_SOCKET=unix://{socket}\n  \
         export MAYFLY_ADMIN_SOCKET={admin_path}\n  \
         cargo run --release --bin mayfly-agent -- api fetch x509\n  \
         cargo run --release --bin mayfly-agent -- api fetch jwt --audience demo\n  \
         cargo run --release --bin mayflyd -- entry list\n  \
         cargo run --release --bin mayflyd -- entry create --spiffe-id spiffe://{trust_domain}/web \\\n      \
         --parent-id {node_id} --selector unix:uid:{uid}\n\n\
         Press Ctrl-C to stop.\n",
        dir = dir.path().display(),
        node = daemon.node_addr,
        socket = socket.display(),
    );
    tokio::select! {
        () = shutdown => {}
        status = agent.wait() => {
            tracing::error!(status = ?status.ok(), "the dev agent exited; stopping");
        }
    }
    stop_agent(&mut agent).await;
    let _ = stop_tx.send(true);
    daemon_handle.await.context("daemon task")??;
    drop(dir);
    Ok(())
}

/// The `mayfly-agent` to run. Outside cargo: the one beside this executable (`cargo build
/// --bins` or a package put it there). Under `cargo run`, which holds the lock on its
/// target directory while mayflyd runs, a `cargo build` of the agent in that directory
/// would wait forever; it is built into a directory of its own under `target/`
/// (`dev-agent/`) in the same profile, so a fresh checkout needs only the one command and
/// an edited agent is rebuilt on the next run.
async fn agent_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding mayflyd's own path")?;
    let dir = exe.parent().context("mayflyd's directory")?;
    // `cargo run` names the package it runs; a test binary's children see their own.
    let under_cargo_run = std::env::var("CARGO_PKG_NAME").is_ok_and(|p| p == "mayfly-daemon");
    let (Ok(cargo), Ok(manifest_dir), true, Some(target_dir), Some(profile)) = (
        std::env::var("CARGO"),
        std::env::var("CARGO_MANIFEST_DIR"),
        under_cargo_run,
        dir.parent(),
        dir.file_name().and_then(|n| n.to_str()),
    ) else {
        let agent = dir.join("mayfly-agent");
        if !agent.exists() {
            bail!(
                "{} is missing: dev mode runs the agent binary that sits beside mayflyd \
                 (`cargo build --bins`, or start dev mode with `cargo run --bin mayflyd -- dev`)",
                agent.display()
            );
        }
        return Ok(agent);
    };
    let own_dir = target_dir.join("dev-agent");
    eprintln!(
        "mayflyd dev: building mayfly-agent into {} (the first time takes a few minutes)",
        own_dir.display()
    );
    let mut build = Command::new(cargo);
    build
        .current_dir(manifest_dir)
        .args([
            "build",
            "-p",
            "mayfly-agent",
            "--bin",
            "mayfly-agent",
            "--target-dir",
        ])
        .arg(&own_dir);
    match profile {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    let status = build
        .stdin(Stdio::null())
        .status()
        .await
        .context("running cargo build for mayfly-agent")?;
    if !status.success() {
        bail!("cargo build --bin mayfly-agent failed ({status})");
    }
    Ok(own_dir.join(profile).join("mayfly-agent"))
}

/// agent.toml, its bootstrap bundle and its join token (0600: the token is a credential).
fn write_agent_config(
    agent_dir: &Path,
    trust_domain: &TrustDomain,
    daemon_address: &str,
    bundle: &str,
    token: &str,
) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(agent_dir)?;
    let bundle_path = agent_dir.join("bootstrap-bundle.pem");
    std::fs::write(&bundle_path, bundle)?;
    let token_path = agent_dir.join("join-token");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&token_path)?;
    std::io::Write::write_all(&mut file, token.as_bytes())?;
    let config = format!(
        "trust_domain = \"{trust_domain}\"\n\
         daemon_address = \"{daemon_address}\"\n\
         trust_bundle_path = {bundle}\n\
         join_token_file = {token}\n\
         data_dir = {data}\n\
         socket_path = {socket}\n",
        bundle = toml_path(&bundle_path),
        token = toml_path(&token_path),
        data = toml_path(&agent_dir.join("data")),
        socket = toml_path(&agent_dir.join("api.sock")),
    );
    std::fs::write(agent_dir.join("agent.toml"), config)?;
    Ok(())
}

/// A path as a TOML string, quoted and escaped.
fn toml_path(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

/// Starts the agent and waits until its Workload API socket answers.
async fn start_agent(binary: &Path, agent_dir: &Path, socket: &Path) -> anyhow::Result<Child> {
    let mut child = Command::new(binary)
        .arg("run")
        .arg("--config")
        .arg(agent_dir.join("agent.toml"))
        .env_remove("MAYFLY_JOIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + AGENT_START;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the dev agent exited before serving ({status}); its log is above");
        }
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            bail!(
                "the dev agent did not open {} within {AGENT_START:?}",
                socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, as an operator's service manager would, then a kill if it lingers.
async fn stop_agent(agent: &mut Child) {
    if let Some(pid) = agent.id() {
        let _ = crate::sys::kill(pid as i32, libc::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .is_err()
    {
        let _ = agent.kill().await;
    }
}

async fn wait_for(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
