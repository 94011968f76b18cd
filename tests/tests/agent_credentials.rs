//! TTL-bound credentials through the agent, end to end: a real daemon, a real agent and a
//! PostgreSQL of the test's own that checks passwords. Workloads run `mayfly-agent creds`
//! under their own uids, the way an app's start script would: the user it prints logs in,
//! a second call is served from the agent's cache, a workload without a grant is refused
//! with nothing issued, and a revoked lease is replaced by a new one.

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sqlx::Connection as _;

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, binary, init, wait_for};
use mayfly_tests::services::PasswordPostgres;

const AGENT: &str = "spiffe://example.org/node/creds-agent";
const APP: &str = "spiffe://example.org/orders";
const OTHER: &str = "spiffe://example.org/reports";
const APP_UID: u32 = 1000;
const OTHER_UID: u32 = 1001;
const WAIT: Duration = Duration::from_secs(20);

/// `mayfly-agent creds ARGS` against `agent`'s socket, run as `uid`.
fn creds(agent: &AgentProcess, args: &[&str], uid: u32) -> Output {
    use std::os::unix::process::CommandExt as _;
    Command::new(binary("mayfly-agent").unwrap())
        .arg("creds")
        .args(args)
        .arg("--socket")
        .arg(&agent.socket_path)
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `creds get orders-db --format json` as the app, once the agent serves it.
fn app_credential(agent: &AgentProcess) -> serde_json::Value {
    let mut last = String::new();
    let mut credential = None;
    wait_for("the app's credential", WAIT, || {
        let out = creds(agent, &["get", "orders-db", "--format", "json"], APP_UID);
        if out.status.success() {
            credential = Some(serde_json::from_slice(&out.stdout).unwrap());
            return true;
        }
        // Before the agent has the app's entry it answers "no identity issued".
        let why = stderr(&out);
        if why != last {
            eprintln!("creds get as uid {APP_UID}: {why}");
            last = why;
        }
        false
    });
    credential.expect("wait_for returned, so the credential arrived")
}

fn value<'a>(credential: &'a serde_json::Value, key: &str) -> &'a str {
    credential["values"][key].as_str().unwrap()
}

