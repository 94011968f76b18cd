//! Scheduled rotation end to end: a real daemon rotating secrets in real stores (its own,
//! OpenBao's KV v2, moto's Secrets Manager) against real targets (MariaDB, PostgreSQL, a
//! hook command), by hand, on a schedule with seconds, across SIGKILLs at every step.

use std::time::{Duration, Instant};

use serde_json::Value;

use mayfly_tests::harness::{DaemonOptions, DaemonProcess, init, wait_for};
use mayfly_tests::services::{
    self, drop_mysql_user, drop_pg_role, mysql_login, mysql_user, pg_role, pg_verifier,
};

fn define(daemon: &DaemonProcess, toml: &str) -> Value {
    daemon.define_secret(toml).unwrap()
}

fn current(daemon: &DaemonProcess, name: &str) -> (String, String, String) {
    daemon.current_secret(name).unwrap()
}

fn status(daemon: &DaemonProcess, name: &str) -> Value {
    daemon.cli_json(&["secret", "status", name]).unwrap()
}

fn promoted_jobs(daemon: &DaemonProcess, name: &str) -> usize {
    status(daemon, name)["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["state"] == "promoted")
        .count()
}

/// A single-user secret in Mayfly's own store against MariaDB user `user`.
fn local_mysql_secret(name: &str, user: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nschedule = \"@yearly\"\nusers = [\"{user}\"]\n{extra}\n[store]\nkind = \"local\"\n\
         [target]\nkind = \"mysql\"\nadmin_url = \"{}\"\nlogin_url = \"mysql://127.0.0.1:3306\"\n",
        services::mysql_admin_url()
    )
}

/// Where the secrets under test live.
enum StoreUnderTest {
    Local,
    Vault { url: String },
    Aws { url: String },
}

impl StoreUnderTest {
    /// The `[store]` table for secret `name`, each secret at its own path or id.
    async fn toml(&self, name: &str, username: &str) -> String {
        match self {
            StoreUnderTest::Local => "[store]\nkind = \"local\"\n".into(),
            StoreUnderTest::Vault { url } => format!(
                "[store]\nkind = \"vault\"\naddress = \"{url}\"\nmount = \"secret\"\npath = \"mayfly/{name}-{:08x}\"\ntoken = \"root\"\n",
                rand::random::<u32>()
            ),
            StoreUnderTest::Aws { url } => {
                // Like AWS's own rotation, Mayfly rotates a secret that exists; create it
                // with the credential the target holds now.
                let id = format!("{name}-{:08x}", rand::random::<u32>());
                let store = mayfly_daemon::secrets::aws::AwsSecretsManagerStore::new(
                    mayfly_daemon::secrets::aws::AwsStoreConfig {
                        secret_id: id.clone(),
                        region: "us-east-1".into(),
                        endpoint_url: Some(url.clone()),
                    },
                )
                .await
                .unwrap();
                store
                    .ensure_exists(&mayfly_daemon::secrets::Credential {
                        username: username.into(),
                        password: mayfly_daemon::secrets::SecretValue::new("initial-Password-1"),
                    })
                    .await
                    .unwrap();
                format!(
                    "[store]\nkind = \"aws\"\nsecret_id = \"{id}\"\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\n"
                )
            }
        }
    }
}

