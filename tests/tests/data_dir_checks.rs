//! A data_dir an attacker could have written to is refused at start, naming the file, its
//! owner and mode, and what to do: before, a `secrets.key` left 0644 or owned by another
//! user, a data_dir owned by another uid (chmodded, not checked), or one reached through a
//! symlink into a directory anyone may write, all started silently, so an attacker could
//! plant the sealing key (or the agent's key).

use std::os::unix::fs::PermissionsExt as _;

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, init};

fn refused(result: anyhow::Result<()>) -> String {
    format!("{:#}", result.expect_err("the start must be refused"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_refuses_a_data_dir_or_key_others_could_have_written() {
    init();
    let mut daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let data = daemon.data_dir();
    let key = data.join("secrets.key");
    daemon.kill();

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let why = refused(daemon.spawn());
    assert!(
        why.contains("secrets.key") && why.contains("mode 644") && why.contains("chmod 600"),
        "{why}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    std::os::unix::fs::chown(&key, Some(1101), None).unwrap();
    let why = refused(daemon.spawn());
    assert!(why.contains("owned by uid 1101"), "{why}");
    std::os::unix::fs::chown(&key, Some(0), None).unwrap();

    std::os::unix::fs::chown(&data, Some(1101), None).unwrap();
    let why = refused(daemon.spawn());
    assert!(
        why.contains("data_dir") && why.contains("owned by uid 1101"),
        "{why}"
    );
    std::os::unix::fs::chown(&data, Some(0), None).unwrap();

    // Moved into a directory anyone may write, and reached through a symlink.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let moved = open.path().join("data");
    std::fs::rename(&data, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &data).unwrap();
    let why = refused(daemon.spawn());
    assert!(why.contains("symlink") && why.contains("mode 777"), "{why}");
    std::fs::remove_file(&data).unwrap();
    std::fs::rename(&moved, &data).unwrap();

    // Put right, it starts on the same data.
    daemon.spawn().unwrap();
    assert!(
        daemon
            .cli_ok(&["audit", "verify"])
            .unwrap()
            .starts_with("audit log intact")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_key_others_could_have_written() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let mut agent = AgentProcess::start(&daemon, "spiffe://example.org/node/keys").unwrap();
    agent.kill();
    let key = agent.dir.path().join("data").join("agent-svid.key");
    assert!(key.exists(), "{}", key.display());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let why = refused(agent.spawn());
    assert!(
        why.contains("agent-svid.key") && why.contains("mode 640"),
        "{why}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    agent.spawn().unwrap();
}
