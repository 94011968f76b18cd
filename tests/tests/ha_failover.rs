//! Agents fail over between daemons: three daemons on one PostgreSQL, three agents each
//! knowing all three addresses and first connected to a different one. Under a stream of
//! entry changes made through the survivors, one daemon is killed with SIGKILL: its agent
//! reconnects to another, resyncs, and gets every change (those made while it was away
//! too); no audit record is lost or duplicated and the chain verifies.

use std::time::{Duration, Instant};

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, init, wait_for};
use mayfly_tests::pg::TestDatabase;

fn non_empty(path: &std::path::Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_daemon_is_killed_fails_over_and_misses_nothing() {
    init();
    let db = TestDatabase::create().await.unwrap();
    let options = DaemonOptions {
        datastore_url: db.url.clone(),
        ..DaemonOptions::default()
    };
    let mut daemons = vec![DaemonProcess::start(options.clone()).unwrap()];
    for _ in 0..2 {
        daemons.push(
            DaemonProcess::start(DaemonOptions {
                keys_from: Some(daemons[0].data_dir()),
                ..options.clone()
            })
            .unwrap(),
        );
    }
    let addresses: Vec<String> = daemons.iter().map(|d| d.node_addr.clone()).collect();
    let files = tempfile::tempdir().unwrap();
    // Agent i knows all three, daemon i first; each serves one changing identity.
    let mut agents = Vec::new();
    for (i, daemon) in daemons.iter().enumerate() {
        let order: Vec<&str> = (0..3).map(|k| addresses[(i + k) % 3].as_str()).collect();
        let node = format!("spiffe://example.org/node/fo-{i}");
        let mut sinks = String::new();
        for round in 0..4 {
            let id = format!("spiffe://example.org/fo-{i}/r{round}");
            sinks.push_str(&format!(
                "[[sink]]\nkind = \"svid\"\nspiffe_id = \"{id}\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
                files.path().join(format!("{i}-{round}.pem")).display(),
                files.path().join(format!("{i}-{round}.key")).display()
            ));
        }
        agents.push(
            AgentProcess::start_with_addresses(daemon, &order.join(","), &node, &sinks).unwrap(),
        );
    }
    let cert = |i: usize, round: usize| files.path().join(format!("{i}-{round}.pem"));
    // Round 0, through daemon 1: every agent is served.
    for i in 0..3 {
        daemons[1]
            .create_entry(
                &format!("spiffe://example.org/fo-{i}/r0"),
                &format!("spiffe://example.org/node/fo-{i}"),
                "unix:uid:0",
                &[],
            )
            .unwrap();
    }
    for i in 0..3 {
        wait_for("round 0 everywhere", Duration::from_secs(15), || {
            non_empty(&cert(i, 0))
        });
    }
    let records_before = daemons[1]
        .cli_json(&["audit", "list", "--limit", "100000"])
        .unwrap()
        .as_array()
        .map_or(0, Vec::len);

    // Daemon 0 dies while changes keep coming through the others.
    let killed = Instant::now();
    daemons[0].kill();
    for round in 1..4 {
        for i in 0..3 {
            daemons[1 + (round + i) % 2]
                .create_entry(
                    &format!("spiffe://example.org/fo-{i}/r{round}"),
                    &format!("spiffe://example.org/node/fo-{i}"),
                    "unix:uid:0",
                    &[],
                )
                .unwrap();
        }
    }
    // Agent 0 reconnects to a survivor and gets what it missed; the others never left.
    for round in 1..4 {
        for i in 0..3 {
            wait_for("every change, everywhere", Duration::from_secs(15), || {
                non_empty(&cert(i, round))
            });
        }
    }
    eprintln!(
        "daemon 0 killed → its agent holds every change made since: {:?}",
        killed.elapsed()
    );
    assert!(
        agents[0].log().contains("sync stream lost"),
        "agent 0 was on the killed daemon:\n{}",
        agents[0].log()
    );

    // The trail has every record once and verifies from either survivor.
    let listed = daemons[2]
        .cli_json(&["audit", "list", "--limit", "100000"])
        .unwrap();
    let records = listed.as_array().unwrap();
    assert!(records.len() > records_before, "the changes are recorded");
    let mut seqs: Vec<i64> = records.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    let before = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), before, "no record twice");
    let creates = records
        .iter()
        .filter(|r| r["action"] == "entry.create")
        .count();
    assert_eq!(creates, 12, "every entry.create once");
    for daemon in &daemons[1..] {
        assert!(
            daemon
                .cli_ok(&["audit", "verify"])
                .unwrap()
                .starts_with("audit log intact")
        );
    }
}
