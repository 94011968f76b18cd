//! TTL-bound credentials end to end: a real daemon issuing dynamic PostgreSQL users to a
//! workload its agent serves, on a PostgreSQL of the test's own that checks passwords; the
//! user works during its lease and is gone (role dropped, open session ended) after an
//! operator's revocation, after expiry, and after expiry that falls while the daemon is
//! down.

use std::time::Duration;

use sqlx::{ConnectOptions as _, Connection as _};
use tonic::Code;

use mayfly_proto::v1;
use mayfly_tests::harness::{DaemonOptions, DaemonProcess, init, wait_for};
use mayfly_tests::services::PasswordPostgres;

const AGENT: &str = "spiffe://example.org/node/creds";
const APP: &str = "spiffe://example.org/orders";
const OTHER: &str = "spiffe://example.org/intruder";

fn daemon() -> DaemonProcess {
    DaemonProcess::start(DaemonOptions {
        env: vec![("MAYFLY_LEASE_SWEEP_MS".into(), "200".into())],
        ..DaemonOptions::default()
    })
    .unwrap()
}

fn define(daemon: &DaemonProcess, pg: &PasswordPostgres, name: &str, ttls: &str) {
    let file = daemon.dir.path().join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            "name = \"{name}\"\ngrants = [\"{APP}\"]\n{ttls}\n[backend]\nkind = \"postgres_dynamic\"\n\
             admin_url = \"{}\"\n",
            pg.admin_url()
        ),
    )
    .unwrap();
    daemon
        .cli_ok(&["credential", "create", "--file", file.to_str().unwrap()])
        .unwrap();
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

async fn login(pg: &PasswordPostgres, issued: &v1::IssuedCredential) -> sqlx::PgConnection {
    sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(pg.port)
        .username(&issued.values["username"])
        .password(&issued.values["password"])
        .database("postgres")
        .connect()
        .await
        .unwrap()
}

