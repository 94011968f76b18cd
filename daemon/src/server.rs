//! Wiring: opens the store, starts the CA and the rotation engine, and serves the node and
//! admin APIs (and the operations endpoint: metrics, health, readiness, when configured) until shutdown. Everything the daemon runs is assembled here and nowhere else.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};

use mayfly_proto::v1::admin_server::AdminServer;
use mayfly_proto::v1::node_server::NodeServer;

use crate::api::admin::{AdminApi, operator::OperatorLayer};
use crate::api::{node::NodeApi, tls};
use crate::audit::{Actor, Audit, Event};
use crate::ca::manager::CaManager;
use crate::config::DaemonConfig;
use crate::creds::Broker;
use crate::fsutil;
use crate::health::DaemonHealth;
use crate::identity::{Clock, Registry, SystemClock};
use crate::metrics::Metrics;
use crate::policy::PolicyEngine;
use crate::revoke::Revoker;
use crate::secrets::engine::{LeaseSettings, RotationEngine};
use crate::secrets::local::SealingKey;
use crate::store::Store;
use crate::visibility::Visibility;

/// A daemon that has bound its sockets and is serving.
pub struct Daemon {
    pub node_addr: SocketAddr,
    pub admin_socket: PathBuf,
    /// Where the metrics endpoint listens, when it does.
    pub metrics_addr: Option<SocketAddr>,
    pub registry: Arc<Registry>,
    pub secrets: Arc<RotationEngine>,
}