/// One store × the three targets: rotate by hand, then on a schedule with seconds.
async fn store_against_every_target(store: &StoreUnderTest, daemon: &DaemonProcess, tag: &str) {
    // MariaDB: the login proves the new password works and the old one no longer does.
    let user = mysql_user("mayfly_rot", "initial-Password-1")
        .await
        .unwrap();
    let name = format!("{tag}-mysql");
    let store_toml = store.toml(&name, &user).await;
    define(
        daemon,
        &format!(
            "name = \"{name}\"\nschedule = \"*/3 * * * * *\"\nusers = [\"{user}\"]\n{store_toml}\n[target]\nkind = \"mysql\"\nadmin_url = \"{}\"\nlogin_url = \"mysql://127.0.0.1:3306\"\n",
            services::mysql_admin_url()
        ),
    );
    daemon.cli_ok(&["secret", "rotate", &name]).unwrap();
    let (v1, u1, p1) = current(daemon, &name);
    assert_eq!(u1, user);
    mysql_login(&user, &p1).await.unwrap();
    assert!(mysql_login(&user, "initial-Password-1").await.is_err());
    wait_for(
        "a scheduled MariaDB rotation",
        Duration::from_secs(20),
        || promoted_jobs(daemon, &name) >= 2,
    );
    let (v2, _, p2) = current(daemon, &name);
    assert_ne!(v1, v2);
    mysql_login(&user, &p2).await.unwrap();
    drop_mysql_user(&user).await;

    // PostgreSQL: trust auth here lets any password in, so the proof is the role's
    // stored verifier changing with each rotation.
    let role = pg_role("mayfly_rot").await.unwrap();
    let name = format!("{tag}-pg");
    let store_toml = store.toml(&name, &role).await;
    define(
        daemon,
        &format!(
            "name = \"{name}\"\nschedule = \"*/3 * * * * *\"\nusers = [\"{role}\"]\n{store_toml}\n[target]\nkind = \"postgres\"\nadmin_url = \"{}/postgres\"\n",
            mayfly_tests::pg::server_url()
        ),
    );
    assert_eq!(pg_verifier(&role).await.unwrap(), None);
    daemon.cli_ok(&["secret", "rotate", &name]).unwrap();
    let first = pg_verifier(&role)
        .await
        .unwrap()
        .expect("a password was set");
    wait_for(
        "a scheduled PostgreSQL rotation",
        Duration::from_secs(20),
        || promoted_jobs(daemon, &name) >= 2,
    );
    let second = pg_verifier(&role).await.unwrap().unwrap();
    assert_ne!(first, second);
    drop_pg_role(&role).await;

    // No target: an opaque value handed to a hook on stdin.
    let sink = daemon.dir.path().join(format!("{tag}-hook.out"));
    let name = format!("{tag}-none");
    let store_toml = store.toml(&name, "").await;
    define(
        daemon,
        &format!(
            "name = \"{name}\"\nschedule = \"*/3 * * * * *\"\n{store_toml}\n[target]\nkind = \"none\"\nhook = [\"sh\", \"-c\", \"cat > {}\"]\n",
            sink.display()
        ),
    );
    daemon.cli_ok(&["secret", "rotate", &name]).unwrap();
    let (_, _, value) = current(daemon, &name);
    assert_eq!(std::fs::read_to_string(&sink).unwrap().trim(), value);
    wait_for(
        "a scheduled opaque rotation",
        Duration::from_secs(20),
        || promoted_jobs(daemon, &name) >= 2,
    );
}

#[tokio::test]
async fn local_store_rotates_every_target() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    store_against_every_target(&StoreUnderTest::Local, &daemon, "local").await;
}

#[tokio::test]
async fn openbao_kv_store_rotates_every_target() {
    init();
    let bao = services::openbao().unwrap();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let store = StoreUnderTest::Vault {
        url: bao.url.clone(),
    };
    store_against_every_target(&store, &daemon, "vault").await;
}

#[tokio::test]
async fn secrets_manager_store_rotates_every_target() {
    init();
    let moto = services::moto().unwrap();
    let daemon = DaemonProcess::start(DaemonOptions {
        env: vec![
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ],
        ..DaemonOptions::default()
    })
    .unwrap();
    // The test process creates the secrets, so it needs the same credentials.
    // SAFETY: set before any thread of this test reads the environment.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    }
    let store = StoreUnderTest::Aws {
        url: moto.url.clone(),
    };
    store_against_every_target(&store, &daemon, "aws").await;
}

