//! Bringing existing secrets under Mayfly, as a new user does on the first day: a Vault KV
//! secret written by hand a second earlier, and an AWS Secrets Manager secret created by
//! another tool (boto3), are adopted (the audit trail says so) and rotated; a secret Mayfly
//! manages that another writer changed is refused with what was seen and what to do; and
//! `mayfly-agent exec` against a socket nobody serves names the socket, not a grant.

use std::process::Command;

use serde_json::Value;

use mayfly_tests::harness::{DaemonOptions, DaemonProcess, binary, init};
use mayfly_tests::services;

fn adopted(daemon: &DaemonProcess, name: &str) -> Vec<Value> {
    daemon
        .cli_json(&["audit", "list", "--action", "secret.adopt"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["subject"] == name)
        .cloned()
        .collect()
}

fn current(daemon: &DaemonProcess, name: &str) -> Value {
    daemon
        .cli_json(&["secret", "get", name])
        .unwrap_or_else(|e| panic!("secret get {name}: {e}"))
}

/// `bao kv put` against the dev server: a writer that is not Mayfly.
fn bao_put(url: &str, path: &str, fields: &[&str]) {
    let out = Command::new("bao")
        .args(["kv", "put", "-mount=secret", path])
        .args(fields)
        .env("BAO_ADDR", url)
        .env("BAO_TOKEN", "root")
        .output()
        .expect("bao on PATH (scripts/test installs it into .venv)");
    assert!(
        out.status.success(),
        "bao kv put: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_vault_secret_written_by_hand_a_second_ago_is_adopted_and_rotated() {
    init();
    let bao = services::openbao().unwrap();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let path = format!("team/orders-db-{:08x}", rand::random::<u32>());
    bao_put(
        &bao.url,
        &path,
        &["username=orders", "password=written-by-hand"],
    );
    daemon
        .define_secret(&format!(
            "name = \"orders-db\"\nschedule = \"@yearly\"\nusers = [\"orders\"]\n[store]\n\
             kind = \"vault\"\naddress = \"{}\"\nmount = \"secret\"\npath = \"{path}\"\n\
             token = \"root\"\n[target]\nkind = \"none\"\n",
            bao.url
        ))
        .unwrap();
    // Before the first rotation, the hand-written value is not Mayfly's yet.
    daemon.cli_ok(&["secret", "rotate", "orders-db"]).unwrap();
    let records = adopted(&daemon, "orders-db");
    assert_eq!(records.len(), 1, "{records:#?}");
    assert!(
        records[0].to_string().contains("KV version 1"),
        "the record names the version it adopted: {:#}",
        records[0]
    );
    let rotated = current(&daemon, "orders-db");
    assert_eq!(rotated["username"], "orders");
    assert_ne!(rotated["value"], "written-by-hand", "{rotated:#}");
    // The adopted value is kept as the previous version, as any rotation keeps one.
    let status = daemon.cli_json(&["secret", "status", "orders-db"]).unwrap();
    assert!(
        status.to_string().contains("adopted-"),
        "the adopted version is listed: {status:#}"
    );

    // Now Mayfly manages it: a write by another hand is refused, naming what was seen.
    bao_put(
        &bao.url,
        &path,
        &["username=orders", "password=changed-by-hand"],
    );
    let err = daemon
        .cli_ok(&["secret", "rotate", "orders-db"])
        .expect_err("a managed secret changed by another writer is not overwritten");
    let err = err.to_string();
    assert!(
        err.contains("KV version 3") && err.contains("not a Mayfly rotation"),
        "{err}"
    );
    assert!(
        err.contains("mayflyd secret rotate"),
        "says what to do: {err}"
    );
    assert_eq!(
        adopted(&daemon, "orders-db").len(),
        1,
        "a managed secret is not adopted again"
    );
    assert!(
        daemon
            .cli_ok(&["audit", "verify"])
            .unwrap()
            .starts_with("audit log intact")
    );
}

#[tokio::test]
async fn an_aws_secret_created_by_another_tool_is_adopted_and_rotated() {
    init();
    let moto = services::moto().unwrap();
    let id = format!("orders-db-{:08x}", rand::random::<u32>());
    // Created with boto3, as Terraform or the console would: not by Mayfly.
    let out = Command::new("python3")
        .args([
            "-c",
            "import boto3, json, sys; c = boto3.client('secretsmanager', endpoint_url=sys.argv[1], \
             region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing'); \
             c.create_secret(Name=sys.argv[2], SecretString=json.dumps({'username': 'orders', 'password': 'made-elsewhere'}))",
            &moto.url,
            &id,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "boto3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let daemon = DaemonProcess::start(DaemonOptions {
        env: vec![
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ],
        ..DaemonOptions::default()
    })
    .unwrap();
    daemon
        .define_secret(&format!(
            "name = \"orders-db\"\nschedule = \"@yearly\"\nusers = [\"orders\"]\n[store]\n\
             kind = \"aws\"\nsecret_id = \"{id}\"\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n\
             [target]\nkind = \"none\"\n",
            moto.url
        ))
        .unwrap();
    assert_eq!(current(&daemon, "orders-db")["value"], "made-elsewhere");
    daemon.cli_ok(&["secret", "rotate", "orders-db"]).unwrap();
    assert_eq!(adopted(&daemon, "orders-db").len(), 1);
    assert_ne!(current(&daemon, "orders-db")["value"], "made-elsewhere");
    // Rotated by Mayfly since: nothing more to adopt.
    daemon.cli_ok(&["secret", "rotate", "orders-db"]).unwrap();
    assert_eq!(adopted(&daemon, "orders-db").len(), 1);
}

#[tokio::test]
async fn a_local_secret_imported_with_its_value_starts_from_it() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let definition = dir.path().join("legacy.toml");
    std::fs::write(
        &definition,
        "name = \"legacy-db\"\nschedule = \"@yearly\"\nusers = [\"legacy\"]\n[store]\n\
         kind = \"local\"\n[target]\nkind = \"none\"\n",
    )
    .unwrap();
    let value = dir.path().join("value");
    std::fs::write(&value, "the-password-today\n").unwrap();
    let file = definition.to_str().unwrap();
    let value_file = value.to_str().unwrap();

    // A Vault or AWS secret is adopted where it lives: nothing is defined.
    let vault = dir.path().join("vault.toml");
    std::fs::write(
        &vault,
        "name = \"in-vault\"\nschedule = \"@yearly\"\n[store]\nkind = \"vault\"\n\
         address = \"http://127.0.0.1:1\"\nmount = \"secret\"\npath = \"x\"\ntoken = \"t\"\n\
         [target]\nkind = \"none\"\n",
    )
    .unwrap();
    let err = daemon
        .cli_ok(&[
            "secret",
            "create",
            "--file",
            vault.to_str().unwrap(),
            "--value-file",
            value_file,
        ])
        .expect_err("a value is imported into a local store only")
        .to_string();
    assert!(err.contains("local store only"), "{err}");
    assert!(daemon.cli_ok(&["secret", "show", "in-vault"]).is_err());

    daemon
        .cli_ok(&[
            "secret",
            "create",
            "--file",
            file,
            "--value-file",
            value_file,
        ])
        .unwrap();
    let now = current(&daemon, "legacy-db");
    assert_eq!(now["value"], "the-password-today");
    assert_eq!(now["username"], "legacy");
    assert_eq!(adopted(&daemon, "legacy-db").len(), 1);
    daemon.cli_ok(&["secret", "rotate", "legacy-db"]).unwrap();
    assert_ne!(current(&daemon, "legacy-db")["value"], "the-password-today");
    assert_eq!(adopted(&daemon, "legacy-db").len(), 1, "recorded once");
}

#[test]
fn exec_against_a_socket_nobody_serves_names_the_socket() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let out = Command::new(binary("mayfly-agent").unwrap())
        .arg("exec")
        .arg("--socket")
        .arg(format!("unix://{}", socket.display()))
        .args(["--wait", "2s", "--env", "DB=secret:orders-db", "--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("cannot reach the agent"), "{stderr}");
    assert!(stderr.contains(&socket.display().to_string()), "{stderr}");
    assert!(!stderr.contains("not granted"), "{stderr}");
}
