//! Daemons on one PostgreSQL share one CA, given nothing but the datastore URL and the
//! shared sealing key: a CA prepared and activated through one signs on the other, a taint
//! through the other has the first one's agents re-sign under the new CA, an automatic
//! rotation with a one-minute CA crosses both without a signing error, and a daemon with
//! another sealing key refuses to start, saying so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, init, wait_for};
use mayfly_tests::pg::TestDatabase;

const NODE_A: &str = "spiffe://example.org/node/ca-a";
const NODE_B: &str = "spiffe://example.org/node/ca-b";

/// The active CA's certificate (PEM), as the datastore holds it.
fn active_ca(daemon: &DaemonProcess) -> String {
    let slots = daemon.cli_json(&["ca", "show"]).unwrap();
    slots
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["state"] == "active")
        .and_then(|s| s["certificate"].as_str())
        .unwrap_or_else(|| panic!("no active CA in {slots:#}"))
        .to_string()
}

/// Whether the leaf in `cert` was signed by the CA in `ca_pem` (openssl, not our code).
fn signed_by(cert: &Path, ca_pem: &str) -> bool {
    if std::fs::metadata(cert).map_or(true, |m| m.len() == 0) {
        return false;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&ca)
        .arg(cert)
        .output()
        .is_ok_and(|out| out.status.success())
}

fn serial(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_string()
}

/// An agent on `daemon` serving `spiffe_id` to uid 0, writing its SVID to a file.
fn agent_with_sink(
    daemon: &DaemonProcess,
    node: &str,
    spiffe_id: &str,
    dir: &Path,
) -> (AgentProcess, PathBuf) {
    daemon
        .create_entry(spiffe_id, node, "unix:uid:0", &[])
        .unwrap();
    let cert = dir.join("svid.pem");
    let agent = AgentProcess::start_with(
        daemon,
        node,
        &format!(
            "[[sink]]\nkind = \"svid\"\nspiffe_id = \"{spiffe_id}\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
            cert.display(),
            dir.join("svid.key").display()
        ),
    )
    .unwrap();
    wait_for("the first SVID", Duration::from_secs(20), || {
        std::fs::metadata(&cert).is_ok_and(|m| m.len() > 0)
    });
    (agent, cert)
}

fn pair(extra_toml: &str, db: &TestDatabase) -> (DaemonProcess, DaemonProcess) {
    let options = DaemonOptions {
        datastore_url: db.url.clone(),
        extra_toml: extra_toml.to_string(),
        ..DaemonOptions::default()
    };
    let a = DaemonProcess::start(options.clone()).unwrap();
    // Only the sealing key is shared: no CA key file is copied.
    let b = DaemonProcess::start(DaemonOptions {
        keys_from: Some(a.data_dir()),
        ..options
    })
    .unwrap();
    let b_ca = b.data_dir().join("ca");
    assert!(
        std::fs::read_dir(&b_ca).map_or(true, |mut d| d.next().is_none()),
        "the second daemon has no CA key file"
    );
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_prepared_activated_or_tainted_on_one_daemon_signs_on_both() {
    init();
    let db = TestDatabase::create().await.unwrap();
    let (a, b) = pair("", &db);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_agent_a, cert_a) = agent_with_sink(&a, NODE_A, "spiffe://example.org/on-a", dir_a.path());
    let (agent_b, cert_b) = agent_with_sink(&b, NODE_B, "spiffe://example.org/on-b", dir_b.path());
    let first = active_ca(&a);
    assert!(signed_by(&cert_a, &first) && signed_by(&cert_b, &first));

    // Prepared and activated through A.
    a.cli_ok(&["ca", "prepare"]).unwrap();
    a.cli_ok(&["ca", "activate"]).unwrap();
    let second = active_ca(&b);
    assert_ne!(second, first);
    // B takes the change up within a second; then an SVID it signs chains to the new CA.
    std::thread::sleep(Duration::from_millis(1500));
    let out = b
        .cli(&[
            "revoke",
            "svid",
            "--serial",
            &serial(&cert_b),
            "--reason",
            "re-sign under the new CA",
        ])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent_b.log()
    );
    wait_for(
        "B signs under the CA A activated",
        Duration::from_secs(20),
        || signed_by(&cert_b, &second),
    );

    // A signs under it too (it made it).
    let out = a
        .cli(&[
            "revoke",
            "svid",
            "--serial",
            &serial(&cert_a),
            "--reason",
            "re-sign",
        ])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("A signs under its new CA", Duration::from_secs(20), || {
        signed_by(&cert_a, &second)
    });

    // Tainted through B: the agent on A re-signs what the tainted CA signed, through A,
    // under the newest CA.
    let out = b
        .cli(&[
            "ca",
            "taint",
            "--reason",
            "key exposure drill",
            "--output",
            "json",
        ])
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no report: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{report:#}\nA:\n{}", a.log());
    assert!(
        report["acknowledged"].to_string().contains(NODE_A),
        "{report:#}"
    );
    let third = active_ca(&a);
    assert_ne!(third, second);
    wait_for(
        "A's agent re-signs under the tainting CA",
        Duration::from_secs(20),
        || signed_by(&cert_a, &third),
    );
    assert!(
        !a.log().contains("CA slot ") && !b.log().contains("CA slot "),
        "no daemon lacked a CA key:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );

    // A third daemon with a sealing key of its own refuses to start, saying why.
    let stranger = DaemonProcess::start(DaemonOptions {
        datastore_url: db.url.clone(),
        ..DaemonOptions::default()
    });
    let err = match stranger {
        Ok(d) => panic!("a daemon with another sealing key started:\n{}", d.log()),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("is not the sealing key"), "{err}");
    assert!(err.contains("secrets.key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_rotation_of_a_one_minute_ca_crosses_both_daemons() {
    init();
    let db = TestDatabase::create().await.unwrap();
    let (a, b) = pair(
        "[ca]\nttl = \"60s\"\nrotation_check_interval = \"1s\"\n\
         [svid]\nx509_ttl = \"12s\"\nagent_ttl = \"20s\"\n",
        &db,
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (agent_a, cert_a) = agent_with_sink(&a, NODE_A, "spiffe://example.org/on-a", dir_a.path());
    let (agent_b, cert_b) = agent_with_sink(&b, NODE_B, "spiffe://example.org/on-b", dir_b.path());
    let first = active_ca(&a);
    // Prepared at half-life (30 s), active with a sixth left (at 50 s), whichever daemon
    // ticks first; both sign under it, their workloads renewing every few seconds.
    wait_for("the next CA is active", Duration::from_secs(70), || {
        active_ca(&b) != first
    });
    let next = active_ca(&a);
    wait_for(
        "both agents' SVIDs chain to it",
        Duration::from_secs(20),
        || signed_by(&cert_a, &next) && signed_by(&cert_b, &next),
    );
    let slots = a.cli_json(&["ca", "show"]).unwrap();
    let active = slots
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "active")
        .count();
    assert_eq!(active, 1, "{slots:#}");
    for (name, log) in [
        ("A", a.log()),
        ("B", b.log()),
        ("agent A", agent_a.log()),
        ("agent B", agent_b.log()),
    ] {
        assert!(
            !log.contains("CA rotation check failed")
                && !log.contains("CA slot ")
                && !log.contains("could not take up a CA change"),
            "{name}:\n{log}"
        );
    }
}
