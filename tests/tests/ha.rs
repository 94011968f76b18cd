//! Several daemons on one PostgreSQL datastore: each scheduled rotation runs on exactly one
//! of them, a manual rotation on a follower never runs beside the leader's, and killing
//! the leader hands the scheduler (and its unfinished job) to the survivor. Also what a
//! daemon reports on its metrics endpoint, failed rotations first.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection as _, Row as _};

use mayfly_tests::harness::{DaemonOptions, DaemonProcess, init};
use mayfly_tests::pg::TestDatabase;

fn define(daemon: &DaemonProcess, toml: &str) -> Value {
    daemon.define_secret(toml).unwrap()
}

const LEADER: &str = "mayfly_scheduler_leader";

/// Polls `check` until it holds, failing the test after `timeout`.
async fn eventually(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A rotation job as the datastore holds it.
#[derive(Debug)]
struct Job {
    token: String,
    state: String,
    trigger: String,
    scheduled_for: Option<i64>,
    claimed_by: String,
    created_at: i64,
}

async fn jobs(url: &str) -> Vec<Job> {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let rows = sqlx::query(
        "SELECT token, state, trigger_kind, scheduled_for, claimed_by, created_at \
         FROM rotation_jobs ORDER BY created_at, token",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    rows.iter()
        .map(|r| Job {
            token: r.get("token"),
            state: r.get("state"),
            trigger: r.get("trigger_kind"),
            scheduled_for: r.get("scheduled_for"),
            claimed_by: r.get("claimed_by"),
            created_at: r.get("created_at"),
        })
        .collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Whether `job` was claimed by `daemon` (holder ids end in the data_dir).
fn claimed_by(job: &Job, daemon: &DaemonProcess) -> bool {
    let dir = std::fs::canonicalize(daemon.data_dir()).unwrap();
    job.claimed_by.ends_with(&format!(":{}", dir.display()))
}

#[tokio::test]
async fn two_daemons_rotate_each_slot_once_and_the_survivor_takes_over() {
    init();
    let db = TestDatabase::create().await.unwrap();
    let options = DaemonOptions {
        datastore_url: db.url.clone(),
        extra_toml: "[scheduler]\nlease_ttl = \"3s\"\nlease_renewal = \"1s\"\n".into(),
        metrics: true,
        ..DaemonOptions::default()
    };
    let first = DaemonProcess::start(options.clone()).unwrap();
    let second = DaemonProcess::start(DaemonOptions {
        keys_from: Some(first.data_dir()),
        ..options
    })
    .unwrap();
    let mut daemons = [first, second];

    // Both daemons' hooks append each value they set, one line each, to one file.
    let out = tempfile::tempdir().unwrap();
    let sink = out.path().join("rotations.log");
    let secret = |schedule: &str| {
        format!(
            "name = \"ha\"\nschedule = \"{schedule}\"\n[store]\nkind = \"local\"\n[target]\nkind = \"none\"\n\
             hook = ['sh', '-c', 'printf \"%s\\n\" \"$(cat)\" >> {}']\n",
            sink.display()
        )
    };
    define(&daemons[0], &secret("*/2 * * * * *"));

    let leaders = async |daemons: &[DaemonProcess]| {
        let mut flags = Vec::new();
        for daemon in daemons {
            flags.push(daemon.metric(LEADER).await.unwrap() == Some(1.0));
        }
        flags
    };
    eventually(
        "one of the two daemons to lead",
        Duration::from_secs(20),
        async || leaders(&daemons).await.iter().filter(|l| **l).count() == 1,
    )
    .await;
    eventually(
        "three scheduled rotations",
        Duration::from_secs(30),
        async || {
            jobs(&db.url)
                .await
                .iter()
                .filter(|j| j.trigger == "schedule" && j.state == "promoted")
                .count()
                >= 3
        },
    )
    .await;
    let flags = leaders(&daemons).await;
    assert_eq!(
        flags.iter().filter(|l| **l).count(),
        1,
        "one leader: {flags:?}"
    );
    let leader = flags.iter().position(|l| *l).unwrap();
    let follower = 1 - leader;

    // A manual rotation on the follower either runs alone or is refused while the
    // leader's runs; the follower sees the secret though it was defined on the other.
    let mut manual_ok = 0;
    for _ in 0..3 {
        let out = daemons[follower].cli(&["secret", "rotate", "ha"]).unwrap();
        if out.status.success() {
            manual_ok += 1;
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("already running"), "{err}");
        }
    }

    // Kill the leader outright; the follower takes the lease over once it runs out.
    daemons[leader].kill();
    let killed_at = unix_now();
    let survivor = &daemons[follower];
    eventually(
        "the survivor to take the scheduler over",
        Duration::from_secs(20),
        async || survivor.metric(LEADER).await.unwrap() == Some(1.0),
    )
    .await;
    eventually(
        "scheduled rotations on the survivor",
        Duration::from_secs(30),
        async || {
            jobs(&db.url)
                .await
                .iter()
                .filter(|j| {
                    j.trigger == "schedule"
                        && j.state == "promoted"
                        && j.created_at > killed_at
                        && claimed_by(j, survivor)
                })
                .count()
                >= 2
        },
    )
    .await;

    // Stop the schedule and let whatever is in flight (the killed leader's last job
    // included) finish.
    define(survivor, &secret("@yearly"));
    eventually(
        "every rotation to finish",
        Duration::from_secs(30),
        async || {
            jobs(&db.url)
                .await
                .iter()
                .all(|j| j.state == "promoted" || j.state == "failed")
        },
    )
    .await;

    let all = jobs(&db.url).await;
    assert!(
        all.iter().all(|j| j.state == "promoted"),
        "nothing is lost or failed: {all:#?}"
    );
    let scheduled: Vec<i64> = all.iter().filter_map(|j| j.scheduled_for).collect();
    let slots: HashSet<i64> = scheduled.iter().copied().collect();
    assert_eq!(slots.len(), scheduled.len(), "one job per slot: {all:#?}");
    assert!(
        scheduled.iter().all(|slot| slot % 2000 == 0),
        "every slot is on the */2 schedule: {scheduled:?}"
    );
    assert_eq!(
        all.iter().filter(|j| j.trigger == "manual").count(),
        manual_ok,
        "each accepted manual rotation is one job"
    );
    // Every job set exactly one value (a job resumed mid-step may set it twice), so two
    // jobs for one slot, or two daemons in one job generating values, would show here.
    let lines = std::fs::read_to_string(&sink).unwrap();
    let values: HashSet<&str> = lines.lines().collect();
    assert_eq!(values.len(), all.len(), "one value per job:\n{lines}");
    let current = survivor.cli_json(&["secret", "get", "ha"]).unwrap();
    assert!(values.contains(current["value"].as_str().unwrap()));
    let version = current["version"].as_str().unwrap();
    assert!(all.iter().any(|j| j.token == version));
    let status = survivor.cli_json(&["secret", "status", "ha"]).unwrap();
    assert!(
        !status["versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["stages"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == "pending")),
        "nothing left pending: {status}"
    );
    let promoted_here = survivor
        .metric("mayfly_rotations_total{secret=\"ha\",outcome=\"promoted\"}")
        .await
        .unwrap()
        .unwrap_or(0.0);
    assert!(promoted_here >= 2.0, "{promoted_here}");

    drop(daemons);
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_failed_rotation_is_counted_on_the_metrics_endpoint() {
    use mayfly_proto::v1;

    init();
    let daemon = DaemonProcess::start(DaemonOptions {
        metrics: true,
        ..DaemonOptions::default()
    })
    .unwrap();
    assert!(
        daemon
            .metrics_addr
            .as_ref()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "the tests only listen on loopback"
    );
    // Alone on its datastore, the daemon takes the scheduler lease at once.
    eventually("the daemon to lead", Duration::from_secs(10), async || {
        daemon.metric(LEADER).await.unwrap() == Some(1.0)
    })
    .await;

    define(
        &daemon,
        "name = \"broken\"\nschedule = \"@yearly\"\nmax_attempts = 2\n[store]\nkind = \"local\"\n\
         [target]\nkind = \"none\"\nhook = [\"sh\", \"-c\", \"echo refused >&2; exit 1\"]\n",
    );
    let out = daemon.cli(&["secret", "rotate", "broken"]).unwrap();
    assert!(!out.status.success(), "the hook refuses every value");
    let failed = "mayfly_rotations_total{secret=\"broken\",outcome=\"failed\"}";
    let promoted = "mayfly_rotations_total{secret=\"broken\",outcome=\"promoted\"}";
    assert_eq!(daemon.metric(failed).await.unwrap(), Some(1.0));
    assert_eq!(daemon.metric(promoted).await.unwrap(), Some(0.0));
    // Two attempts: the first failure was retried, the second was final.
    assert_eq!(
        daemon
            .metric("mayfly_rotation_step_retries_total")
            .await
            .unwrap(),
        Some(1.0)
    );

    define(
        &daemon,
        "name = \"fine\"\nschedule = \"@yearly\"\n[store]\nkind = \"local\"\n[target]\nkind = \"none\"\n",
    );
    daemon.cli_ok(&["secret", "rotate", "fine"]).unwrap();
    let fine = "mayfly_rotations_total{secret=\"fine\",outcome=\"promoted\"}";
    assert_eq!(daemon.metric(fine).await.unwrap(), Some(1.0));
    assert_eq!(daemon.metric(failed).await.unwrap(), Some(1.0));

    // An attested agent: its SVID is counted, and so is its open sync stream.
    let x509 = "mayfly_svids_signed_total{kind=\"x509\"}";
    assert_eq!(daemon.metric(x509).await.unwrap(), Some(0.0));
    let agent = daemon.attest("spiffe://example.org/node/m").await.unwrap();
    assert_eq!(daemon.metric(x509).await.unwrap(), Some(1.0));
    assert_eq!(
        daemon.metric("mayfly_connected_agents").await.unwrap(),
        Some(0.0)
    );
    let mut node = daemon.node(&agent).await.unwrap();
    let stream = node.sync(v1::SyncRequest {}).await.unwrap().into_inner();
    assert_eq!(
        daemon.metric("mayfly_connected_agents").await.unwrap(),
        Some(1.0)
    );
    drop(stream);
    drop(node);
    eventually(
        "the closed stream to be uncounted",
        Duration::from_secs(10),
        async || daemon.metric("mayfly_connected_agents").await.unwrap() == Some(0.0),
    )
    .await;

    // Only /metrics is served.
    let addr = mayfly_tests::bench::http1::LoopbackAddr::parse(&format!(
        "http://{}",
        daemon.metrics_addr.as_ref().unwrap()
    ))
    .unwrap();
    let mut conn = mayfly_tests::bench::http1::Conn::connect(&addr, Vec::new())
        .await
        .unwrap();
    let (status, _) = conn
        .send(http::Method::GET, "/secrets", bytes::Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, http::StatusCode::NOT_FOUND);
    let text = daemon.metrics().await.unwrap();
    assert!(
        text.contains("# TYPE mayfly_rotations_total counter"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_daemon_reaches_an_agent_on_the_other() {
    init();
    let db = TestDatabase::create().await.unwrap();
    let options = DaemonOptions {
        datastore_url: db.url.clone(),
        ..DaemonOptions::default()
    };
    let first = DaemonProcess::start(options.clone()).unwrap();
    let second = DaemonProcess::start(DaemonOptions {
        keys_from: Some(first.data_dir()),
        ..options
    })
    .unwrap();
    let node = "spiffe://example.org/node/ha";
    let web = "spiffe://example.org/web";
    second
        .cli_json(&[
            "entry",
            "create",
            "--spiffe-id",
            web,
            "--parent-id",
            node,
            "--selector",
            "unix:uid:0",
        ])
        .unwrap();
    let files = tempfile::tempdir().unwrap();
    let cert = files.path().join("svid.pem");
    // The agent talks to the second daemon only.
    let agent = mayfly_tests::harness::AgentProcess::start_with(
        &second,
        node,
        &format!(
            "[[sink]]\nkind = \"svid\"\nspiffe_id = \"{web}\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
            cert.display(),
            files.path().join("svid.key").display()
        ),
    )
    .unwrap();
    mayfly_tests::harness::wait_for("the svid sink", Duration::from_secs(15), || {
        std::fs::metadata(&cert).is_ok_and(|m| m.len() > 0)
    });

    // The operator revokes on the first daemon.
    let out = first
        .cli(&[
            "revoke",
            "selector",
            "unix:uid:0",
            "--reason",
            "ha",
            "--output",
            "json",
        ])
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no report: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        )
    });
    assert_eq!(
        out.status.code(),
        Some(0),
        "{report:#}\nsecond daemon:\n{}\nagent:\n{}",
        second.log(),
        agent.log()
    );
    assert_eq!(report["acknowledged"], serde_json::json!([node]));
    assert!(
        !cert.exists(),
        "the agent on the other daemon removed the file"
    );
    // The other daemon's audit trail is the same chain: it verifies from either.
    assert!(
        second
            .cli_ok(&["audit", "verify"])
            .unwrap()
            .starts_with("audit log intact")
    );
}
