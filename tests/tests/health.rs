//! The operations endpoints of both programs, scraped over 127.0.0.1 as a prober would:
//! `/healthz` answers while the process serves, `/readyz` only once it can do its job
//! (the agent: attested and synced; the daemon: its datastore answers), and `/metrics`
//! counts what the agent serves.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};

use mayfly_tests::bench::http1::{Conn, LoopbackAddr};
use mayfly_tests::harness::{DaemonOptions, DaemonProcess, binary, free_port, init};
use mayfly_tests::pg::TestDatabase;

/// One GET over a fresh connection; `None` while nothing listens.
async fn get(addr: &str, path: &str) -> Option<(StatusCode, String)> {
    let addr = LoopbackAddr::parse(&format!("http://{addr}")).unwrap();
    let mut conn = Conn::connect(&addr, Vec::new()).await.ok()?;
    let (status, body) = conn.send(Method::GET, path, Bytes::new()).await.ok()?;
    Some((status, String::from_utf8(body.to_vec()).unwrap()))
}

/// Polls `GET path` until `wanted` holds for its answer, failing with the last answer.
async fn until(
    addr: &str,
    path: &str,
    timeout: Duration,
    wanted: impl Fn(StatusCode, &str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = get(addr, path).await;
        if let Some((status, body)) = &answer
            && wanted(*status, body)
        {
            return body.clone();
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} on {addr}: last answer {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One sample of a scrape, by its full name with labels.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// A `mayfly-agent run` started by hand, so that it may start before its daemon listens;
/// killed on drop.
struct Agent {
    child: Child,
    socket: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Agent {
    /// Starts an agent for `daemon` (running or not) with its bootstrap bundle PEM and a
    /// join token, serving its operations endpoint on `metrics`.
    fn start(
        dir: &Path,
        daemon: &DaemonProcess,
        bundle_pem: &str,
        token: &str,
        metrics: &str,
    ) -> Self {
        let bundle = dir.join("bootstrap.pem");
        std::fs::write(&bundle, bundle_pem).unwrap();
        std::fs::write(dir.join("token"), token).unwrap();
        let socket = dir.join("api.sock");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"{td}\"\ndaemon_address = \"{addr}\"\ntrust_bundle_path = \"{bundle}\"\n\
                 join_token_file = \"{token}\"\ndata_dir = \"{data}\"\nsocket_path = \"{sock}\"\n\
                 metrics_listen = \"{metrics}\"\n",
                td = daemon.trust_domain,
                addr = daemon.node_addr,
                bundle = bundle.display(),
                token = dir.join("token").display(),
                data = dir.join("data").display(),
                sock = socket.display(),
            ),
        )
        .unwrap();
        let log = dir.join("agent.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary("mayfly-agent").unwrap())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "debug,h2=info,hyper=info,rustls=info")
            .env_remove("MAYFLY_JOIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self { child, socket, log }
    }

    fn fetch_x509(&self) -> std::process::Output {
        Command::new(binary("mayfly-agent").unwrap())
            .args(["api", "fetch", "x509", "--socket"])
            .arg(&self.socket)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_alive_at_once_and_ready_once_attested_and_synced() {
    init();
    let mut daemon = DaemonProcess::start(DaemonOptions {
        metrics: true,
        ..DaemonOptions::default()
    })
    .unwrap();
    let daemon_ops = daemon.metrics_addr.clone().unwrap();
    assert_eq!(
        get(&daemon_ops, "/healthz").await,
        Some((StatusCode::OK, "ok\n".into()))
    );
    assert_eq!(
        get(&daemon_ops, "/readyz").await,
        Some((StatusCode::OK, "ready\n".into()))
    );
    let node = "spiffe://example.org/node/health";
    daemon
        .create_entry("spiffe://example.org/web", node, "unix:uid:0", &[])
        .unwrap();

    // The agent starts while nothing listens on the daemon's port.
    let dir = tempfile::tempdir().unwrap();
    let ops = format!("127.0.0.1:{}", free_port());
    let bundle = daemon.cli_ok(&["bundle", "show"]).unwrap();
    let token = daemon.join_token(node).unwrap();
    daemon.kill();
    let agent = Agent::start(dir.path(), &daemon, &bundle, &token, &ops);
    until(&ops, "/healthz", Duration::from_secs(30), |status, body| {
        status == StatusCode::OK && body == "ok\n"
    })
    .await;
    let waiting = until(&ops, "/readyz", Duration::from_secs(30), |status, body| {
        status == StatusCode::SERVICE_UNAVAILABLE && body.contains("cannot reach the daemon")
    })
    .await;
    assert!(
        waiting.starts_with("not ready: not attested to the daemon yet: "),
        "{waiting}"
    );
    assert_eq!(waiting.lines().count(), 1, "one line: {waiting:?}");
    let before = get(&ops, "/metrics").await.unwrap().1;
    assert_eq!(sample(&before, "mayfly_agent_sync_connected"), Some(0.0));
    assert_eq!(sample(&before, "mayfly_agent_svids_cached"), Some(0.0));

    // The daemon comes up: the agent attests on its next try and takes its state in.
    daemon.spawn().unwrap();
    until(&ops, "/readyz", Duration::from_secs(30), |status, _| {
        status == StatusCode::OK
    })
    .await;
    assert_eq!(
        get(&ops, "/readyz").await,
        Some((StatusCode::OK, "ready\n".into()))
    );

    let fetch = "mayfly_agent_workload_api_requests_total{method=\"FetchX509SVID\",code=\"OK\"}";
    let text = until(&ops, "/metrics", Duration::from_secs(30), |_, text| {
        sample(text, "mayfly_agent_svids_cached") == Some(1.0)
    })
    .await;
    assert_eq!(sample(&text, fetch), None, "no call yet:\n{text}");
    assert_eq!(sample(&text, "mayfly_agent_sync_connected"), Some(1.0));
    assert_eq!(sample(&text, "mayfly_agent_sync_lag_seconds"), Some(0.0));
    let expiry = sample(&text, "mayfly_agent_svid_earliest_expiry_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry > now && expiry < now + 2.0 * 3600.0,
        "{expiry} vs {now}"
    );

    let out = agent.fetch_x509();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    let text = get(&ops, "/metrics").await.unwrap().1;
    assert_eq!(sample(&text, fetch), Some(1.0), "{text}");
    assert!(
        text.contains("# TYPE mayfly_agent_workload_api_requests_total counter"),
        "{text}"
    );

    // The daemon going away again leaves the agent ready (it serves what it holds), and
    // says so on the sync gauges.
    daemon.kill();
    let text = until(&ops, "/metrics", Duration::from_secs(30), |_, text| {
        sample(text, "mayfly_agent_sync_connected") == Some(0.0)
    })
    .await;
    assert!(
        sample(&text, "mayfly_agent_sync_lag_seconds").is_some(),
        "{text}"
    );
    assert_eq!(get(&ops, "/readyz").await.unwrap().0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_is_not_ready_without_its_datastore() {
    init();
    let db = TestDatabase::create().await.unwrap();
    let daemon = DaemonProcess::start(DaemonOptions {
        metrics: true,
        datastore_url: db.url.clone(),
        ..DaemonOptions::default()
    })
    .unwrap();
    let ops = daemon.metrics_addr.clone().unwrap();
    assert_eq!(
        get(&ops, "/readyz").await,
        Some((StatusCode::OK, "ready\n".into()))
    );
    let (status, text) = get(&ops, "/metrics").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains("# TYPE mayfly_svids_signed_total counter"),
        "{text}"
    );

    // The database goes away under the daemon (its connections are terminated with it).
    db.drop_database().await.unwrap();
    let why = until(&ops, "/readyz", Duration::from_secs(20), |status, _| {
        status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(why.starts_with("not ready: the datastore "), "{why}");
    assert_eq!(why.lines().count(), 1, "one line: {why:?}");
    assert!(!why.contains("password"), "{why}");
    // Alive all the same: restarting it would not bring the database back.
    assert_eq!(
        get(&ops, "/healthz").await,
        Some((StatusCode::OK, "ok\n".into()))
    );
}