fn lease_state(daemon: &DaemonProcess, id: &str) -> (String, String) {
    let leases = daemon.cli_json(&["lease", "show", id]).unwrap();
    (
        leases[0]["state"].as_str().unwrap().to_string(),
        leases[0]["reason"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_postgres_user_works_for_its_lease_and_is_gone_once_revoked() {
    init();
    let pg = PasswordPostgres::start().unwrap();
    let daemon = daemon();
    define(
        &daemon,
        &pg,
        "orders-db",
        "default_ttl = \"10m\"\nmax_ttl = \"1h\"",
    );
    let agent = daemon.attest(AGENT).await.unwrap();
    daemon
        .create_entry(APP, AGENT, "unix:uid:1000", &[])
        .unwrap();
    daemon
        .create_entry(OTHER, AGENT, "unix:uid:1001", &[])
        .unwrap();
    let mut node = daemon.node(&agent).await.unwrap();

    let issued = node
        .issue_credential(v1::IssueCredentialRequest {
            name: "orders-db".into(),
            spiffe_id: APP.into(),
            ttl_seconds: 48 * 3600,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.kind, "postgres_dynamic");
    assert_eq!(
        issued.expires_at - issued.issued_at,
        3600,
        "clamped to max_ttl"
    );
    assert!(issued.notice.contains("clamped"), "{}", issued.notice);
    let role = issued.values["username"].clone();
    assert!(!format!("{issued:?}").contains(&issued.values["password"]));

    // The user works, and holds an open session.
    let mut session = login(&pg, &issued).await;
    let me: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut session)
        .await
        .unwrap();
    assert_eq!(me, role);
    let listed = daemon
        .cli_json(&["lease", "list", "--holder", APP])
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["backend_id"], role.as_str());

    // No grant, or a workload the agent does not serve: refused, nothing issued.
    for (name, spiffe_id, why) in [
        ("orders-db", OTHER, "not granted"),
        (
            "orders-db",
            "spiffe://example.org/elsewhere",
            "serves no workload",
        ),
        ("no-such-credential", APP, "no credential named"),
    ] {
        let refused = node
            .issue_credential(v1::IssueCredentialRequest {
                name: name.into(),
                spiffe_id: spiffe_id.into(),
                ttl_seconds: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains(why), "{}", refused.message());
    }
    assert_eq!(
        daemon
            .cli_json(&["lease", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1,
        "the refusals issued nothing"
    );
    wait_for(
        "the refusals on the audit trail",
        Duration::from_secs(10),
        || {
            let trail = daemon
                .cli_json(&["audit", "list", "--action", "credential.issue"])
                .unwrap()
                .to_string();
            trail.contains("not granted") && trail.contains(&issued.lease_id)
        },
    );

    // Clamped to its max TTL already, it cannot be renewed; another agent may not even try.
    let at_max = node
        .renew_credential(v1::RenewCredentialRequest {
            lease_id: issued.lease_id.clone(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(at_max.code(), Code::FailedPrecondition, "{at_max:?}");
    assert!(
        at_max.message().contains("max TTL") && at_max.message().contains("ask for a new one"),
        "{}",
        at_max.message()
    );
    let stranger = daemon
        .attest("spiffe://example.org/node/stranger")
        .await
        .unwrap();
    let theirs = daemon
        .node(&stranger)
        .await
        .unwrap()
        .renew_credential(v1::RenewCredentialRequest {
            lease_id: issued.lease_id.clone(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(theirs.code(), Code::PermissionDenied, "{theirs:?}");
    assert!(
        theirs.message().contains("not held by agent"),
        "{}",
        theirs.message()
    );

    // Revoked: the role is gone and its open session ended.
    // The test's agent holds no sync stream, so it cannot acknowledge: exit 3, with the
    // lease already gone at the backend.
    let revoked = daemon
        .cli(&[
            "revoke",
            "lease",
            "--id",
            &issued.lease_id,
            "--reason",
            "test: leaked",
            "--wait",
            "200ms",
        ])
        .unwrap();
    assert_eq!(
        revoked.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert!(!role_exists(&pg, &role).await, "the role is dropped");
    assert!(
        sqlx::query("SELECT 1").execute(&mut session).await.is_err(),
        "the open session was terminated"
    );
    assert!(
        pg.login(&role, &issued.values["password"]).await.is_err(),
        "no new login"
    );
    assert_eq!(lease_state(&daemon, &issued.lease_id).0, "revoked");
    assert!(
        daemon
            .cli_json(&["lease", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty(),
        "no live leases"
    );
    let trail = daemon
        .cli_json(&["audit", "list", "--action", "lease.revoke"])
        .unwrap()
        .to_string();
    assert!(trail.contains(&issued.lease_id), "{trail}");
    let logs = daemon.log();
    assert!(
        !logs.contains(&issued.values["password"]) && !logs.contains(&pg.admin_password),
        "no credential in the daemon's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_at_the_backend_even_when_the_daemon_was_killed_meanwhile() {
    init();
    let pg = PasswordPostgres::start().unwrap();
    let mut daemon = daemon();
    define(
        &daemon,
        &pg,
        "short",
        "default_ttl = \"3s\"\nmax_ttl = \"1h\"",
    );
    let agent = daemon.attest(AGENT).await.unwrap();
    daemon
        .create_entry(APP, AGENT, "unix:uid:1000", &[])
        .unwrap();
    let mut node = daemon.node(&agent).await.unwrap();
    let mut issue = async || {
        node.issue_credential(v1::IssueCredentialRequest {
            name: "short".into(),
            spiffe_id: APP.into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
    };
    let first = issue().await;
    let second = issue().await;
    let mut session = login(&pg, &first).await;
    assert!(role_exists(&pg, &first.values["username"]).await);

    // Expiry with the daemon running: gone within moments of it.
    wait_for("the first lease to expire", Duration::from_secs(15), || {
        lease_state(&daemon, &first.lease_id).0 == "revoked"
    });
    assert!(!role_exists(&pg, &first.values["username"]).await);
    assert!(sqlx::query("SELECT 1").execute(&mut session).await.is_err());
    assert_eq!(lease_state(&daemon, &first.lease_id).1, "expired");

    // Killed with a live lease; it expires while the daemon is down; the restarted daemon
    // revokes it.
    let third = issue().await;
    daemon.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        role_exists(&pg, &third.values["username"]).await,
        "nobody revoked it while the daemon was down"
    );
    daemon.spawn().unwrap();
    wait_for(
        "the restarted daemon to revoke",
        Duration::from_secs(15),
        || lease_state(&daemon, &third.lease_id).0 == "revoked",
    );
    assert!(!role_exists(&pg, &third.values["username"]).await);
    assert!(!role_exists(&pg, &second.values["username"]).await);
}

/// `bao` against the test's OpenBao, as root; the command must succeed.
fn bao(url: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("bao")
        .args(args)
        .env("BAO_ADDR", url)
        .env("BAO_TOKEN", "root")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bao {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openbao_database_lease_lasts_the_ttl_granted_and_is_revoked_at_openbao() {
    init();
    let pg = PasswordPostgres::start().unwrap();
    let vault = mayfly_tests::services::openbao().unwrap();
    // OpenBao's database engine on the test's PostgreSQL; revocation ends sessions too.
    bao(&vault.url, &["secrets", "enable", "database"]);
    bao(
        &vault.url,
        &[
            "write",
            "database/config/pg",
            "plugin_name=postgresql-database-plugin",
            &format!(
                "connection_url=postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable",
                pg.port
            ),
            "allowed_roles=*",
            "username=postgres",
            &format!("password={}", pg.admin_password),
        ],
    );
    bao(
        &vault.url,
        &[
            "write",
            "database/roles/app",
            "db_name=pg",
            "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            "revocation_statements=ALTER ROLE \"{{name}}\" NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}'; DROP ROLE IF EXISTS \"{{name}}\";",
            "default_ttl=1h",
            "max_ttl=24h",
        ],
    );
    let daemon = daemon();
    let file = daemon.dir.path().join("vault.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"orders-vault\"\ngrants = [\"{APP}\"]\ndefault_ttl = \"10m\"\n[backend]\n\
             kind = \"vault_dynamic\"\naddress = \"{}\"\nrole = \"app\"\ntoken = \"root\"\n",
            vault.url
        ),
    )
    .unwrap();
    daemon
        .cli_ok(&["credential", "create", "--file", file.to_str().unwrap()])
        .unwrap();
    let agent = daemon.attest(AGENT).await.unwrap();
    daemon
        .create_entry(APP, AGENT, "unix:uid:1000", &[])
        .unwrap();
    let mut node = daemon.node(&agent).await.unwrap();
    let issued = node
        .issue_credential(v1::IssueCredentialRequest {
            name: "orders-vault".into(),
            spiffe_id: APP.into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.kind, "vault_dynamic");
    assert_eq!(issued.expires_at - issued.issued_at, 600);
    let role = issued.values["username"].clone();
    let mut session = login(&pg, &issued).await;
    sqlx::query("SELECT 1").execute(&mut session).await.unwrap();

    // OpenBao's own lease ends when Mayfly's does (renewed from the role's 1 h to 10 min).
    let lease = daemon
        .cli_json(&["lease", "show", &issued.lease_id])
        .unwrap();
    let vault_lease = lease[0]["backend_id"].as_str().unwrap().to_string();
    assert!(
        vault_lease.starts_with("database/creds/app/"),
        "{vault_lease}"
    );
    let lookup: serde_json::Value = serde_json::from_str(&bao(
        &vault.url,
        &[
            "write",
            "-format=json",
            "sys/leases/lookup",
            &format!("lease_id={vault_lease}"),
        ],
    ))
    .unwrap();
    let ttl = lookup["data"]["ttl"].as_i64().unwrap();
    assert!((590..=600).contains(&ttl), "OpenBao's lease ttl {ttl}");

    // Renewed while held: the same user, OpenBao's lease extended with Mayfly's.
    let renewed = node
        .renew_credential(v1::RenewCredentialRequest {
            lease_id: issued.lease_id.clone(),
            ttl_seconds: 1200,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.expires_at - renewed.renewed_at, 1200);
    let lookup: serde_json::Value = serde_json::from_str(&bao(
        &vault.url,
        &[
            "write",
            "-format=json",
            "sys/leases/lookup",
            &format!("lease_id={vault_lease}"),
        ],
    ))
    .unwrap();
    let ttl = lookup["data"]["ttl"].as_i64().unwrap();
    assert!((1190..=1200).contains(&ttl), "OpenBao's renewed ttl {ttl}");
    sqlx::query("SELECT 1").execute(&mut session).await.unwrap();
    // Asking for less than it has left is refused, not a shorter lease.
    let shorter = node
        .renew_credential(v1::RenewCredentialRequest {
            lease_id: issued.lease_id.clone(),
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(shorter.code(), Code::FailedPrecondition, "{shorter:?}");
    assert!(
        shorter.message().contains("already lasts longer"),
        "{}",
        shorter.message()
    );

    let revoked = daemon
        .cli(&[
            "revoke",
            "lease",
            "--id",
            &issued.lease_id,
            "--reason",
            "test",
            "--wait",
            "200ms",
        ])
        .unwrap();
    assert_eq!(revoked.status.code(), Some(3));
    assert!(!role_exists(&pg, &role).await, "OpenBao dropped the role");
    assert!(sqlx::query("SELECT 1").execute(&mut session).await.is_err());
    let lookup = std::process::Command::new("bao")
        .args([
            "write",
            "sys/leases/lookup",
            &format!("lease_id={vault_lease}"),
        ])
        .env("BAO_ADDR", &vault.url)
        .env("BAO_TOKEN", "root")
        .output()
        .unwrap();
    assert!(!lookup.status.success(), "the lease is gone at OpenBao");
    assert!(!daemon.log().contains(&issued.values["password"]));
}

/// `tests/interop/python/aws_sts.py` with boto3 from the test venv; its stdout as JSON.
fn aws_sts_py(args: &[&str], env: &[(&str, &str)]) -> Result<serde_json::Value, String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/python/aws_sts.py");
    let mut command = std::process::Command::new("python3");
    command.arg(script).args(args);
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    let out = command.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_role_sessions_carry_the_workloads_identity_and_work_with_a_real_aws_sdk() {
    init();
    // Three unauthenticated calls bootstrap the IAM user; every call after is verified.
    let moto = mayfly_tests::services::moto_with_auth(3).unwrap();
    let boot = aws_sts_py(&["bootstrap", &moto.url], &[]).unwrap();
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
    let file = daemon.dir.path().join("sts.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"app-aws\"\ngrants = [\"{APP}\"]\ndefault_ttl = \"20m\"\nmax_ttl = \"2h\"\n\
             [backend]\nkind = \"aws_sts\"\nrole_arn = \"{}\"\nendpoint_url = \"{}\"\n",
            boot["role_arn"].as_str().unwrap(),
            moto.url
        ),
    )
    .unwrap();
    daemon
        .cli_ok(&["credential", "create", "--file", file.to_str().unwrap()])
        .unwrap();
    // STS's floor is refused at definition time, naming it.
    std::fs::write(
        &file,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("app-aws", "too-short")
            .replace("20m", "5m"),
    )
    .unwrap();
    let refused = daemon
        .cli(&["credential", "create", "--file", file.to_str().unwrap()])
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("at least 15m"));

    let agent = daemon.attest(AGENT).await.unwrap();
    daemon
        .create_entry(APP, AGENT, "unix:uid:1000", &[])
        .unwrap();
    let mut node = daemon.node(&agent).await.unwrap();
    let issued = node
        .issue_credential(v1::IssueCredentialRequest {
            name: "app-aws".into(),
            spiffe_id: APP.into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.kind, "aws_sts");
    assert_eq!(issued.expires_at - issued.issued_at, 1200);
    assert!(issued.notice.contains("botocore"), "{}", issued.notice);

    // A real SDK signs with them; moto checks the signature and the session token.
    let env = [
        ("AWS_ACCESS_KEY_ID", issued.values["access_key_id"].as_str()),
        (
            "AWS_SECRET_ACCESS_KEY",
            issued.values["secret_access_key"].as_str(),
        ),
        ("AWS_SESSION_TOKEN", issued.values["session_token"].as_str()),
    ];
    let identity = aws_sts_py(&["call", &moto.url], &env).unwrap();
    let arn = identity["arn"].as_str().unwrap();
    assert!(
        arn.contains(":assumed-role/app/") && arn.ends_with(&issued.lease_id),
        "{arn}"
    );
    let forged = [env[0], env[1], ("AWS_SESSION_TOKEN", "not-the-token")];
    assert!(
        aws_sts_py(&["call", &moto.url], &forged).is_err(),
        "a wrong token is refused"
    );

    let lease = daemon
        .cli_json(&["lease", "show", &issued.lease_id])
        .unwrap();
    assert!(
        lease[0]["backend_id"]
            .as_str()
            .unwrap()
            .ends_with(&issued.lease_id),
        "the STS session id: {lease}"
    );
    let log = daemon.log();
    assert!(!log.contains(&issued.values["secret_access_key"]));
    assert!(!log.contains(&issued.values["session_token"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redefining_a_credential_without_a_holders_grant_revokes_what_it_holds() {
    init();
    let pg = PasswordPostgres::start().unwrap();
    let daemon = daemon();
    define(&daemon, &pg, "orders-db", "default_ttl = \"10m\"");
    let agent = daemon.attest(AGENT).await.unwrap();
    daemon
        .create_entry(APP, AGENT, "unix:uid:1000", &[])
        .unwrap();
    let mut node = daemon.node(&agent).await.unwrap();
    let issued = node
        .issue_credential(v1::IssueCredentialRequest {
            name: "orders-db".into(),
            spiffe_id: APP.into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let role = issued.values["username"].clone();
    assert!(role_exists(&pg, &role).await);

    // Same grants again: nothing is taken back.
    define(&daemon, &pg, "orders-db", "default_ttl = \"10m\"");
    assert_eq!(lease_state(&daemon, &issued.lease_id).0, "active");

    // The new definition grants someone else: APP's lease is revoked at the backend.
    let file = daemon.dir.path().join("narrower.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"orders-db\"\ngrants = [\"{OTHER}\"]\ndefault_ttl = \"10m\"\n[backend]\n\
             kind = \"postgres_dynamic\"\nadmin_url = \"{}\"\n",
            pg.admin_url()
        ),
    )
    .unwrap();
    daemon
        .cli_ok(&["credential", "create", "--file", file.to_str().unwrap()])
        .unwrap();
    let (state, reason) = lease_state(&daemon, &issued.lease_id);
    assert_eq!(state, "revoked");
    assert!(reason.contains("no longer grants"), "{reason}");
    assert!(!role_exists(&pg, &role).await, "the role is dropped");
    let trail = daemon
        .cli_json(&["audit", "list", "--action", "revoke.credential"])
        .unwrap()
        .to_string();
    assert!(trail.contains("orders-db"), "{trail}");
    // And APP is refused from now on.
    let refused = node
        .issue_credential(v1::IssueCredentialRequest {
            name: "orders-db".into(),
            spiffe_id: APP.into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
}

/// Asserts the lease is revoked and its role gone at PostgreSQL.
async fn all_gone(daemon: &DaemonProcess, pg: &PasswordPostgres, issued: &v1::IssuedCredential) {
    let (state, reason) = lease_state(daemon, &issued.lease_id);
    assert_eq!(state, "revoked", "{}: {reason}", issued.lease_id);
    assert!(
        !role_exists(pg, &issued.values["username"]).await,
        "{}'s role is dropped",
        issued.lease_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_entry_deleting_it_or_banning_the_agent_revokes_what_it_holds() {
    init();
    let pg = PasswordPostgres::start().unwrap();
    let daemon = daemon();
    let file = daemon.dir.path().join("orders-db.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"orders-db\"\ngrants = [\"{APP}\", \"{OTHER}\"]\n[backend]\n\
             kind = \"postgres_dynamic\"\nadmin_url = \"{}\"\n",
            pg.admin_url()
        ),
    )
    .unwrap();
    daemon
        .cli_ok(&["credential", "create", "--file", file.to_str().unwrap()])
        .unwrap();
    let agent = daemon.attest(AGENT).await.unwrap();
    daemon
        .create_entry(APP, AGENT, "unix:uid:1000", &[])
        .unwrap();
    let other_entry = daemon
        .create_entry(OTHER, AGENT, "unix:uid:1001", &[])
        .unwrap();
    let mut node = daemon.node(&agent).await.unwrap();
    let mut issue = async |spiffe_id: &str| {
        node.issue_credential(v1::IssueCredentialRequest {
            name: "orders-db".into(),
            spiffe_id: spiffe_id.into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
    };

    // The operator revokes APP's entry: its lease goes with its SVIDs. The test's agent
    // holds no sync stream, so nobody acknowledges (exit 3); the backend part is done.
    let app = issue(APP).await;
    let other = issue(OTHER).await;
    let revoked = daemon
        .cli(&[
            "revoke",
            "entry",
            "--spiffe-id",
            APP,
            "--reason",
            "test: compromised",
            "--wait",
            "200ms",
        ])
        .unwrap();
    assert_eq!(
        revoked.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    all_gone(&daemon, &pg, &app).await;
    assert_eq!(
        lease_state(&daemon, &other.lease_id).0,
        "active",
        "OTHER's stays"
    );

    // The last entry that let the agent serve OTHER is deleted: its lease goes too.
    daemon.cli_ok(&["entry", "delete", &other_entry]).unwrap();
    all_gone(&daemon, &pg, &other).await;

    // Banning the agent revokes everything it holds.
    daemon
        .create_entry(APP, AGENT, "unix:uid:1000", &[])
        .unwrap();
    let again = issue(APP).await;
    let banned = daemon
        .cli(&[
            "revoke",
            "agent",
            "--id",
            AGENT,
            "--reason",
            "test: node lost",
            "--wait",
            "200ms",
        ])
        .unwrap();
    assert_eq!(
        banned.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&banned.stderr)
    );
    all_gone(&daemon, &pg, &again).await;
    assert!(
        daemon
            .cli_json(&["lease", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty(),
        "no live leases"
    );
}
