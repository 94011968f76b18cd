//! The node agent end to end: a real daemon, real agents, and workloads using the `spiffe`
//! crate (a Workload API client nobody here wrote) and the agent's own `api` client.

use std::time::{Duration, Instant};

use futures::StreamExt;
use spiffe::{SpiffeId, WorkloadApiClient};

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, init};

const NODE: &str = "spiffe://example.org/node/web-1";

fn create_entry(daemon: &DaemonProcess, spiffe_id: &str, uid: u32, extra: &[&str]) -> String {
    let selector = format!("unix:uid:{uid}");
    daemon
        .create_entry(spiffe_id, NODE, &selector, extra)
        .unwrap()
}

async fn client(agent: &AgentProcess) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap()
}

/// Polls until the workload's X.509 context satisfies `check` (SVIDs are signed
/// asynchronously after an entry appears).
async fn eventually_x509<F>(agent: &AgentProcess, what: &str, check: F) -> spiffe::X509Context
where
    F: Fn(&spiffe::X509Context) -> bool,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    let api = client(agent).await;
    loop {
        if let Ok(context) = api.fetch_x509_context().await
            && check(&context)
        {
            return context;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\nagent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ids(context: &spiffe::X509Context) -> Vec<String> {
    let mut ids: Vec<String> = context
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_workload_gets_x509_and_jwt_svids_through_the_spiffe_crate() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    create_entry(
        &daemon,
        "spiffe://example.org/web",
        0,
        &["--dns", "web.internal"],
    );
    let agent = AgentProcess::start(&daemon, NODE).unwrap();

    let context = eventually_x509(&agent, "the web SVID", |c| !c.svids().is_empty()).await;
    assert_eq!(ids(&context), vec!["spiffe://example.org/web"]);
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    assert!(
        context.bundle_set().get(&td).is_some(),
        "bundle for the trust domain"
    );

    let api = client(&agent).await;
    let jwt = api.fetch_jwt_svid(["audience-a"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/web");
    let validated = api
        .validate_jwt_token("audience-a", jwt.token())
        .await
        .unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    assert!(
        api.validate_jwt_token("someone-else", jwt.token())
            .await
            .is_err()
    );
    let by_id = SpiffeId::new("spiffe://example.org/web").unwrap();
    api.fetch_jwt_svid(["audience-b"], Some(&by_id))
        .await
        .unwrap();
    let bundles = api.fetch_jwt_bundles().await.unwrap();
    assert!(bundles.get(&td).is_some());

    // The operator client shows the same identity and writes files.
    let out_dir = agent.dir.path().join("fetched");
    let out = agent
        .api(
            &["fetch", "x509", "--write", out_dir.to_str().unwrap()],
            None,
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/web"));
    let key = std::fs::read_to_string(out_dir.join("svid.0.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
}

#[tokio::test]
async fn streams_follow_new_deleted_and_rotated_svids_without_restarts() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    // A short TTL so the agent renews (at half-life ±10%) within the test.
    create_entry(
        &daemon,
        "spiffe://example.org/web",
        0,
        &["--x509-ttl", "6s"],
    );
    let agent = AgentProcess::start(&daemon, NODE).unwrap();
    eventually_x509(&agent, "first SVID", |c| !c.svids().is_empty()).await;

    let api = client(&agent).await;
    let mut stream = Box::pin(api.stream_x509_contexts().await.unwrap());
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an update within 10 s")
            .expect("stream open")
            .expect("a valid context")
    };
    let first = next().await;
    assert_eq!(ids(&first), vec!["spiffe://example.org/web"]);
    let first_serial = first.svids()[0].leaf().as_ref().to_vec();

    let db = create_entry(&daemon, "spiffe://example.org/db", 0, &[]);
    let mut saw_both = false;
    let mut saw_rotation = false;
    for _ in 0..10 {
        let update = next().await;
        let now = ids(&update);
        if now.len() == 2 {
            saw_both = true;
        }
        if let Some(web) = update
            .svids()
            .iter()
            .find(|s| s.spiffe_id().to_string() == "spiffe://example.org/web")
            && web.leaf().as_ref() != first_serial.as_slice()
        {
            saw_rotation = true;
        }
        if saw_both && saw_rotation {
            break;
        }
    }
    assert!(saw_both, "the new entry's SVID reached the open stream");
    assert!(saw_rotation, "the rotated SVID reached the open stream");

    daemon.cli_ok(&["entry", "delete", &db]).unwrap();
    let mut gone = false;
    for _ in 0..5 {
        if ids(&next().await) == vec!["spiffe://example.org/web"] {
            gone = true;
            break;
        }
    }
    assert!(gone, "the deleted entry's SVID left the stream");
}

#[tokio::test]
async fn workloads_under_different_uids_get_different_identities() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    create_entry(&daemon, "spiffe://example.org/root-app", 0, &[]);
    create_entry(&daemon, "spiffe://example.org/nobody-app", 65534, &[]);
    let agent = AgentProcess::start(&daemon, NODE).unwrap();
    eventually_x509(&agent, "root's SVID", |c| !c.svids().is_empty()).await;

    let as_root = eventually_x509(&agent, "root's SVID", |c| c.svids().len() == 1).await;
    assert_eq!(ids(&as_root), vec!["spiffe://example.org/root-app"]);

    let deadline = Instant::now() + Duration::from_secs(10);
    let nobody = loop {
        let out = agent
            .api(&["fetch", "x509", "--json"], Some(65534))
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        nobody.contains("spiffe://example.org/nobody-app"),
        "{nobody}"
    );
    assert!(!nobody.contains("root-app"), "{nobody}");

    let stranger = agent.api(&["fetch", "x509"], Some(65533)).unwrap();
    assert!(!stranger.status.success());
    let stderr = String::from_utf8_lossy(&stranger.stderr);
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
}

#[tokio::test]
async fn the_agent_rides_out_a_daemon_restart_and_resyncs() {
    init();
    let mut daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    create_entry(&daemon, "spiffe://example.org/web", 0, &[]);
    let agent = AgentProcess::start(&daemon, NODE).unwrap();
    eventually_x509(&agent, "first SVID", |c| !c.svids().is_empty()).await;

    // A graceful stop ends the agents' sync streams instead of waiting on them.
    let status = daemon.terminate(Duration::from_secs(10)).unwrap();
    assert!(
        status.success(),
        "mayflyd exits cleanly on SIGTERM: {status}"
    );
    let cached = client(&agent).await.fetch_x509_context().await.unwrap();
    assert_eq!(
        ids(&cached),
        vec!["spiffe://example.org/web"],
        "served from cache"
    );

    daemon.spawn().unwrap();
    create_entry(&daemon, "spiffe://example.org/db", 0, &[]);
    let resynced = eventually_x509(&agent, "resync after restart", |c| c.svids().len() == 2).await;
    assert_eq!(
        ids(&resynced),
        vec!["spiffe://example.org/db", "spiffe://example.org/web"]
    );
}

#[tokio::test]
async fn a_restarted_agent_needs_no_new_join_token() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    create_entry(&daemon, "spiffe://example.org/web", 0, &[]);
    let mut agent = AgentProcess::start(&daemon, NODE).unwrap();
    eventually_x509(&agent, "first SVID", |c| !c.svids().is_empty()).await;

    agent.kill();
    // The token was single-use; the agent must come back on its stored SVID alone.
    std::fs::write(agent.dir.path().join("token"), "").unwrap();
    agent.spawn().unwrap();
    eventually_x509(&agent, "SVID after restart", |c| !c.svids().is_empty()).await;
    let agents = daemon.cli_json(&["agent", "list"]).unwrap();
    assert_eq!(agents.as_array().unwrap().len(), 1);
    assert_eq!(agents[0]["status"], "active");
}

#[tokio::test]
async fn a_banned_agent_stops_and_an_evicted_one_needs_a_new_token() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    create_entry(&daemon, "spiffe://example.org/web", 0, &[]);
    let mut agent = AgentProcess::start(&daemon, NODE).unwrap();
    eventually_x509(&agent, "first SVID", |c| !c.svids().is_empty()).await;

    // Evicted: the agent re-attests with whatever token its token file now holds.
    std::fs::write(
        agent.dir.path().join("token"),
        daemon.join_token(NODE).unwrap(),
    )
    .unwrap();
    let before = daemon.cli_json(&["agent", "list"]).unwrap()[0]["serial"].clone();
    daemon.cli_ok(&["agent", "evict", NODE]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = daemon.cli_json(&["agent", "list"]).unwrap()[0].clone();
        if now["status"] == "active" && now["serial"] != before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not re-attest:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    daemon.cli_ok(&["agent", "ban", NODE]).unwrap();
    let status = agent.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(!status.success(), "a banned agent exits with an error");
    assert!(agent.log().contains("banned"));
}
