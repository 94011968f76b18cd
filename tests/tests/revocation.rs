//! Emergency revocation and the audit trail, end to end: a real daemon, three real agents,
//! workloads holding SVIDs through the `spiffe` crate, sink files on disk, and the SQLite
//! file the audit log lives in.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use spiffe::WorkloadApiClient;

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, init, wait_for};

const A: &str = "spiffe://example.org/node/a";
const B: &str = "spiffe://example.org/node/b";
const C: &str = "spiffe://example.org/node/c";

fn create_entry(daemon: &DaemonProcess, spiffe_id: &str, parent: &str, selector: &str) -> String {
    daemon
        .create_entry(spiffe_id, parent, selector, &[])
        .unwrap()
}

/// An svid sink for `spiffe_id` writing into `dir`, with `on_revoke`.
fn svid_sink(dir: &Path, spiffe_id: &str, on_revoke: &str) -> String {
    format!(
        "[[sink]]\nkind = \"svid\"\nspiffe_id = \"{spiffe_id}\"\ncert_path = \"{d}/svid.pem\"\n\
         key_path = \"{d}/svid.key\"\nbundle_path = \"{d}/bundle.pem\"\non_revoke = \"{on_revoke}\"\n",
        d = dir.display()
    )
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mayfly-revoke-")
        .tempdir()
        .unwrap()
}