/// Starts everything and returns once both APIs are listening; serving continues until
/// `shutdown` resolves, after which the returned join handle completes.
pub async fn start(
    config: DaemonConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(Daemon, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // First, so that a policy set that does not validate stops the daemon before it
    // changes anything.
    let policy = PolicyEngine::load(config.policy.clone(), clock.clone())
        .map_err(|e| anyhow::anyhow!("loading the policies: {}", e.problems().join("\n  ")))?;
    // Checked before it is chmodded: a data_dir of another user's, or one under a
    // directory others may write, could hold a sealing key an attacker planted.
    if let Ok(meta) = std::fs::metadata(&config.data_dir) {
        use std::os::unix::fs::MetadataExt;
        let me = crate::sys::effective_uid();
        anyhow::ensure!(
            meta.uid() == me,
            "data_dir {} is owned by uid {}, not by this daemon (uid {me}): another user could \
             have planted keys there; use a directory of this user's",
            config.data_dir.display(),
            meta.uid()
        );
    }
    fsutil::ensure_private_dir(&config.data_dir, 0o700)
        .with_context(|| format!("data_dir {}", config.data_dir.display()))?;
    fsutil::check_private_dir(&config.data_dir, crate::sys::effective_uid())
        .map_err(|why| anyhow::anyhow!("data_dir: {why}"))?;
    check_key_files(&config.data_dir)?;
    let url = Some(config.datastore_url.as_str()).filter(|u| !u.is_empty());
    let store = Store::connect(url, &config.data_dir)
        .await
        .context("opening the datastore")?;
    let sealing =
        Arc::new(SealingKey::load_or_create(&config.data_dir).context("loading the secrets key")?);
    check_sealing_key(&store, &sealing, &config.data_dir, clock.now()).await?;
    let ca = Arc::new(
        CaManager::start(
            store.clone(),
            &config.data_dir,
            sealing.clone(),
            config.trust_domain.clone(),
            config.ca.ttl,
            clock.now(),
        )
        .await
        .context("starting the CA")?,
    );
    tokio::spawn(ca.clone().follow(clock.clone(), Duration::from_secs(1)));
    let audit = Audit::start(store.clone(), clock.clone())
        .await
        .context("opening the audit log")?;
    let metrics = Arc::new(Metrics::default());
    let lease = LeaseSettings {
        holder: config.scheduler.holder(&config.data_dir),
        ttl: config.scheduler.lease_ttl,
        renewal: config.scheduler.lease_renewal,
    };
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(mayfly_common::ops::bind(addr).await?),
        None => None,
    };
    let secrets = RotationEngine::start(
        store.clone(),
        sealing.clone(),
        &config.secrets,
        lease,
        clock.clone(),
        metrics.clone(),
        audit.clone(),
    )
    .await
    .context("starting the rotation engine")?;
    let policy = Arc::new(policy.with_audit(audit.clone()));
    policy
        .clone()
        .reload_on_sighup()
        .context("watching SIGHUP for policy reloads")?;
    let registry = Arc::new(
        Registry::load(store.clone(), ca.clone(), &config, clock.clone())
            .await?
            .with_policy(policy.clone()),
    );
    // What each agent may see, decided by the policies: one view for every caller.
    let view = Visibility::new(registry.entries(), secrets.definitions(), policy.clone());
    let broker = Broker::start(
        store.clone(),
        sealing,
        &config.credentials,
        view.clone(),
        audit.clone(),
        clock.clone(),
        config.trust_domain.as_str(),
    )
    .await
    .context("starting the credential broker")?;
    let revoker = Arc::new(Revoker::new(
        registry.clone(),
        secrets.clone(),
        broker.clone(),
        audit.clone(),
        view.clone(),
    ));
    if store.backend() == crate::store::Backend::Postgres {
        // Other daemons on the datastore: their changes reach the agents connected here.
        tokio::spawn(
            crate::cluster::Cluster {
                registry: registry.clone(),
                revoker: revoker.clone(),
                secrets: secrets.clone(),
            }
            .follow(),
        );
    }
    let elevations = crate::elevation::Elevations::start(
        store.clone(),
        registry.clone(),
        secrets.clone(),
        policy.clone(),
        broker.clone(),
        revoker.clone(),
        view.clone(),
        audit.clone(),
        clock.clone(),
        config.elevation.clone(),
        crate::elevation::notify::Notifier::start(&config.notify)
            .map_err(|e| anyhow::anyhow!(e))?,
    );
    audit.note(
        Event::new(&Actor::Daemon, "daemon.start", config.trust_domain.as_str())
            .scope(format!("node API {}", config.node_listen)),
    );

    // Issued-SVID and deny-list lines are needed only until the certificates expire.
    let prune_store = store.clone();
    let prune_clock = clock.clone();
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            timer.tick().await;
            let now = mayfly_common::clock::unix(prune_clock.now());
            if let Err(e) = prune_store.prune_issued_svids(now).await {
                tracing::warn!(error = %e, "could not prune expired issued SVIDs");
            }
            if let Err(e) = prune_store.prune_revoked_serials(now).await {
                tracing::warn!(error = %e, "could not prune the deny list");
            }
        }
    });

    let tick_ca = ca.clone();
    let tick_clock = clock.clone();
    let interval = config.ca.rotation_check_interval;
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(interval);
        loop {
            timer.tick().await;
            if let Err(e) = tick_ca.tick(tick_clock.now()).await {
                tracing::error!(error = %e, "CA rotation check failed");
            }
        }
    });

    let listener = TcpListener::bind(config.node_listen)
        .await
        .with_context(|| format!("binding the node API on {}", config.node_listen))?;
    let node_addr = listener.local_addr()?;
    let tls_config = tls::server_config(
        registry.clone(),
        tls::ServingNames::new(&config.server_names, node_addr),
    )?;
    let node_incoming = ReceiverStream::new(tls::incoming(listener, tls_config));

    let admin_listener = bind_admin_socket(&config.admin_socket)?;
    let elevation_path = config.elevation_socket();
    let elevation_listener = bind_elevation_socket(&elevation_path)?;

    let node_service = NodeServer::new(
        NodeApi::new(
            registry.clone(),
            secrets.clone(),
            broker.clone(),
            metrics.clone(),
            audit.clone(),
            revoker.clone(),
            view.clone(),
            elevations.clone(),
        )
        .context("starting the signing threads")?,
    )
    .max_decoding_message_size(config.max_message_bytes);
    let blast = Arc::new(crate::blast::BlastRadius::new(
        view.clone(),
        broker.clone(),
        store.clone(),
        policy.clone(),
        clock.clone(),
        config.elevation.ai_agent_set.clone(),
    ));
    tokio::spawn(crate::metrics::track_blast_radius(
        blast.clone(),
        metrics.clone(),
    ));
    let admin_service = AdminServer::new(
        AdminApi::new(
            registry.clone(),
            secrets.clone(),
            broker.clone(),
            audit.clone(),
            revoker.clone(),
            policy.clone(),
        )
        .with_blast_radius(blast),
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics_addr = match metrics_listener {
        Some(listener) => {
            let addr = listener.local_addr()?;
            let health = DaemonHealth::new(metrics, store.clone(), ca.clone(), clock.clone());
            tokio::spawn(mayfly_common::ops::serve(
                listener,
                Arc::new(health),
                stop_rx.clone(),
            ));
            Some(addr)
        }
        None => None,
    };
    let mut node_stop = stop_rx.clone();
    let mut elevation_stop = stop_rx.clone();
    let mut admin_stop = stop_rx;
    let node = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(node_service)
        .serve_with_incoming_shutdown(node_incoming, async move {
            let _ = node_stop.wait_for(|stop| *stop).await;
        });
    // Every admin call passes the operator check first, whichever method it names.
    let admin = tonic::transport::Server::builder()
        .layer(OperatorLayer::new(audit.clone(), policy.clone()))
        .add_service(admin_service)
        .serve_with_incoming_shutdown(UnixListenerStream::new(admin_listener), async move {
            let _ = admin_stop.wait_for(|stop| *stop).await;
        });
    // Every local user may reach this one; each call is decided for the caller's uid.
    let elevation = tonic::transport::Server::builder()
        .add_service(
            mayfly_proto::v1::elevations_server::ElevationsServer::new(
                crate::api::elevation::ElevationApi::new(elevations),
            )
            .max_decoding_message_size(64 * 1024),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(elevation_listener), async move {
            let _ = elevation_stop.wait_for(|stop| *stop).await;
        });
    let admin_path = config.admin_socket.clone();
    let closing = registry.clone();
    let stepping_down = secrets.clone();
    let handle = tokio::spawn(async move {
        tokio::spawn(async move {
            shutdown.await;
            stepping_down.step_down().await;
            closing.close();
            let _ = stop_tx.send(true);
        });
        let (node, admin, elevation) = tokio::join!(node, admin, elevation);
        let _ = std::fs::remove_file(&admin_path);
        let _ = std::fs::remove_file(&elevation_path);
        node.context("node API")?;
        admin.context("admin API")?;
        elevation.context("elevation API")?;
        Ok(())
    });
    tracing::info!(node_api = %node_addr, admin_socket = %config.admin_socket.display(), metrics = ?metrics_addr, trust_domain = %config.trust_domain, "mayflyd serving");
    Ok((
        Daemon {
            node_addr,
            admin_socket: config.admin_socket.clone(),
            metrics_addr,
            registry,
            secrets,
        },
        handle,
    ))
}

