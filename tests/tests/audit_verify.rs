//! `audit verify` against a head kept elsewhere, and on an export without a daemon: a real
//! daemon, the SQLite file its audit log lives in, and the `mayflyd` command line.

use std::time::Duration;

use sqlx::Connection as _;

use mayfly_tests::harness::{DaemonOptions, DaemonProcess, init};

const AGENT: &str = "spiffe://example.org/node/a";

/// Records a few operator changes, each one audit record.
fn make_records(daemon: &DaemonProcess, names: &[&str]) {
    for name in names {
        daemon
            .create_entry(
                &format!("spiffe://example.org/{name}"),
                AGENT,
                "unix:uid:0",
                &[],
            )
            .unwrap();
    }
}

/// Runs `audit verify` with `args`, which must find the log intact; the head it prints
/// for `--head`.
fn intact_head(daemon: &DaemonProcess, args: &[&str]) -> String {
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    let out = daemon.cli_ok(&all).unwrap();
    assert!(out.starts_with("audit log intact"), "{out}");
    out.lines()
        .find_map(|line| line.strip_prefix("head "))
        .unwrap_or_else(|| panic!("no head line in {out:?}"))
        .to_string()
}

/// Runs `audit verify` with `args`, which must fail (exit 1); what it said.
fn broken(daemon: &DaemonProcess, args: &[&str]) -> String {
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    let out = daemon.cli(&all).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_tail_fails_against_the_noted_head_and_an_export_verifies_offline() {
    init();
    let mut daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    make_records(&daemon, &["web", "db", "cache"]);
    let noted = intact_head(&daemon, &[]);
    let (seq, hash) = noted.split_once(':').unwrap();
    let seq: i64 = seq.parse().unwrap();
    assert!(seq >= 4 && hash.len() == 64, "{noted}");
    // The head it printed is taken back.
    assert_eq!(intact_head(&daemon, &["--head", &noted]), noted);

    // Behind the daemon's back: the last two records deleted, and the daemon, started
    // again, chains its new records onto what is left, so nothing looks broken.
    daemon.terminate(Duration::from_secs(10)).unwrap();
    let db = daemon.data_dir().join("mayfly.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let deleted = sqlx::query("DELETE FROM audit_log WHERE seq >= ?")
        .bind(seq - 1)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted.rows_affected(), 2);
    conn.close().await.unwrap();
    daemon.spawn().unwrap();
    make_records(&daemon, &["forged-1", "forged-2", "forged-3"]);
    let head = intact_head(&daemon, &[]);
    assert!(
        head.split_once(':').unwrap().0.parse::<i64>().unwrap() > seq,
        "{head}"
    );

    // The head noted before says otherwise, and names the record.
    let said = broken(&daemon, &["--head", &noted]);
    assert!(
        said.contains(&format!("broken at record {seq}: record {seq} has hash"))
            && said.contains(&format!("not the head's {hash}")),
        "{said}"
    );
    let garbled = daemon
        .cli(&["audit", "verify", "--head", "12:xyz"])
        .unwrap();
    assert!(!garbled.status.success());
    assert!(
        String::from_utf8_lossy(&garbled.stderr).contains("64 hex digits"),
        "{}",
        String::from_utf8_lossy(&garbled.stderr)
    );

    // An export checks without the daemon, against either head.
    let export = daemon.cli_ok(&["audit", "export"]).unwrap();
    daemon.terminate(Duration::from_secs(10)).unwrap();
    let file = daemon.dir.path().join("audit.jsonl");
    std::fs::write(&file, &export).unwrap();
    let file_arg = file.to_string_lossy().to_string();
    assert_eq!(intact_head(&daemon, &["--file", &file_arg]), head);
    assert_eq!(
        intact_head(&daemon, &["--file", &file_arg, "--head", &head]),
        head
    );
    let said = broken(&daemon, &["--file", &file_arg, "--head", &noted]);
    assert!(
        said.contains(&format!("broken at record {seq}: record {seq} has hash")),
        "{said}"
    );

    // One line edited in the file is named by its seq.
    let lines: Vec<&str> = export.lines().collect();
    let target = 3;
    let mut record: serde_json::Value = serde_json::from_str(lines[target - 1]).unwrap();
    assert_eq!(record["seq"], target as i64);
    record["reason"] = "nothing happened".into();
    let mut edited = lines.clone();
    let line = record.to_string();
    edited[target - 1] = &line;
    std::fs::write(&file, edited.join("\n")).unwrap();
    let said = broken(&daemon, &["--file", &file_arg]);
    assert!(
        said.contains(&format!(
            "broken at record {target}: record {target} was altered"
        )),
        "{said}"
    );
}