fn live_leases(daemon: &DaemonProcess) -> Vec<serde_json::Value> {
    daemon
        .cli_json(&["lease", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

async fn role_exists(pg: &PasswordPostgres, role: &str) -> bool {
    let mut conn = sqlx::PgConnection::connect(&pg.admin_url()).await.unwrap();
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_roles WHERE rolname = $1")
        .bind(role)
        .fetch_optional(&mut conn)
        .await
        .unwrap();
    found.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_gets_its_database_user_from_the_agent_and_a_new_one_once_revoked() {
    init();
    let pg = PasswordPostgres::start().unwrap();
    let daemon = DaemonProcess::start(DaemonOptions {
        env: vec![("MAYFLY_LEASE_SWEEP_MS".into(), "200".into())],
        ..DaemonOptions::default()
    })
    .unwrap();
    let definition = daemon.dir.path().join("orders-db.toml");
    std::fs::write(
        &definition,
        format!(
            "name = \"orders-db\"\ngrants = [\"{APP}\"]\ndefault_ttl = \"10m\"\nmax_ttl = \"1h\"\n\
             [backend]\nkind = \"postgres_dynamic\"\nadmin_url = \"{}\"\n",
            pg.admin_url()
        ),
    )
    .unwrap();
    daemon
        .cli_ok(&[
            "credential",
            "create",
            "--file",
            definition.to_str().unwrap(),
        ])
        .unwrap();
    daemon
        .create_entry(APP, AGENT, &format!("unix:uid:{APP_UID}"), &[])
        .unwrap();
    daemon
        .create_entry(OTHER, AGENT, &format!("unix:uid:{OTHER_UID}"), &[])
        .unwrap();
    let agent = AgentProcess::start(&daemon, AGENT).unwrap();

    // (a) The app's user logs in; asking again is served from the agent's cache.
    let first = app_credential(&agent);
    assert_eq!(first["spiffe_id"], APP);
    assert_eq!(first["kind"], "postgres_dynamic");
    let lease = first["lease_id"].as_str().unwrap().to_owned();
    let (user, password) = (value(&first, "username"), value(&first, "password"));
    pg.login(user, password).await.unwrap();
    let again = creds(&agent, &["get", "orders-db", "--format", "json"], APP_UID);
    assert!(again.status.success(), "{}", stderr(&again));
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["lease_id"], lease.as_str(), "the cached lease");
    assert_eq!(value(&again, "password"), password);
    let leases = live_leases(&daemon);
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0]["id"], lease.as_str());
    assert_eq!(leases[0]["holder"], APP);

    // (b) A workload with an entry of its own but no grant: refused, nothing issued.
    let refused = creds(&agent, &["get", "orders-db"], OTHER_UID);
    assert!(!refused.status.success());
    let why = stderr(&refused);
    assert!(why.contains("not granted"), "{why}");
    assert_eq!(why.trim_end().lines().count(), 1, "one line: {why}");
    assert!(refused.stdout.is_empty());
    assert_eq!(live_leases(&daemon).len(), 1, "the refusal issued nothing");

    // (c) Revoked: the agent drops its copy before it acknowledges (so the revocation
    // exits 0), and the next request gets a new user while the old one is gone.
    let revoked = daemon
        .cli(&[
            "revoke", "lease", "--id", &lease, "--reason", "test", "--output", "json",
        ])
        .unwrap();
    assert!(
        revoked.status.success(),
        "{}\nagent log:\n{}",
        stderr(&revoked),
        agent.log()
    );
    let report: serde_json::Value = serde_json::from_slice(&revoked.stdout).unwrap();
    assert_eq!(report["acknowledged"][0], AGENT, "{report}");
    let actions = report["agents"][0]["detail"]["actions"].to_string();
    assert!(
        actions.contains(&format!("dropped the cached credential of lease {lease}")),
        "{report}"
    );
    let renewed = app_credential(&agent);
    let new_lease = renewed["lease_id"].as_str().unwrap().to_owned();
    assert_ne!(new_lease, lease, "a new lease after the revocation");
    assert!(!role_exists(&pg, user).await, "the revoked role is dropped");
    assert!(pg.login(user, password).await.is_err(), "no login as it");
    pg.login(value(&renewed, "username"), value(&renewed, "password"))
        .await
        .unwrap();

    // (d) The same credential as KEY=value lines, for an env file.
    let env = creds(&agent, &["get", "orders-db", "--format", "env"], APP_UID);
    assert!(env.status.success(), "{}", stderr(&env));
    let lines: BTreeMap<String, String> = String::from_utf8(env.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(lines["USERNAME"], value(&renewed, "username"));
    assert_eq!(lines["PASSWORD"], value(&renewed, "password"));
    assert_eq!(lines["MAYFLY_LEASE_ID"], new_lease);
    assert!(lines["MAYFLY_EXPIRES_AT"].ends_with('Z'), "{lines:?}");
    pg.login(&lines["USERNAME"], &lines["PASSWORD"])
        .await
        .unwrap();

    // A database user is no AWS credential: refused by name, nothing secret on stderr.
    let aws = creds(&agent, &["aws", "orders-db"], APP_UID);
    assert!(!aws.status.success());
    let why = stderr(&aws);
    assert!(why.contains("no AWS keys"), "{why}");
    assert!(!why.contains(&lines["PASSWORD"]), "{why}");
    assert!(aws.stdout.is_empty());

    let leases = live_leases(&daemon);
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0]["id"], new_lease.as_str());
    let log = agent.log();
    assert!(
        !log.contains(password) && !log.contains(&lines["PASSWORD"]),
        "no password in the agent's log"
    );
}