/// Binds the admin socket so that it is never, even briefly, reachable by others.
fn bind_admin_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "admin socket {} is in use: is another mayflyd running?",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    // Created 0600 from the start: no moment when another user could connect.
    let bound = crate::sys::with_umask(0o177, || UnixListener::bind(path));
    let listener = bound.with_context(|| format!("binding the admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Binds the elevation socket, which every local user may reach (mode 0666): who the
/// caller is comes from the socket's peer credentials, what it may do from the policies.
fn bind_elevation_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "elevation socket {} is in use: is another mayflyd running?",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the elevation socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Tells systemd (Type=notify) that the daemon is ready, when run under it.
pub fn notify_ready() {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let path = PathBuf::from(&socket);
    let result = if let Some(abstract_name) = socket.to_string_lossy().strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// Refuses to start with a sealing key other than the one the datastore's sealed rows
/// (CA keys, local secrets, definitions) were sealed with: every daemon on one datastore
/// shares `secrets.key`. The first daemon on a datastore records a value sealed with its
/// key; every later one must open it.
async fn check_sealing_key(
    store: &Store,
    sealing: &SealingKey,
    data_dir: &std::path::Path,
    now: std::time::SystemTime,
) -> anyhow::Result<()> {
    const CONTEXT: &str = "mayfly-sealing-check";
    let candidate = sealing
        .seal(CONTEXT, CONTEXT.as_bytes())
        .map_err(|e| anyhow::anyhow!("sealing the check value: {e}"))?;
    let stored = store
        .sealing_check(&candidate, mayfly_common::clock::unix(now))
        .await
        .context("reading the datastore's sealing check")?;
    match sealing.open(CONTEXT, &stored) {
        Ok(plain) if plain.as_slice() == CONTEXT.as_bytes() => Ok(()),
        _ => anyhow::bail!(
            "{} is not the sealing key this datastore's CA keys and secrets are sealed with: \
             every daemon on one datastore shares it; copy secrets.key (0600) from a daemon \
             already running on this datastore into {}",
            data_dir.join("secrets.key").display(),
            data_dir.display()
        ),
    }
}

/// Refuses key files in `data_dir` (the sealing key, CA keys an older version left in
/// `ca/`) that another user owns or may read or write, naming each and what to do.
fn check_key_files(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let me = crate::sys::effective_uid();
    let mut keys = vec![data_dir.join("secrets.key")];
    if let Ok(dir) = std::fs::read_dir(data_dir.join("ca")) {
        keys.extend(dir.flatten().map(|e| e.path()));
    }
    for key in keys {
        fsutil::check_private_file(&key, me).map_err(|why| anyhow::anyhow!("{why}"))?;
    }
    Ok(())
}
