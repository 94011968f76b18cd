//! TTL-bound credentials through the agent, end to end: a real daemon, a real agent and a
//! PostgreSQL of the test's own that checks passwords. Workloads run `mayfly-agent creds`
//! under their own uids, the way an app's start script would: the user it prints logs in,
//! a second call is served from the agent's cache, a workload without a grant is refused
//! with nothing issued, and a revoked lease is replaced by a new one. Sinks write the same
//! credentials to files for apps that read nothing else.

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

/// The lease id and login a credential sink's JSON file holds, once it holds one other
/// than `not`.
fn sink_credential(path: &std::path::Path, not: &str) -> Option<(String, String, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let lease = json["lease_id"].as_str()?.to_owned();
    (lease != not).then(|| {
        (
            lease,
            value(&json, "username").to_owned(),
            value(&json, "password").to_owned(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_write_a_database_user_refresh_it_before_expiry_and_drop_a_revoked_one() {
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
            "name = \"orders-db\"\ngrants = [\"{APP}\"]\ndefault_ttl = \"15s\"\nmax_ttl = \"25s\"\n\
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
    let files = tempfile::tempdir().unwrap();
    let json_path = files.path().join("orders-db.json");
    let url_path = files.path().join("orders-db.url");
    let env_path = files.path().join("orders-db.env");
    // A 15 s lease: renewed after 10 s, well before it expires, to its 25 s max TTL; then
    // replaced by a new one after 20 s.
    let sinks = format!(
        "[[sink]]\nkind = \"credential\"\ncredential = \"orders-db\"\nspiffe_id = \"{APP}\"\n\
         ttl = \"15s\"\npath = \"{json}\"\n\
         [[sink]]\nkind = \"template\"\ncredentials = [\"orders-db\"]\nspiffe_id = \"{APP}\"\n\
         ttl = \"15s\"\non_revoke = \"blank\"\npath = \"{url}\"\n\
         template = \"{{{{ credentials['orders-db'].username }}}}:{{{{ credentials['orders-db'].password }}}} until {{{{ credentials['orders-db'].expires_at }}}}\"\n\
         [[sink]]\nkind = \"env\"\nspiffe_id = \"{APP}\"\nttl = \"15s\"\npath = \"{env}\"\n\
         vars = {{ PGUSER = \"credential:orders-db:username\", PGPASSWORD = \"credential:orders-db:password\" }}\n",
        json = json_path.display(),
        url = url_path.display(),
        env = env_path.display(),
    );
    let agent = AgentProcess::start_with(&daemon, AGENT, &sinks).unwrap();

    // (a) All three files hold the one lease the agent obtained, and its user logs in.
    let mut first = None;
    wait_for("the credential sink's file", WAIT, || {
        first = sink_credential(&json_path, "");
        first.is_some()
    });
    let (lease, user, password) = first.unwrap();
    pg.login(&user, &password).await.unwrap();
    wait_for("the template and env sinks", WAIT, || {
        let url = std::fs::read_to_string(&url_path).unwrap_or_default();
        let env = std::fs::read_to_string(&env_path).unwrap_or_default();
        url.starts_with(&format!("{user}:{password} until "))
            && env.contains(&format!("PGUSER=\"{user}\""))
            && env.contains(&format!("PGPASSWORD=\"{password}\""))
    });
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&json_path).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "a credential is for its app alone");
    let leases = live_leases(&daemon);
    assert_eq!(leases.len(), 1, "three sinks, one lease: {leases:?}");
    let ttl = leases[0]["expires_at"].as_i64().unwrap() - leases[0]["issued_at"].as_i64().unwrap();
    assert_eq!(ttl, 15, "the sinks' ttl: {leases:?}");

    // (b) Revoked: the acknowledgement comes after the sinks let go of it, the old role
    // is gone, and the sinks hold a new user that works.
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
    let after = std::fs::read_to_string(&json_path).unwrap_or_default();
    assert!(
        !after.contains(&password),
        "acknowledged with the revoked password still in the sink: {report}"
    );
    assert!(
        !role_exists(&pg, &user).await,
        "the revoked role is dropped"
    );
    let mut second = None;
    wait_for("a new credential in the sink", WAIT, || {
        second = sink_credential(&json_path, &lease);
        second.is_some()
    });
    let (lease2, user2, password2) = second.unwrap();
    pg.login(&user2, &password2).await.unwrap();

    // (c) Renewed before it expires: the same lease and user, a later expiry in the files,
    // and the user still logs in after its first 15 s.
    let expiry = |path: &std::path::Path| -> Option<(String, i64)> {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        Some((
            json["lease_id"].as_str()?.to_owned(),
            json["expires_at"].as_i64()?,
        ))
    };
    let (_, first_expiry) = expiry(&json_path).unwrap();
    let issued_at = std::time::Instant::now();
    wait_for("the renewed lease", Duration::from_secs(15), || {
        expiry(&json_path).is_some_and(|(l, e)| l == lease2 && e != first_expiry)
    });
    let leases = live_leases(&daemon);
    let ttl = leases[0]["expires_at"].as_i64().unwrap() - leases[0]["issued_at"].as_i64().unwrap();
    assert!(
        ttl > 15 && ttl <= 25,
        "renewed up to the max TTL: {leases:?}"
    );
    if let Some(rest) = Duration::from_secs(16).checked_sub(issued_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    pg.login(&user2, &password2)
        .await
        .expect("the renewed user logs in past its first expiry");
    let trail = daemon
        .cli_json(&["audit", "list", "--action", "credential.renew"])
        .unwrap()
        .to_string();
    assert!(trail.contains(&lease2), "{trail}");

    // (d) At its max TTL it cannot be renewed: a third lease arrives before the second
    // ends, and every file follows.
    let mut third = None;
    wait_for(
        "a new lease at the max TTL",
        Duration::from_secs(15),
        || {
            third = sink_credential(&json_path, &lease2);
            third.is_some()
        },
    );
    let (_, user3, password3) = third.unwrap();
    pg.login(&user3, &password3).await.unwrap();
    wait_for("the env sink's refresh", WAIT, || {
        std::fs::read_to_string(&env_path)
            .unwrap_or_default()
            .contains(&format!("PGPASSWORD=\"{password3}\""))
    });
    let log = agent.log();
    for secret in [&password, &password2, &password3] {
        assert!(
            !log.contains(secret.as_str()),
            "a password reached the agent's log"
        );
    }
}

#[test]
fn a_sink_naming_a_credential_without_an_identity_stops_the_agent_with_the_key_to_fix() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sinks = format!(
        "[[sink]]\nkind = \"credential\"\ncredential = \"orders-db\"\npath = \"{}\"\n",
        dir.path().join("db.json").display()
    );
    let err = AgentProcess::start_with(&daemon, AGENT, &sinks)
        .err()
        .expect("the agent refuses the sink")
        .to_string();
    assert!(err.contains("spiffe_id"), "{err}");
    assert!(!dir.path().join("db.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_gives_the_app_its_database_user_and_restarts_it_only_for_a_new_lease() {
    use std::os::unix::process::CommandExt as _;
    init();
    let pg = PasswordPostgres::start().unwrap();
    let daemon = DaemonProcess::start(DaemonOptions {
        env: vec![("MAYFLY_LEASE_SWEEP_MS".into(), "200".into())],
        ..DaemonOptions::default()
    })
    .unwrap();
    let definition = daemon.dir.path().join("orders-db.toml");
    // 15 s leases renewed once to their 25 s max TTL, then replaced.
    std::fs::write(
        &definition,
        format!(
            "name = \"orders-db\"\ngrants = [\"{APP}\"]\ndefault_ttl = \"15s\"\nmax_ttl = \"25s\"\n\
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
    let agent = AgentProcess::start(&daemon, AGENT).unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        out.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let starts = out.path().join("starts");
    // The app, as its own uid: one line per start with the user it was given.
    let script = format!(
        "echo \"$PGUSER $PGPASSWORD\" >> {}; trap 'exit 0' TERM; while :; do sleep 0.1; done",
        starts.display()
    );
    let mut exec = Command::new(binary("mayfly-agent").unwrap())
        .args(["exec", "--socket"])
        .arg(&agent.socket_path)
        .args([
            "--env",
            "PGUSER=credential:orders-db:username",
            "--env",
            "PGPASSWORD=credential:orders-db:password",
            "--stop-timeout",
            "2s",
            "--",
            "/bin/sh",
            "-c",
            &script,
        ])
        .uid(APP_UID)
        .gid(APP_UID)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = || -> Vec<(String, String)> {
        std::fs::read_to_string(&starts)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (u, p) = l.split_once(' ')?;
                Some((u.to_owned(), p.to_owned()))
            })
            .collect()
    };

    // (a) Started with a user that logs in.
    wait_for("the app's first start", WAIT, || !lines().is_empty());
    let (user1, password1) = lines()[0].clone();
    pg.login(&user1, &password1).await.unwrap();
    let lease1 = live_leases(&daemon)[0]["id"].as_str().unwrap().to_owned();

    // (b) Revoked: the app is restarted with a new user.
    daemon
        .cli_ok(&["revoke", "lease", "--id", &lease1, "--reason", "test"])
        .unwrap();
    wait_for("the restart with a new user", WAIT, || lines().len() == 2);
    let (user2, password2) = lines()[1].clone();
    assert_ne!(user2, user1);
    pg.login(&user2, &password2).await.unwrap();

    // (c) The lease renewed: the same user, no restart.
    wait_for("the renewal", Duration::from_secs(15), || {
        live_leases(&daemon)
            .iter()
            .any(|l| l["expires_at"].as_i64().unwrap() - l["issued_at"].as_i64().unwrap() > 15)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        lines().len(),
        2,
        "a renewal restarts nothing: {:?}",
        lines()
    );

    // (d) At the max TTL a new lease, and one restart for it.
    wait_for(
        "the restart for a new lease",
        Duration::from_secs(20),
        || lines().len() == 3,
    );
    let (user3, password3) = lines()[2].clone();
    assert_ne!(user3, user2);
    pg.login(&user3, &password3).await.unwrap();

    let _ = exec.kill();
    let output = exec.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    for secret in [&password1, &password2, &password3] {
        assert!(
            !log.contains(secret.as_str()),
            "a password reached exec's log"
        );
        assert!(!agent.log().contains(secret.as_str()));
    }
}