/// An AWS SDK configured only with a `credential_process` profile: boto3 runs
/// `mayfly-agent creds aws` (as the workload's uid, through setpriv: the test's Python
/// lives where only root can read it) and signs with what it prints; moto verifies the
/// signature and the session token. A workload without a grant gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_sdk_with_only_a_credential_process_profile_calls_aws_as_the_workload() {
    init();
    let moto = mayfly_tests::services::moto_with_auth(3).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/python/aws_sts.py");
    let boot = Command::new("python3")
        .arg(&script)
        .args(["bootstrap", &moto.url])
        .output()
        .unwrap();
    assert!(boot.status.success(), "{}", stderr(&boot));
    let boot: serde_json::Value = serde_json::from_slice(&boot.stdout).unwrap();
    let daemon = DaemonProcess::start(DaemonOptions {
        env: vec![
            (
                "AWS_ACCESS_KEY_ID".into(),
                boot["access_key_id"].as_str().unwrap().into(),
            ),
            (
                "AWS_SECRET_ACCESS_KEY".into(),
                boot["secret_access_key"].as_str().unwrap().into(),
            ),
        ],
        ..DaemonOptions::default()
    })
    .unwrap();
    let definition = daemon.dir.path().join("app-aws.toml");
    std::fs::write(
        &definition,
        format!(
            "name = \"app-aws\"\ngrants = [\"{APP}\"]\ndefault_ttl = \"1h\"\n[backend]\n\
             kind = \"aws_sts\"\nrole_arn = \"{}\"\nendpoint_url = \"{}\"\n",
            boot["role_arn"].as_str().unwrap(),
            moto.url
        ),
    )
    .unwrap();
    daemon
        .cli_ok(&[
            "credential",
            "create",
            "--file",
            definition.to_str().unwrap(),
        ])
        .unwrap();
    daemon
        .create_entry(APP, AGENT, &format!("unix:uid:{APP_UID}"), &[])
        .unwrap();
    daemon
        .create_entry(OTHER, AGENT, &format!("unix:uid:{OTHER_UID}"), &[])
        .unwrap();
    let agent = AgentProcess::start(&daemon, AGENT).unwrap();

    let home = tempfile::tempdir().unwrap();
    let sdk_call = |uid: u32| {
        let config = home.path().join(format!("config-{uid}"));
        std::fs::write(
            &config,
            format!(
                "[profile mayfly]\nregion = us-east-1\ncredential_process = setpriv --reuid={uid} \
                 --regid={uid} --clear-groups {} creds aws app-aws --socket {}\n",
                binary("mayfly-agent").unwrap().display(),
                agent.socket_path.display()
            ),
        )
        .unwrap();
        Command::new("python3")
            .arg(&script)
            .args(["call", &moto.url])
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env("AWS_CONFIG_FILE", &config)
            .env("AWS_SHARED_CREDENTIALS_FILE", home.path().join("none"))
            .env("AWS_PROFILE", "mayfly")
            .output()
            .unwrap()
    };
    let mut called = None;
    wait_for("the SDK call as the app", WAIT, || {
        let out = sdk_call(APP_UID);
        if out.status.success() {
            called = Some(out);
            return true;
        }
        eprintln!("as uid {APP_UID}: {}", stderr(&out));
        false
    });
    let called: serde_json::Value = serde_json::from_slice(&called.unwrap().stdout).unwrap();
    let arn = called["arn"].as_str().unwrap();
    assert!(arn.contains(":assumed-role/app/ls-"), "{arn}");
    let leases = live_leases(&daemon);
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0]["holder"], APP);

    let refused = sdk_call(OTHER_UID);
    assert!(
        !refused.status.success(),
        "a workload without a grant is refused"
    );
    assert!(
        stderr(&refused).contains("not granted"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(live_leases(&daemon).len(), 1, "nothing issued to it");
}