#[tokio::test]
async fn a_rotation_survives_sigkill_after_every_step() {
    init();
    // Alternating users, so the current value must log in at every moment, crash or not.
    let a = mysql_user("mayfly_crash_a", "initial-Password-1")
        .await
        .unwrap();
    let b = mysql_user("mayfly_crash_b", "initial-Password-2")
        .await
        .unwrap();
    let mut daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    define(
        &daemon,
        &format!(
            "name = \"crashy\"\nschedule = \"@yearly\"\nstrategy = \"alternating-users\"\nusers = [\"{a}\", \"{b}\"]\n\
             [store]\nkind = \"local\"\n[target]\nkind = \"mysql\"\nadmin_url = \"{}\"\nlogin_url = \"mysql://127.0.0.1:3306\"\n",
            services::mysql_admin_url()
        ),
    );
    daemon.cli_ok(&["secret", "rotate", "crashy"]).unwrap();
    let mut previous = current(&daemon, "crashy");
    for step in ["pending_stored", "target_set", "tested", "promoted"] {
        daemon.kill();
        daemon.env = vec![("MAYFLY_TEST_CRASH_AFTER".into(), step.into())];
        daemon.spawn().unwrap();
        // The CLI loses its daemon mid-call; that is the point.
        let _ = daemon.cli(&["secret", "rotate", "crashy"]);
        daemon.wait_exit(Duration::from_secs(20)).unwrap();
        // While the daemon is down, the current value still logs in.
        mysql_login(&previous.1, &previous.2).await.unwrap();
        daemon.env.clear();
        daemon.spawn().unwrap();
        let before = previous.0.clone();
        wait_for(
            &format!("the rotation to finish after a crash at {step}"),
            Duration::from_secs(20),
            || current(&daemon, "crashy").0 != before,
        );
        let now = current(&daemon, "crashy");
        mysql_login(&now.1, &now.2).await.unwrap();
        assert_ne!(now.1, previous.1, "the users took turns");
        let versions = status(&daemon, "crashy")["versions"]
            .as_array()
            .unwrap()
            .clone();
        let staged = |stage: &str| {
            versions
                .iter()
                .find(|v| v["stages"].as_array().unwrap().iter().any(|s| s == stage))
                .map(|v| v["id"].as_str().unwrap().to_string())
        };
        assert_eq!(staged("current").as_deref(), Some(now.0.as_str()));
        assert_eq!(
            staged("previous").as_deref(),
            Some(previous.0.as_str()),
            "no version lost"
        );
        assert_eq!(staged("pending"), None, "nothing left pending");
        previous = now;
    }
    drop_mysql_user(&a).await;
    drop_mysql_user(&b).await;
}

