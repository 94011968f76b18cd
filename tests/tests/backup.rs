//! `mayflyd backup --out FILE` while the daemon runs, and the documented restore: stop the
//! daemon, put the copy in place as data_dir/mayfly.db (0600, without -wal and -shm), start
//! it again. What was made after the backup is gone, what was before it is there, and the
//! audit chain verifies.

use std::os::unix::fs::PermissionsExt as _;

use mayfly_tests::harness::{DaemonOptions, DaemonProcess, init};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_running_restores_to_that_moment() {
    init();
    let mut daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let node = "spiffe://example.org/node/b";
    daemon
        .create_entry("spiffe://example.org/before", node, "unix:uid:0", &[])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("mayfly-backup.db");
    let out = daemon
        .cli_ok(&["backup", "--out", copy.to_str().unwrap()])
        .unwrap();
    assert!(out.contains("backed up to"), "{out}");
    let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "nobody else reads the copy");
    // Never over an existing file.
    let err = daemon
        .cli_ok(&["backup", "--out", copy.to_str().unwrap()])
        .expect_err("an existing file is not overwritten")
        .to_string();
    assert!(err.contains("mayfly-backup.db"), "{err}");
    daemon
        .create_entry("spiffe://example.org/after", node, "unix:uid:0", &[])
        .unwrap();

    // Restore.
    daemon.kill();
    let data = daemon.data_dir();
    for leftover in ["mayfly.db-wal", "mayfly.db-shm"] {
        let _ = std::fs::remove_file(data.join(leftover));
    }
    std::fs::copy(&copy, data.join("mayfly.db")).unwrap();
    std::fs::set_permissions(
        data.join("mayfly.db"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    daemon.spawn().unwrap();
    let ids: Vec<String> = daemon
        .cli_json(&["entry", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["spiffe_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["spiffe://example.org/before"]);
    assert!(
        daemon
            .cli_ok(&["audit", "verify"])
            .unwrap()
            .starts_with("audit log intact")
    );
}
