//! Every change made through one daemon reaches agents connected to another daemon on the
//! same PostgreSQL datastore, by LISTEN/NOTIFY: an entry created, moved or deleted, a
//! secret's promoted version, an agent evicted. Before, an agent on the other daemon saw
//! none of them until that daemon restarted.

use std::time::{Duration, Instant};

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, init, wait_for};
use mayfly_tests::pg::TestDatabase;

const NODE: &str = "spiffe://example.org/node/on-b";
const LATE: &str = "spiffe://example.org/late";
const WAIT: Duration = Duration::from_secs(10);

fn non_empty(path: &std::path::Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_one_daemon_reach_agents_on_another() {
    init();
    let db = TestDatabase::create().await.unwrap();
    let options = DaemonOptions {
        datastore_url: db.url.clone(),
        ..DaemonOptions::default()
    };
    let a = DaemonProcess::start(options.clone()).unwrap();
    // A secret both daemons know (definitions are loaded at start), granted to LATE.
    a.define_secret(&format!(
        "name = \"shared\"\nschedule = \"@yearly\"\ngrants = [\"{LATE}\"]\n[store]\nkind = \"local\"\n[target]\nkind = \"none\"\n"
    ))
    .unwrap();
    a.cli_ok(&["secret", "rotate", "shared"]).unwrap();
    let b = DaemonProcess::start(DaemonOptions {
        keys_from: Some(a.data_dir()),
        ..options
    })
    .unwrap();
    let files = tempfile::tempdir().unwrap();
    let cert = files.path().join("late.pem");
    let secret = files.path().join("shared");
    let later = files.path().join("later");
    // The agent knows B alone; nothing it will serve exists yet.
    let agent = AgentProcess::start_with(
        &b,
        NODE,
        &format!(
            "[[sink]]\nkind = \"svid\"\nspiffe_id = \"{LATE}\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n\
             [[sink]]\nkind = \"secret\"\nsecret = \"shared\"\npath = \"{}\"\nuntil_granted = true\n\
             [[sink]]\nkind = \"secret\"\nsecret = \"later\"\npath = \"{}\"\nuntil_granted = true\n",
            cert.display(),
            files.path().join("late.key").display(),
            secret.display(),
            later.display()
        ),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!non_empty(&cert));

    // An entry created through A: the agent on B is served it, and its secret with it.
    let started = Instant::now();
    let id = a.create_entry(LATE, NODE, "unix:uid:0", &[]).unwrap();
    wait_for("the entry made on A reaches the agent on B", WAIT, || {
        non_empty(&cert)
    });
    eprintln!("entry on A → SVID on B's agent: {:?}", started.elapsed());
    wait_for("the secret granted to it too", WAIT, || non_empty(&secret));
    let first = std::fs::read_to_string(&secret).unwrap();

    // A rotation promoted on A: the new value reaches the agent on B.
    a.cli_ok(&["secret", "rotate", "shared"]).unwrap();
    wait_for("the promoted version reaches B's agent", WAIT, || {
        std::fs::read_to_string(&secret).is_ok_and(|v| !v.is_empty() && v != first)
    });

    // A secret defined through A after B started: B loads the definition when told, and
    // its agent is granted the secret (before, B saw it only at its next scheduler pass).
    a.define_secret(&format!(
        "name = \"later\"\nschedule = \"@yearly\"\ngrants = [\"{LATE}\"]\n[store]\nkind = \"local\"\n[target]\nkind = \"none\"\n"
    ))
    .unwrap();
    a.cli_ok(&["secret", "rotate", "later"]).unwrap();
    wait_for("a secret defined on A reaches B's agent", WAIT, || {
        non_empty(&later)
    });
    assert!(
        b.cli_ok(&["secret", "list"]).unwrap().contains("later"),
        "B lists the definition made on A"
    );

    // Deleted through A: B's agent stops serving it.
    a.cli_ok(&["entry", "delete", &id]).unwrap();
    wait_for("the deletion reaches B's agent", WAIT, || {
        let out = agent.api(&["fetch", "x509"], None).unwrap();
        !out.status.success()
    });

    // Evicted through A: its stream on B ends at once.
    a.cli_ok(&["agent", "evict", NODE, "--reason", "decommissioned"])
        .unwrap();
    wait_for("the eviction reaches B's stream", WAIT, || {
        agent.log().contains("evicted")
    });
    assert!(
        a.cli_ok(&["audit", "verify"])
            .unwrap()
            .starts_with("audit log intact")
    );
}