#[tokio::test]
async fn alternating_users_never_fail_a_login() {
    init();
    let a = mysql_user("mayfly_alt_a", "initial-Password-1")
        .await
        .unwrap();
    let b = mysql_user("mayfly_alt_b", "initial-Password-2")
        .await
        .unwrap();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    define(
        &daemon,
        &format!(
            "name = \"alt\"\nschedule = \"* * * * * *\"\nstrategy = \"alternating-users\"\nusers = [\"{a}\", \"{b}\"]\n[store]\nkind = \"local\"\n[target]\nkind = \"mysql\"\nadmin_url = \"{}\"\nlogin_url = \"mysql://127.0.0.1:3306\"\n",
            services::mysql_admin_url()
        ),
    );
    daemon.cli_ok(&["secret", "rotate", "alt"]).unwrap();
    let mut admin = mayfly_daemon::cli::operator::connect(&mayfly_daemon::cli::Connection {
        socket: Some(daemon.admin_socket.clone()),
        config: None,
        output: mayfly_daemon::cli::OutputFormat::Json,
    })
    .await
    .unwrap();
    let mut logins = 0u64;
    let mut failures = Vec::new();
    let mut users_seen = std::collections::HashSet::new();
    let mut versions_seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    // 20 rotations after the first value: 21 distinct versions seen by the client.
    while versions_seen.len() < 21 {
        assert!(
            Instant::now() < deadline,
            "20 rotations did not happen in 45 s"
        );
        for _ in 0..25 {
            tick.tick().await;
            let current = admin
                .get_secret_value(mayfly_proto::v1::SecretRequest { name: "alt".into() })
                .await
                .unwrap()
                .into_inner();
            users_seen.insert(current.username.clone());
            versions_seen.insert(current.version.clone());
            logins += 1;
            if let Err(e) = mysql_login(&current.username, &current.value).await {
                failures.push(format!("{}: {e}", current.version));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {logins} logins failed: {failures:?}",
        failures.len()
    );
    assert_eq!(users_seen.len(), 2, "both users took turns");
    drop_mysql_user(&a).await;
    drop_mysql_user(&b).await;
}

#[tokio::test]
async fn bad_definitions_and_failing_targets_leave_the_current_value_working() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let bad = |toml: &str, needle: &str| {
        let path = daemon.dir.path().join("bad.toml");
        std::fs::write(&path, toml).unwrap();
        let out = daemon
            .cli(&["secret", "create", "--file", path.to_str().unwrap()])
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    };
    bad(
        "name = \"x\"\nschedule = \"61 * * * *\"\n[store]\nkind = \"local\"\n[target]\nkind = \"none\"\n",
        "schedule",
    );
    bad(
        "name = \"x\"\nschedule = \"@daily\"\n[store]\nkind = \"s3\"\n[target]\nkind = \"none\"\n",
        "s3",
    );
    assert!(
        daemon
            .cli_json(&["secret", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty()
    );

    // A working secret, then its target goes away: the rotation fails, the value stays.
    let user = mysql_user("mayfly_bad", "initial-Password-1")
        .await
        .unwrap();
    define(
        &daemon,
        &local_mysql_secret("db", &user, "max_attempts = 2"),
    );
    daemon.cli_ok(&["secret", "rotate", "db"]).unwrap();
    let working = current(&daemon, "db");
    drop_mysql_user(&user).await;
    let out = daemon.cli(&["secret", "rotate", "db"]).unwrap();
    assert!(!out.status.success(), "a refused change fails the rotation");
    assert!(String::from_utf8_lossy(&out.stderr).contains("untouched"));
    assert_eq!(
        current(&daemon, "db"),
        working,
        "the current version is untouched"
    );
    let jobs = status(&daemon, "db")["jobs"].as_array().unwrap().clone();
    assert!(jobs.iter().any(|j| j["state"] == "failed"), "{jobs:?}");

    // An unreachable target.
    let port = mayfly_tests::harness::free_port();
    define(
        &daemon,
        &format!(
            "name = \"gone\"\nschedule = \"@yearly\"\nmax_attempts = 2\nusers = [\"nobody\"]\n[store]\nkind = \"local\"\n[target]\nkind = \"mysql\"\nadmin_url = \"mysql://root@127.0.0.1:{port}\"\n"
        ),
    );
    let out = daemon.cli(&["secret", "rotate", "gone"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("unreachable"), "{err}");
    assert!(
        daemon
            .cli(&["secret", "get", "gone"])
            .map(|o| !o.status.success())
            .unwrap()
    );
    // Secret values never reach the daemon's log.
    assert!(!daemon.log().contains(&working.2));
}

#[tokio::test]
async fn promoted_versions_reach_the_agents_they_are_granted_to() {
    use mayfly_proto::v1::{self, sync_message::Update};
    use tokio_stream::StreamExt;

    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let agent = daemon.attest("spiffe://example.org/node/a").await.unwrap();
    let other = daemon.attest("spiffe://example.org/node/b").await.unwrap();
    daemon
        .cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/app",
            "--parent-id",
            "spiffe://example.org/node/a",
            "--selector",
            "unix:uid:1000",
        ])
        .unwrap();
    define(
        &daemon,
        "name = \"api-key\"\nschedule = \"@yearly\"\ngrants = [\"spiffe://example.org/app\"]\n[store]\nkind = \"local\"\n[target]\nkind = \"none\"\n",
    );
    daemon.cli_ok(&["secret", "rotate", "api-key"]).unwrap();
    let (first_version, _, first_value) = current(&daemon, "api-key");

    let mut node = daemon.node(&agent).await.unwrap();
    let mut stream = node.sync(v1::SyncRequest {}).await.unwrap().into_inner();
    let next = async |stream: &mut tonic::Streaming<v1::SyncMessage>| {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a sync message")
            .unwrap()
            .unwrap()
            .update
            .unwrap()
    };
    match next(&mut stream).await {
        Update::FullState(state) => {
            assert_eq!(state.secrets.len(), 1);
            assert_eq!(state.secrets[0].version, first_version);
            assert_eq!(state.secrets[0].value, first_value.as_bytes());
            assert_eq!(
                state.secrets[0].granted_to,
                vec!["spiffe://example.org/app"]
            );
        }
        other => panic!("expected full state, got {other:?}"),
    }
    // An agent without the granted workload gets nothing.
    let mut other_node = daemon.node(&other).await.unwrap();
    let mut other_stream = other_node
        .sync(v1::SyncRequest {})
        .await
        .unwrap()
        .into_inner();
    match next(&mut other_stream).await {
        Update::FullState(state) => assert!(state.secrets.is_empty()),
        other => panic!("expected full state, got {other:?}"),
    }

    daemon.cli_ok(&["secret", "rotate", "api-key"]).unwrap();
    let (second_version, _, second_value) = current(&daemon, "api-key");
    match next(&mut stream).await {
        Update::SecretUpdated(secret) => {
            assert_eq!(secret.version, second_version);
            assert_eq!(secret.value, second_value.as_bytes());
            assert!(
                !format!("{secret:?}").contains(&second_value),
                "Debug hides the value"
            );
        }
        other => panic!("expected the new version, got {other:?}"),
    }
}
