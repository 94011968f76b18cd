//! SIGHUP reloads what can change under a running agent (its sinks, its log level) and
//! names what needs a restart; a broken file changes nothing.

use std::time::Duration;

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, init, wait_for};

fn svid_sink(dir: &std::path::Path, name: &str) -> String {
    format!(
        "[[sink]]\nkind = \"svid\"\nspiffe_id = \"spiffe://example.org/web\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
        dir.join(format!("{name}.pem")).display(),
        dir.join(format!("{name}.key")).display()
    )
}

#[test]
fn sighup_applies_new_sinks_and_names_what_needs_a_restart() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let node = "spiffe://example.org/node/reload";
    daemon
        .create_entry("spiffe://example.org/web", node, "unix:uid:0", &[])
        .unwrap();
    let files = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start_with(&daemon, node, &svid_sink(files.path(), "first")).unwrap();
    wait_for("the first sink", Duration::from_secs(15), || {
        files.path().join("first.pem").exists()
    });

    // A second sink, and a socket path that cannot change under a running agent.
    let original = std::fs::read_to_string(&agent.config_path).unwrap();
    let moved = original.replace("api.sock", "moved.sock");
    std::fs::write(
        &agent.config_path,
        format!("{moved}{}", svid_sink(files.path(), "second")),
    )
    .unwrap();
    agent.signal("HUP").unwrap();
    wait_for("the second sink", Duration::from_secs(15), || {
        files.path().join("second.pem").exists()
    });
    wait_for("the reload's report", Duration::from_secs(5), || {
        agent.log().lines().any(|l| {
            l.contains("configuration reloaded (SIGHUP)")
                && l.contains("applied=[\"sink\"]")
                && l.contains("needs_restart=[\"socket_path\"]")
        })
    });
    // Still serving on the socket it started with.
    assert!(agent.socket_path.exists());
    let fetched = agent.api(&["fetch", "x509"], None).unwrap();
    assert!(fetched.status.success(), "{fetched:?}");

    // A broken file changes nothing: the agent keeps running what it had.
    std::fs::write(&agent.config_path, "trust_domain = [\n").unwrap();
    agent.signal("HUP").unwrap();
    wait_for("the refusal", Duration::from_secs(5), || {
        agent
            .log()
            .contains("configuration not reloaded (SIGHUP); the running one stays")
    });
    let fetched = agent.api(&["fetch", "x509"], None).unwrap();
    assert!(fetched.status.success(), "{fetched:?}");
}