fn non_empty(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

/// `mayflyd revoke …` with JSON output: (exit code, report).
fn revoke(daemon: &DaemonProcess, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["revoke"];
    all.extend_from_slice(args);
    all.extend(["--output", "json"]);
    let out = daemon.cli(&all).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|_| {
        panic!(
            "mayflyd {} printed no report: {stdout}\n{}",
            all.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn strings(value: &Value) -> Vec<String> {
    let mut list: Vec<String> = value
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    list.sort();
    list
}

fn leaf_serial(svid: &spiffe::X509Svid) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_ref()).unwrap();
    mayfly_common::tls::hex_serial(cert.raw_serial())
}

fn audit(daemon: &DaemonProcess, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["audit", "list"];
    all.extend_from_slice(args);
    daemon.cli_json(&all).unwrap().as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_svid_is_replaced_under_a_new_key_for_a_workload_on_the_spiffe_crate() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    create_entry(&daemon, "spiffe://example.org/web", A, "unix:uid:0");
    let agent = AgentProcess::start(&daemon, A).unwrap();
    let _b = AgentProcess::start(&daemon, B).unwrap();
    let _c = AgentProcess::start(&daemon, C).unwrap();

    let api = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let mut stream = Box::pin(api.stream_x509_contexts().await.unwrap());
    let first = loop {
        let context = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .expect("an X509 context")
            .expect("the stream stays open")
            .expect("an X509 context, not an error");
        if !context.svids().is_empty() {
            break context;
        }
    };
    let old = first.svids()[0].clone();
    let old_serial = leaf_serial(&old);

    let (code, report) = revoke(
        &daemon,
        &[
            "svid",
            "--serial",
            &old_serial,
            "--reason",
            "key copied off the host",
        ],
    );
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["agents_affected"], 1, "{report:#}");
    assert_eq!(strings(&report["acknowledged"]), vec![A.to_string()]);
    assert_eq!(strings(&report["serials"]), vec![old_serial.clone()]);
    let detail = &report["agents"][0]["detail"];
    assert_eq!(
        strings(&detail["dropped_serials"]),
        vec![old_serial.clone()]
    );
    assert_eq!(
        strings(&detail["reissued"]),
        vec!["spiffe://example.org/web".to_string()]
    );

    // The open stream delivers the replacement: same identity, new serial, new key.
    let replaced = loop {
        let context = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an update after the revocation")
            .unwrap()
            .unwrap();
        if context
            .svids()
            .first()
            .is_some_and(|s| leaf_serial(s) != old_serial)
        {
            break context;
        }
    };
    let new = &replaced.svids()[0];
    assert_eq!(new.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_ne!(
        new.private_key().as_ref(),
        old.private_key().as_ref(),
        "the fresh SVID is under a new key"
    );
    // A fresh fetch agrees: the revoked serial is served nowhere.
    let fetched = api.fetch_x509_context().await.unwrap();
    assert!(fetched.svids().iter().all(|s| leaf_serial(s) != old_serial));

    // A serial nobody issued is refused by name, and nothing is recorded as revoked.
    let out = daemon
        .cli(&["revoke", "svid", "--serial", "0badc0de", "--reason", "typo"])
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("serial 0badc0de was not issued"));
    // --reason is required.
    let out = daemon
        .cli(&["revoke", "svid", "--serial", &old_serial])
        .unwrap();
    assert!(!out.status.success());
    let listed = daemon.cli_json(&["revoke", "list"]).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed:#}");

    let records = audit(&daemon, &["--action", "revoke"]);
    let actions: Vec<&str> = records
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"revoke.svid") && actions.contains(&"revoke.ack"),
        "{actions:?}"
    );
    let failed = records
        .iter()
        .find(|r| r["subject"] == "0badc0de")
        .expect("the refused revocation is on the audit trail");
    assert_eq!(failed["outcome"], "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_entry_removes_its_files_and_reports_exactly_which_agents_acknowledged() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let db = "spiffe://example.org/db";
    create_entry(&daemon, db, A, "unix:uid:0");
    create_entry(&daemon, db, B, "unix:uid:0");
    create_entry(&daemon, "spiffe://example.org/other", C, "unix:uid:0");
    // A secret granted to the revoked identity alone goes with it.
    daemon
        .define_secret(&format!(
            "name = \"db-password\"\nschedule = \"@yearly\"\ngrants = [\"{db}\"]\n[store]\nkind = \"local\"\n[target]\nkind = \"none\"\n"
        ))
        .unwrap();
    daemon.cli_ok(&["secret", "rotate", "db-password"]).unwrap();
    let (dir_a, dir_b, dir_c) = (temp_dir(), temp_dir(), temp_dir());
    let password = dir_a.path().join("db-password");
    let a = AgentProcess::start_with(
        &daemon,
        A,
        &format!(
            "{}[[sink]]\nkind = \"secret\"\nsecret = \"db-password\"\npath = \"{}\"\n",
            svid_sink(dir_a.path(), db, "remove"),
            password.display()
        ),
    )
    .unwrap();
    let _b = AgentProcess::start_with(&daemon, B, &svid_sink(dir_b.path(), db, "blank")).unwrap();
    let _c = AgentProcess::start_with(
        &daemon,
        C,
        &svid_sink(dir_c.path(), "spiffe://example.org/other", "remove"),
    )
    .unwrap();
    for dir in [dir_a.path(), dir_b.path(), dir_c.path()] {
        let cert = dir.join("svid.pem");
        wait_for(
            "the svid sinks' first files",
            Duration::from_secs(15),
            || non_empty(&cert),
        );
    }
    assert!(non_empty(&password));

    let started = Instant::now();
    let (code, report) = revoke(
        &daemon,
        &[
            "entry",
            "--spiffe-id",
            db,
            "--reason",
            "database identity compromised",
        ],
    );
    let took = started.elapsed();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["agents_affected"], 2, "{report:#}");
    assert_eq!(
        strings(&report["acknowledged"]),
        vec![A.to_string(), B.to_string()]
    );
    assert!(strings(&report["not_acknowledged"]).is_empty());
    assert!(report["elapsed_ms"].as_i64().unwrap() <= took.as_millis() as i64);
    assert_eq!(
        report["serials"].as_array().unwrap().len(),
        2,
        "one SVID per agent"
    );

    // Removed on A, blanked on B, untouched on C; each agent said so.
    for name in ["svid.pem", "svid.key", "bundle.pem"] {
        assert!(!dir_a.path().join(name).exists(), "{name} removed on A");
        let blank = std::fs::metadata(dir_b.path().join(name)).unwrap();
        assert_eq!(blank.len(), 0, "{name} blanked on B");
        assert!(non_empty(&dir_c.path().join(name)), "{name} kept on C");
    }
    let by_agent = |id: &str| {
        report["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["agent"] == id)
            .unwrap()["detail"]
            .clone()
    };
    assert_eq!(by_agent(A)["files_removed"].as_array().unwrap().len(), 4);
    assert!(
        !password.exists(),
        "the secret granted to the revoked identity is gone"
    );
    assert_eq!(by_agent(B)["files_blanked"].as_array().unwrap().len(), 3);

    // The entries are gone and the workload on A has no identity any more.
    let left = daemon
        .cli_json(&["entry", "list", "--spiffe-id", db])
        .unwrap();
    assert!(left.as_array().unwrap().is_empty(), "{left:#}");
    let fetch = a.api(&["fetch", "x509"], None).unwrap();
    assert!(
        !fetch.status.success(),
        "no SVID is served after the revocation"
    );
    assert!(
        String::from_utf8_lossy(&fetch.stderr).contains("no identity issued"),
        "{}",
        String::from_utf8_lossy(&fetch.stderr)
    );

    // The refusal is on the daemon's audit trail, reported by the agent.
    wait_for("the agent's denial report", Duration::from_secs(10), || {
        audit(&daemon, &["--action", "workload.denied"])
            .iter()
            .any(|r| r["actor"] == A && r["subject"] == "FetchX509SVID" && r["outcome"] == "denied")
    });

    // The same revocation, by selector, reaches C alone.
    let (code, report) = revoke(
        &daemon,
        &[
            "selector",
            "unix:uid:0",
            "--reason",
            "uid 0 workloads are suspect",
        ],
    );
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(strings(&report["acknowledged"]), vec![C.to_string()]);
    wait_for("C's files removed", Duration::from_secs(5), || {
        !dir_c.path().join("svid.pem").exists()
    });
    let again = daemon
        .cli(&["revoke", "selector", "unix:uid:0", "--reason", "again"])
        .unwrap();
    assert_eq!(
        again.status.code(),
        Some(1),
        "no entry carries the selector any more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_during_a_revocation_applies_it_on_reconnect_before_serving() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let web = "spiffe://example.org/web";
    create_entry(&daemon, web, A, "unix:uid:0");
    create_entry(&daemon, web, B, "unix:uid:0");
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let mut a =
        AgentProcess::start_with(&daemon, A, &svid_sink(dir_a.path(), web, "remove")).unwrap();
    let _b = AgentProcess::start_with(&daemon, B, &svid_sink(dir_b.path(), web, "remove")).unwrap();
    for dir in [dir_a.path(), dir_b.path()] {
        let cert = dir.join("svid.pem");
        wait_for("first files", Duration::from_secs(15), || non_empty(&cert));
    }
    a.kill();

    let (code, report) = revoke(
        &daemon,
        &[
            "entry",
            "--spiffe-id",
            web,
            "--reason",
            "rotate out",
            "--wait",
            "1s",
        ],
    );
    assert_eq!(code, 3, "an agent did not acknowledge: exit 3\n{report:#}");
    assert_eq!(strings(&report["acknowledged"]), vec![B.to_string()]);
    assert_eq!(strings(&report["not_acknowledged"]), vec![A.to_string()]);
    let id = report["id"].as_str().unwrap().to_string();
    assert!(
        dir_a.path().join("svid.pem").exists(),
        "A was down: its files are still there"
    );
    let table = daemon
        .cli(&[
            "revoke",
            "entry",
            "--spiffe-id",
            "spiffe://example.org/nothing",
            "--reason",
            "x",
        ])
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stderr).contains("no entry gives"));

    // A comes back: the revocation is in its first full state, applied before it serves.
    a.spawn().unwrap();
    let fetch = a.api(&["fetch", "x509"], None).unwrap();
    assert!(!fetch.status.success(), "A serves nothing revoked");
    assert!(
        String::from_utf8_lossy(&fetch.stderr).contains("no identity issued"),
        "{}",
        String::from_utf8_lossy(&fetch.stderr)
    );
    wait_for("A's files removed", Duration::from_secs(10), || {
        !dir_a.path().join("svid.pem").exists()
    });
    wait_for("A's acknowledgement", Duration::from_secs(10), || {
        let status = daemon.cli_json(&["revoke", "status", &id]).unwrap();
        strings(&status["acknowledged"]) == vec![A.to_string(), B.to_string()]
    });
    let status = daemon.cli_ok(&["revoke", "status", &id]).unwrap();
    assert!(
        status.contains("2 agents affected, 2 acknowledged, 0 not acknowledged"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_agent_bans_it_and_it_removes_everything_before_it_stops() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let web = "spiffe://example.org/web";
    create_entry(&daemon, web, A, "unix:uid:0");
    let dir = temp_dir();
    let mut a =
        AgentProcess::start_with(&daemon, A, &svid_sink(dir.path(), web, "remove")).unwrap();
    let cert = dir.path().join("svid.pem");
    wait_for("first files", Duration::from_secs(15), || non_empty(&cert));

    let (code, report) = revoke(&daemon, &["agent", "--id", A, "--reason", "host stolen"]);
    assert_eq!(code, 0, "{report:#}\n{}", a.log());
    assert_eq!(strings(&report["acknowledged"]), vec![A.to_string()]);
    // Its own SVID and its workload's are both deny-listed.
    assert_eq!(report["serials"].as_array().unwrap().len(), 2, "{report:#}");
    assert!(!cert.exists(), "files removed before the agent stopped");
    let status = a.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(!status.success(), "a banned agent stops with an error");
    let agents = daemon.cli_json(&["agent", "list"]).unwrap();
    assert_eq!(agents[0]["status"], "banned", "{agents:#}");
    let out = daemon
        .cli(&["revoke", "agent", "--id", A, "--reason", "again"])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("already banned"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_secret_invalidates_the_old_password_on_postgres_and_rewrites_the_file() {
    init();
    let pg = mayfly_tests::services::PasswordPostgres::start().unwrap();
    let user = pg.role("billing", "initial-Password-1").await.unwrap();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    daemon
        .define_secret(&format!(
            "name = \"billing-db\"\nschedule = \"@yearly\"\nusers = [\"{user}\"]\ngrants = [\"{A}\"]\n\
             [store]\nkind = \"local\"\n[target]\nkind = \"postgres\"\nadmin_url = \"{}\"\n\
             login_url = \"postgres://127.0.0.1:{}/postgres\"\n",
            pg.admin_url(),
            pg.port
        ))
        .unwrap();
    daemon.cli_ok(&["secret", "rotate", "billing-db"]).unwrap();
    let (_, _, old) = daemon.current_secret("billing-db").unwrap();
    let dir = temp_dir();
    let file = dir.path().join("password");
    let _a = AgentProcess::start_with(
        &daemon,
        A,
        &format!(
            "[[sink]]\nkind = \"secret\"\nsecret = \"billing-db\"\npath = \"{}\"\n",
            file.display()
        ),
    )
    .unwrap();
    wait_for("the secret file", Duration::from_secs(15), || {
        std::fs::read_to_string(&file).is_ok_and(|v| v == old)
    });
    pg.login(&user, &old).await.unwrap();

    let (code, report) = revoke(
        &daemon,
        &["secret", "billing-db", "--reason", "leaked in a log"],
    );
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(strings(&report["acknowledged"]), vec![A.to_string()]);
    let (_, _, new) = daemon.current_secret("billing-db").unwrap();
    assert_ne!(new, old);
    // Acknowledged means the file already holds the new value.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), new);
    assert!(
        pg.login(&user, &old).await.is_err(),
        "the old password is refused"
    );
    pg.login(&user, &new).await.unwrap();

    // No value reaches the audit trail.
    let export = daemon
        .cli_ok(&["audit", "export", "--format", "jsonl"])
        .unwrap();
    assert!(!export.contains(&old) && !export.contains(&new));
    assert!(export.contains("revoke.secret") && export.contains("rotation.promoted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_or_deleted_audit_row_makes_verify_name_that_row() {
    use sqlx::Connection as _;

    init();
    let mut daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    create_entry(&daemon, "spiffe://example.org/web", A, "unix:uid:0");
    let agent = AgentProcess::start(&daemon, A).unwrap();
    wait_for("a signed SVID", Duration::from_secs(15), || {
        agent
            .api(&["fetch", "x509"], None)
            .is_ok_and(|o| o.status.success())
    });
    let records = audit(&daemon, &[]);
    let actions: Vec<&str> = records
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    for wanted in [
        "daemon.start",
        "entry.create",
        "token.create",
        "agent.attest",
        "svid.sign",
    ] {
        assert!(
            actions.contains(&wanted),
            "{wanted} missing from {actions:?}"
        );
    }
    let sign = records.iter().find(|r| r["action"] == "svid.sign").unwrap();
    assert_eq!(sign["actor"], A);
    assert!(sign["detail"].as_str().unwrap().contains("serials"));
    let verified = daemon.cli_ok(&["audit", "verify"]).unwrap();
    assert!(verified.starts_with("audit log intact"), "{verified}");
    let only = audit(&daemon, &["--subject", "spiffe://example.org/web"]);
    assert!(
        !only.is_empty()
            && only
                .iter()
                .all(|r| r["subject"] == "spiffe://example.org/web")
    );
    let export = daemon
        .cli_ok(&["audit", "export", "--format", "jsonl"])
        .unwrap();
    assert_eq!(export.lines().count(), records.len());
    let target = records[records.len() / 2]["seq"].as_i64().unwrap();

    // Edit one row behind the daemon's back, directly in the SQLite file.
    let db = daemon.data_dir().join("mayfly.db");
    let url = format!("sqlite://{}", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let changed = sqlx::query("UPDATE audit_log SET subject = subject || 'x' WHERE seq = ?")
        .bind(target)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(changed.rows_affected(), 1);
    let out = daemon.cli(&["audit", "verify"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "broken at record {target}: record {target} was altered"
        )),
        "{stderr}"
    );

    // Deleting a row instead is named as a missing record.
    sqlx::query(
        "UPDATE audit_log SET subject = substr(subject, 1, length(subject) - 1) WHERE seq = ?",
    )
    .bind(target)
    .execute(&mut conn)
    .await
    .unwrap();
    assert!(daemon.cli_ok(&["audit", "verify"]).is_ok(), "restored");
    sqlx::query("DELETE FROM audit_log WHERE seq = ?")
        .bind(target)
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let out = daemon.cli(&["audit", "verify"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("record {target} is missing: it was deleted")),
        "{stderr}"
    );

    // A restarted daemon keeps appending to the chain it finds.
    drop(agent);
    daemon.terminate(Duration::from_secs(10)).unwrap();
    daemon.spawn().unwrap();
    let records = audit(&daemon, &["--action", "daemon.start"]);
    assert_eq!(records.len(), 2);
}

fn issuer_and_subject(der: &[u8]) -> (String, String) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    (cert.issuer().to_string(), cert.subject().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tainted_ca_is_replaced_on_every_agent_and_then_leaves_the_bundle() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    create_entry(&daemon, "spiffe://example.org/web", A, "unix:uid:0");
    let a = AgentProcess::start(&daemon, A).unwrap();
    let _b = AgentProcess::start(&daemon, B).unwrap();
    let old_ca = daemon.bundle().unwrap();
    assert_eq!(old_ca.len(), 1);
    let (_, old_ca_subject) = issuer_and_subject(&old_ca[0]);

    let api = WorkloadApiClient::connect_to(a.endpoint()).await.unwrap();
    let mut stream = Box::pin(api.stream_x509_contexts().await.unwrap());
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .expect("an X509 context")
            .unwrap()
            .unwrap()
    };
    let mut first = next().await;
    while first.svids().is_empty() {
        first = next().await;
    }
    let old_serial = leaf_serial(&first.svids()[0]);
    assert_eq!(
        issuer_and_subject(first.svids()[0].leaf().as_ref()).0,
        old_ca_subject
    );
    let agents_before = daemon.cli_json(&["agent", "list"]).unwrap();

    // Nothing is tainted yet, and the active CA cannot be revoked.
    let out = daemon.cli(&["ca", "revoke"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CA has been tainted"));

    let (code, report) = {
        let out = daemon
            .cli(&[
                "ca",
                "taint",
                "--reason",
                "CA key on a stolen backup",
                "--output",
                "json",
            ])
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}\n{}", String::from_utf8_lossy(&out.stderr), a.log()));
        (out.status.code(), report)
    };
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["kind"], "ca");
    assert_eq!(
        strings(&report["acknowledged"]),
        vec![A.to_string(), B.to_string()]
    );
    assert_eq!(strings(&report["serials"]), vec![old_serial.clone()]);

    // The workload's SVID is re-signed by the new CA, under a new key.
    let slots = daemon.cli_json(&["ca", "show"]).unwrap();
    let states: Vec<&str> = slots
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert!(
        states.contains(&"active") && states.contains(&"retired"),
        "{slots:#}"
    );
    let replaced = loop {
        let context = next().await;
        if context
            .svids()
            .first()
            .is_some_and(|s| leaf_serial(s) != old_serial)
        {
            break context;
        }
    };
    let (issuer, _) = issuer_and_subject(replaced.svids()[0].leaf().as_ref());
    assert_ne!(issuer, old_ca_subject, "signed by the new CA");
    // Both agents renewed their own SVIDs.
    let agents_after = daemon.cli_json(&["agent", "list"]).unwrap();
    for (before, after) in agents_before
        .as_array()
        .unwrap()
        .iter()
        .zip(agents_after.as_array().unwrap())
    {
        assert_eq!(before["spiffe_id"], after["spiffe_id"]);
        assert_ne!(before["serial"], after["serial"], "agent SVID renewed");
    }

    // Nothing depends on the old CA any more: it leaves the bundle.
    daemon.cli_ok(&["ca", "revoke"]).unwrap();
    let bundle = daemon.bundle().unwrap();
    assert_eq!(bundle.len(), 1);
    assert_ne!(bundle[0], old_ca[0]);
    let revoked_again = daemon.cli(&["ca", "revoke"]).unwrap();
    assert!(!revoked_again.status.success());

    // The agents still work under the new CA alone: a new entry reaches the workload.
    create_entry(&daemon, "spiffe://example.org/after", A, "unix:uid:0");
    loop {
        let context = next().await;
        if context
            .svids()
            .iter()
            .any(|s| s.spiffe_id().to_string() == "spiffe://example.org/after")
        {
            break;
        }
    }
    let records = audit(&daemon, &["--action", "ca.revoke"]);
    assert!(records.iter().any(|r| r["outcome"] == "ok"), "{records:?}");
}
