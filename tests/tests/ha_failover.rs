//! Agents fail over between daemons: three daemons on one PostgreSQL, three agents each
//! knowing all three addresses and first connected to a different one. Under a stream of
//! entry changes made through the survivors and signings on every daemon, one daemon is
//! killed with SIGKILL: its agent reconnects to another, resyncs, and gets every change
//! (those made while it was away too); every SVID any daemon handed out, the killed one's
//! included, is on the audit trail exactly once, and the chain verifies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mayfly_tests::harness::{
    AgentProcess, DaemonOptions, DaemonProcess, csr_request, init, wait_for,
};
use mayfly_tests::pg::TestDatabase;

/// Signs one CSR a call for `entry` through `daemon` as a freshly attested agent, until
/// `stop`; every serial handed out goes into `serials`. Refusals after the first signing
/// (the daemon gone) are counted, not fatal; before it, the daemon may not have heard of
/// the entry yet.
async fn sign_until(
    daemon: &DaemonProcess,
    agent_id: &str,
    entry: String,
    stop: Arc<AtomicBool>,
    serials: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<usize> {
    let agent = daemon.attest(agent_id).await.unwrap();
    let mut client = daemon.node(&agent).await.unwrap();
    tokio::spawn(async move {
        let (mut refused, mut signed) = (0, false);
        while !stop.load(Ordering::Relaxed) {
            match client.sign_svids(csr_request(&entry)).await {
                Ok(answer) => {
                    signed = true;
                    serials
                        .lock()
                        .unwrap()
                        .extend(answer.into_inner().svids.into_iter().map(|s| s.serial));
                }
                Err(_) => {
                    refused += usize::from(signed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        refused
    })
}

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

    // A signer on every daemon, each its own agent and entry (made through daemon 1, so
    // daemons 0 and 2 learn of it by notice), signing until the end of the test.
    let stop = Arc::new(AtomicBool::new(false));
    let serials: Vec<Arc<Mutex<Vec<String>>>> =
        (0..3).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
    let mut signing = Vec::new();
    for (d, daemon) in daemons.iter().enumerate() {
        let signer = format!("spiffe://example.org/node/signer-{d}");
        let entry = daemons[1]
            .create_entry(
                &format!("spiffe://example.org/signed-{d}"),
                &signer,
                "unix:uid:0",
                &[],
            )
            .unwrap();
        signing.push(sign_until(daemon, &signer, entry, stop.clone(), serials[d].clone()).await);
    }
    wait_for("every daemon to sign", Duration::from_secs(15), || {
        serials.iter().all(|s| s.lock().unwrap().len() >= 5)
    });

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
    // The survivors kept signing after the kill.
    let after_kill: Vec<usize> = serials.iter().map(|s| s.lock().unwrap().len()).collect();
    wait_for("the survivors to sign on", Duration::from_secs(15), || {
        (1..3).all(|d| serials[d].lock().unwrap().len() > after_kill[d] + 5)
    });
    stop.store(true, Ordering::Relaxed);
    let mut refused = Vec::new();
    for task in signing {
        refused.push(task.await.unwrap());
    }
    assert!(refused[0] > 0, "the killed daemon stopped answering");
    assert_eq!(&refused[1..], [0, 0], "the survivors refused no signing");
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
    assert_eq!(creates, 12 + 3, "every entry.create once");
    // Every SVID handed out, by the killed daemon too, is on the trail exactly once.
    let mut on_trail: HashMap<String, usize> = HashMap::new();
    for record in records.iter().filter(|r| r["action"] == "svid.sign") {
        let detail: serde_json::Value =
            serde_json::from_str(record["detail"].as_str().unwrap_or("{}")).unwrap();
        for pair in detail["serials"].as_array().into_iter().flatten() {
            *on_trail
                .entry(pair[1].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    for (d, handed_out) in serials.iter().enumerate() {
        let handed_out = handed_out.lock().unwrap();
        for serial in handed_out.iter() {
            assert_eq!(
                on_trail.get(serial),
                Some(&1),
                "SVID {serial} from daemon {d} is on the trail once"
            );
        }
        eprintln!("daemon {d} handed out {} SVIDs", handed_out.len());
    }
    for daemon in &daemons[1..] {
        assert!(
            daemon
                .cli_ok(&["audit", "verify"])
                .unwrap()
                .starts_with("audit log intact")
        );
    }
}
