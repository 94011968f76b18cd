//! `entry create --file`: a fleet's entries in a few calls (a thousand to a call, each call
//! one transaction), every entry with its own result. A refused entry (a duplicate, a bad
//! field, the daemon's or an agent's identity) leaves the others created; every created one
//! is on the audit trail once and reaches its agent, through any daemon on the store.

use std::path::Path;
use std::time::Duration;

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, init, wait_for};
use mayfly_tests::pg::TestDatabase;

fn entry(spiffe_id: &str, parent_id: &str, selectors: &[&str]) -> serde_json::Value {
    serde_json::json!({ "spiffe_id": spiffe_id, "parent_id": parent_id, "selectors": selectors })
}

fn write_entries(dir: &Path, name: &str, entries: Vec<serde_json::Value>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::json!({ "entries": entries }).to_string()).unwrap();
    path.to_string_lossy().into_owned()
}

fn entry_count(daemon: &DaemonProcess) -> usize {
    daemon
        .cli_json(&["entry", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}

fn svid_sink(dir: &Path, spiffe_id: &str, name: &str) -> String {
    format!(
        "[[sink]]\nkind = \"svid\"\nspiffe_id = \"{spiffe_id}\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
        dir.join(format!("{name}.pem")).display(),
        dir.join(format!("{name}.key")).display()
    )
}

fn non_empty(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_entries_is_created_each_with_its_own_result() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let files = tempfile::tempdir().unwrap();
    let node = "spiffe://example.org/node/batch";
    let _agent = AgentProcess::start_with(
        &daemon,
        node,
        &svid_sink(files.path(), "spiffe://example.org/batch/1", "one"),
    )
    .unwrap();
    let before = entry_count(&daemon);

    let mixed = write_entries(
        files.path(),
        "mixed.json",
        vec![
            entry("spiffe://example.org/batch/0", node, &["unix:uid:0"]),
            entry("spiffe://example.org/batch/1", node, &["unix:uid:0"]),
            entry(
                "spiffe://example.org/batch/2",
                node,
                &["unix:uid:0", "unix:gid:0"],
            ),
            // The one before, its selectors in another order: a duplicate.
            entry(
                "spiffe://example.org/batch/2",
                node,
                &["unix:gid:0", "unix:uid:0"],
            ),
            entry("spiffe://example.org/batch/3", node, &["unix:uid"]),
            entry("spiffe://example.org/mayfly/server", node, &["unix:uid:0"]),
            entry(node, node, &["unix:uid:0"]),
        ],
    );
    let out = daemon
        .cli(&["entry", "create", "--file", &mixed, "--output", "json"])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a refused entry fails the command");
    assert!(
        stderr.contains("4 of 7 entries were refused (the others were created)"),
        "{stderr}"
    );
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 7, "{results:?}");
    for (i, spiffe_id) in ["batch/0", "batch/1", "batch/2"].iter().enumerate() {
        assert_eq!(
            results[i]["created"]["spiffe_id"],
            format!("spiffe://example.org/{spiffe_id}"),
            "{:?}",
            results[i]
        );
    }
    let refused = |i: usize| {
        results[i]["refused"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(refused(3).starts_with("AlreadyExists"), "{}", refused(3));
    assert!(refused(4).starts_with("InvalidArgument"), "{}", refused(4));
    assert!(refused(4).contains("selector"), "{}", refused(4));
    assert!(
        refused(5).contains("reserved for the daemon"),
        "{}",
        refused(5)
    );
    assert!(
        refused(6).contains("is an agent's identity"),
        "{}",
        refused(6)
    );
    assert_eq!(entry_count(&daemon), before + 3);

    // Each created entry is on the trail once; the refused ones are not.
    let creates = daemon
        .cli_json(&["audit", "list", "--action", "entry.create"])
        .unwrap();
    let subjects: Vec<&str> = creates
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["subject"].as_str())
        .filter(|s| s.contains("/batch/"))
        .collect();
    assert_eq!(
        subjects,
        [
            "spiffe://example.org/batch/0",
            "spiffe://example.org/batch/1",
            "spiffe://example.org/batch/2"
        ]
    );
    // The agent serves what the batch gave it.
    wait_for(
        "the agent to write a batch entry's SVID",
        Duration::from_secs(15),
        || non_empty(&files.path().join("one.pem")),
    );

    // A document with a misspelt field is refused whole, naming the field.
    let misspelt = files.path().join("misspelt.json");
    std::fs::write(
        &misspelt,
        r#"{"entries": [{"spiffe_id": "spiffe://example.org/batch/9", "parent_id": "spiffe://example.org/node/batch", "selector": ["unix:uid:0"]}]}"#,
    )
    .unwrap();
    let err = daemon
        .cli_ok(&["entry", "create", "--file", &misspelt.to_string_lossy()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `selector`"), "{err}");
    assert!(err.contains("is not an entries document"), "{err}");
    // Neither a file and fields at once.
    let err = daemon
        .cli_ok(&[
            "entry",
            "create",
            "--file",
            &mixed,
            "--spiffe-id",
            "spiffe://example.org/batch/9",
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot be used with"), "{err}");
    assert_eq!(entry_count(&daemon), before + 3);

    // More than a call takes is refused whole, saying how many it takes.
    let (mut admin, _) = mayfly_tests::bench::admin_and_bundle(&daemon.admin_socket)
        .await
        .unwrap();
    let too_many = (0..1001)
        .map(|i| mayfly_proto::v1::CreateEntryRequest {
            spiffe_id: format!("spiffe://example.org/too-many/{i}"),
            parent_id: node.to_string(),
            selectors: vec!["unix:uid:0".into()],
            ..Default::default()
        })
        .collect();
    let status = admin
        .batch_create_entry(mayfly_proto::v1::BatchCreateEntryRequest { entries: too_many })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("at most 1000"), "{status:?}");
    assert_eq!(entry_count(&daemon), before + 3);

    // 2,500 entries: three calls, all created.
    let many = write_entries(
        files.path(),
        "many.json",
        (0..2500)
            .map(|i| {
                entry(
                    &format!("spiffe://example.org/many/{i}"),
                    &format!("spiffe://example.org/node/many-{}", i % 50),
                    &["unix:uid:1000"],
                )
            })
            .collect(),
    );
    let created = daemon
        .cli_json(&["entry", "create", "--file", &many])
        .unwrap();
    let created = created.as_array().unwrap();
    assert_eq!(created.len(), 2500);
    assert!(created.iter().all(|r| r["created"]["id"].is_string()));
    assert_eq!(entry_count(&daemon), before + 3 + 2500);
    assert!(
        daemon
            .cli_ok(&["audit", "verify"])
            .unwrap()
            .starts_with("audit log intact")
    );
}

/// On a shared PostgreSQL store, a batch made through one daemon reaches an agent streaming
/// from another, as single creations do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_through_one_daemon_reaches_an_agent_on_another() {
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
    let files = tempfile::tempdir().unwrap();
    let node = "spiffe://example.org/node/batch-ha";
    let mut sinks = String::new();
    for i in [0, 99] {
        sinks.push_str(&svid_sink(
            files.path(),
            &format!("spiffe://example.org/ha-batch/{i}"),
            &format!("s{i}"),
        ));
    }
    let _agent = AgentProcess::start_with(&second, node, &sinks).unwrap();
    let doc = write_entries(
        files.path(),
        "ha.json",
        (0..100)
            .map(|i| {
                entry(
                    &format!("spiffe://example.org/ha-batch/{i}"),
                    node,
                    &["unix:uid:0"],
                )
            })
            .collect(),
    );
    let created = first
        .cli_json(&["entry", "create", "--file", &doc])
        .unwrap();
    assert_eq!(created.as_array().unwrap().len(), 100);
    for i in [0, 99] {
        wait_for(
            "the agent on the other daemon to serve a batch entry",
            Duration::from_secs(15),
            || non_empty(&files.path().join(format!("s{i}.pem"))),
        );
    }
    assert_eq!(entry_count(&second), 100);
}
