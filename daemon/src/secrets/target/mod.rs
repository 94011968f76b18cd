//! The systems a rotated secret unlocks, one file each: PostgreSQL roles (`postgres.rs`) and
//! MariaDB accounts (`mysql.rs`) whose password is changed over an admin connection and
//! proven by logging in, and `none` targets (`command.rs`) whose change and check are
//! operator-supplied commands fed the value on stdin. What they share lives here.

use std::time::Duration;

use crate::secrets::{Credential, TargetError};

mod command;
mod mysql;
mod postgres;

pub use command::{CommandTarget, CommandTargetConfig};
pub use mysql::{MysqlTarget, MysqlTargetConfig};
pub use postgres::{PostgresTarget, PostgresTargetConfig};
#[cfg(test)]
use {
    mysql::mysql_literal,
    postgres::{pg_identifier, pg_literal},
};

/// How long a database may take to accept a connection before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit on a hook command's run time.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a failed hook's stderr goes into the error.
const STDERR_HEAD: usize = 200;
/// After a hook exits, how long to keep reading stderr that a child it left behind may hold open.
const STDERR_GRACE: Duration = Duration::from_millis(250);

/// Why a target could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetConfigError {
    #[error("{which} is not a valid database URL: {reason}")]
    BadUrl { which: &'static str, reason: String },
    #[error("login_url must not carry a user or password (each rotation supplies its own): {0}")]
    CredentialsInLoginUrl(String),
    #[error("{0} is an empty argv: give at least the program to run")]
    EmptyCommand(&'static str),
    #[error("the hook timeout must be more than zero")]
    ZeroTimeout,
}

/// Which step failed, which decides how a database error is reported.
#[derive(Clone, Copy)]
enum Step {
    /// Connecting or running the change as the admin: a database error is a refusal.
    Admin,
    /// Logging in as the rotated user: a database error means the credential does not work.
    Login,
}

/// Connects within CONNECT_TIMEOUT; errors classified for `step`.
async fn connect<C>(
    connecting: impl Future<Output = Result<C, sqlx::Error>>,
    step: Step,
    secret: &str,
) -> Result<C, TargetError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(classify(e, step, secret)),
        Err(_) => Err(TargetError::Unreachable(format!(
            "no connection within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// A database that answered with an error was reached: the error is a refusal (admin) or a
/// failed login (rotated user). Anything else (I/O, TLS, protocol) means it was not reached.
fn classify(error: sqlx::Error, step: Step, secret: &str) -> TargetError {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            // Servers may echo part of the statement (MariaDB's "near '…'"), which holds the
            // password.
            let detail = redact(&format!("{code}: {}", db.message()), secret);
            match step {
                Step::Admin => TargetError::Refused(detail),
                Step::Login => TargetError::LoginFailed(detail),
            }
        }
        sqlx::Error::Configuration(e) => TargetError::Refused(redact(&e.to_string(), secret)),
        other => TargetError::Unreachable(redact(&other.to_string(), secret)),
    }
}

/// `text` with every occurrence of `secret` replaced.
fn redact(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        text.to_owned()
    } else {
        text.replace(secret, "<redacted>")
    }
}

/// Neither PostgreSQL nor MariaDB can store a NUL in a name or password; refuse before
/// anything is sent rather than let the server truncate or reject it half-way.
fn reject_nul(credential: &Credential) -> Result<(), TargetError> {
    if credential.username.contains('\0') || credential.password.expose().contains('\0') {
        return Err(TargetError::Refused(
            "the user name or password contains a NUL character".into(),
        ));
    }
    Ok(())
}

/// sqlx's option parsers ignore the scheme, so a MariaDB URL given to a PostgreSQL target
/// would otherwise be tried as PostgreSQL.
fn require_scheme(
    which: &'static str,
    url: &str,
    schemes: &[&str],
) -> Result<(), TargetConfigError> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if scheme.is_some_and(|scheme| schemes.iter().any(|s| scheme.eq_ignore_ascii_case(s))) {
        return Ok(());
    }
    Err(TargetConfigError::BadUrl {
        which,
        reason: format!("it must start with {}://", schemes.join(":// or ")),
    })
}

fn reject_login_credentials(login_url: &str) -> Result<(), TargetConfigError> {
    let authority = login_url
        .split_once("://")
        .map_or(login_url, |(_, rest)| rest)
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    if authority.contains('@') {
        // Show only what follows the '@': what precedes it may be a password.
        let host = authority.rsplit('@').next().unwrap_or_default();
        return Err(TargetConfigError::CredentialsInLoginUrl(format!(
            "…@{host}"
        )));
    }
    Ok(())
}

/// A connection's address for Debug output, never its password.
fn describe(
    scheme: &str,
    user: Option<&str>,
    host: &str,
    port: u16,
    database: Option<&str>,
) -> String {
    let user = user.map(|u| format!("{u}:<redacted>@")).unwrap_or_default();
    format!("{scheme}://{user}{host}:{port}/{}", database.unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use std::panic::AssertUnwindSafe;

    use sqlx::{AssertSqlSafe, Connection, Executor};

    use super::*;
    use crate::secrets::{SecretValue, Target};

    use base64::Engine;
    use futures::FutureExt;
    use rand::Rng;
    use sqlx::mysql::MySqlConnection;
    use sqlx::postgres::PgConnection;

    const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
    const PG_LOGIN: &str = "postgres://127.0.0.1:5432/postgres";
    const MARIADB_ADMIN: &str = "mysql://root@127.0.0.1:3306";
    const MARIADB_LOGIN: &str = "mysql://127.0.0.1:3306";
    /// Every character our quoting has to get right, plus ones the generator never makes.
    const TRICKY: &str = "it's \"a\" \\test\\ $x %s @:/?#&=+ `y`";

    fn provider() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }

    fn unique_name() -> String {
        format!("mayfly_t_{:016x}", rand::rng().random::<u64>())
    }

    fn credential(username: &str, password: &str) -> Credential {
        Credential {
            username: username.to_owned(),
            password: SecretValue::new(password),
        }
    }

    /// Runs `body`, then `cleanup` whatever happened, then re-raises a panic from `body`.
    async fn with_cleanup<C: Future<Output = ()>>(body: impl Future<Output = ()>, cleanup: C) {
        let outcome = AssertUnwindSafe(body).catch_unwind().await;
        cleanup.await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    // --- PostgreSQL -----------------------------------------------------------------------

    fn pg_target() -> PostgresTarget {
        PostgresTarget::new(PostgresTargetConfig {
            admin_url: SecretValue::new(PG_ADMIN),
            login_url: PG_LOGIN.into(),
        })
        .unwrap()
    }

    async fn pg_admin() -> PgConnection {
        PgConnection::connect(PG_ADMIN).await.unwrap()
    }

    async fn pg_role_state(role: &str) -> (bool, Option<String>) {
        let mut conn = pg_admin().await;
        let row: (bool, Option<String>) =
            sqlx::query_as("SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = $1")
                .bind(role)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        conn.close().await.unwrap();
        row
    }

    /// Whether `password` matches a `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey` verifier
    /// (RFC 5802/7677). The local server trusts every login, so this is how the tests see
    /// that exactly the intended password was stored.
    fn scram_matches(verifier: &str, password: &str) -> bool {
        use aws_lc_rs::{digest, hmac, pbkdf2};
        let b64 = base64::engine::general_purpose::STANDARD;
        let rest = verifier.strip_prefix("SCRAM-SHA-256$").unwrap();
        let (params, keys) = rest.split_once('$').unwrap();
        let (iterations, salt) = params.split_once(':').unwrap();
        let (stored_key, server_key) = keys.split_once(':').unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations.parse().unwrap(),
            &b64.decode(salt).unwrap(),
            password.as_bytes(),
            &mut salted,
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        let stored = digest::digest(&digest::SHA256, client_key.as_ref());
        let server = hmac::sign(&key, b"Server Key");
        stored.as_ref() == b64.decode(stored_key).unwrap().as_slice()
            && server.as_ref() == b64.decode(server_key).unwrap().as_slice()
    }

    #[tokio::test]
    async fn postgres_set_changes_the_stored_password_and_test_logs_in() {
        provider();
        let role = unique_name();
        let mut conn = pg_admin().await;
        conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE ROLE {role} NOLOGIN"
        ))))
        .await
        .unwrap();
        conn.close().await.unwrap();

        let body = async {
            let target = pg_target();
            let first = credential(&role, "first-Password-1234");
            target.set(&first).await.unwrap();
            let (can_login, verifier_1) = pg_role_state(&role).await;
            assert!(can_login, "set must grant LOGIN");
            let verifier_1 = verifier_1.expect("set stores a password");
            assert!(scram_matches(&verifier_1, "first-Password-1234"));
            target.test(&first).await.unwrap();

            let second = credential(&role, "second-Password-5678");
            target.set(&second).await.unwrap();
            let verifier_2 = pg_role_state(&role).await.1.unwrap();
            assert_ne!(verifier_1, verifier_2);
            assert!(scram_matches(&verifier_2, "second-Password-5678"));
            assert!(!scram_matches(&verifier_2, "first-Password-1234"));
            target.test(&second).await.unwrap();

            // Quotes and backslashes reach the server as written.
            target.set(&credential(&role, TRICKY)).await.unwrap();
            assert!(scram_matches(
                &pg_role_state(&role).await.1.unwrap(),
                TRICKY
            ));

            // Idempotent: setting the same value again succeeds.
            target.set(&credential(&role, TRICKY)).await.unwrap();
        };
        let cleanup = async {
            let mut conn = pg_admin().await;
            conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP ROLE IF EXISTS {role}"
            ))))
            .await
            .unwrap();
        };
        with_cleanup(body, cleanup).await;
    }

    #[tokio::test]
    async fn postgres_quotes_odd_role_names() {
        provider();
        let role = format!("{}\"odd 'name'", unique_name());
        let quoted = pg_identifier(&role);
        let mut conn = pg_admin().await;
        conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE ROLE {quoted}"
        ))))
        .await
        .unwrap();
        conn.close().await.unwrap();
        let body = async {
            pg_target()
                .set(&credential(&role, "odd-Name-Password-1"))
                .await
                .unwrap();
            let (can_login, verifier) = pg_role_state(&role).await;
            assert!(can_login);
            assert!(scram_matches(&verifier.unwrap(), "odd-Name-Password-1"));
        };
        let cleanup = async {
            let mut conn = pg_admin().await;
            conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP ROLE IF EXISTS {quoted}"
            ))))
            .await
            .unwrap();
        };
        with_cleanup(body, cleanup).await;
    }

    #[tokio::test]
    async fn postgres_errors_are_classified_without_the_password() {
        provider();
        let target = pg_target();
        let missing = credential(&unique_name(), "no-such-Role-secret-1");
        match target.set(&missing).await {
            Err(TargetError::Refused(msg)) => {
                assert!(msg.contains("does not exist"), "{msg}");
                assert!(!msg.contains("no-such-Role-secret-1"), "{msg}");
            }
            other => panic!("expected Refused, got {other:?}"),
        }
        // Logging in as a role that does not exist fails even under trust auth.
        assert!(matches!(
            target.test(&missing).await,
            Err(TargetError::LoginFailed(_))
        ));
        let nowhere = PostgresTarget::new(PostgresTargetConfig {
            admin_url: SecretValue::new("postgres://postgres@127.0.0.1:1/postgres"),
            login_url: "postgres://127.0.0.1:1/postgres".into(),
        })
        .unwrap();
        assert!(matches!(
            nowhere.set(&missing).await,
            Err(TargetError::Unreachable(_))
        ));
        assert!(matches!(
            nowhere.test(&missing).await,
            Err(TargetError::Unreachable(_))
        ));
    }

    #[test]
    fn database_targets_never_show_passwords_in_debug() {
        provider();
        let pg = PostgresTarget::new(PostgresTargetConfig {
            admin_url: SecretValue::new("postgres://admin:hunter2-admin@db.example:5432/app"),
            login_url: "postgres://db.example:5432/app".into(),
        })
        .unwrap();
        let shown = format!("{pg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("admin:<redacted>@db.example:5432/app"),
            "{shown}"
        );

        let my = MysqlTarget::new(MysqlTargetConfig {
            admin_url: SecretValue::new("mysql://root:hunter2-admin@db.example:3306/app"),
            login_url: "mysql://db.example:3306/app".into(),
            user_host: None,
        })
        .unwrap();
        let shown = format!("{my:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("user_host: \"%\""), "{shown}");

        let shown = format!("{:?}", credential("app", "hunter2-user"));
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn login_url_with_credentials_is_rejected() {
        provider();
        let err = PostgresTarget::new(PostgresTargetConfig {
            admin_url: SecretValue::new(PG_ADMIN),
            login_url: "postgres://app:hunter2@127.0.0.1:5432/app".into(),
        })
        .unwrap_err();
        assert!(matches!(err, TargetConfigError::CredentialsInLoginUrl(_)));
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(matches!(
            PostgresTarget::new(PostgresTargetConfig {
                admin_url: SecretValue::new("mysql://x@y"),
                login_url: PG_LOGIN.into(),
            }),
            Err(TargetConfigError::BadUrl {
                which: "admin_url",
                ..
            })
        ));
    }

    // --- MariaDB --------------------------------------------------------------------------

    fn mariadb_target() -> MysqlTarget {
        MysqlTarget::new(MysqlTargetConfig {
            admin_url: SecretValue::new(MARIADB_ADMIN),
            login_url: MARIADB_LOGIN.into(),
            user_host: None,
        })
        .unwrap()
    }

    async fn mariadb_admin(statement: String) {
        let mut conn = MySqlConnection::connect(MARIADB_ADMIN).await.unwrap();
        conn.execute(sqlx::raw_sql(AssertSqlSafe(statement)))
            .await
            .unwrap();
        conn.close().await.unwrap();
    }

    #[tokio::test]
    async fn mariadb_set_replaces_the_password() {
        provider();
        let user = unique_name();
        mariadb_admin(format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY 'old-Password-1234'"
        ))
        .await;
        let body = async {
            let target = mariadb_target();
            let old = credential(&user, "old-Password-1234");
            target.test(&old).await.unwrap();

            let new = credential(&user, "new-Password-5678");
            target.set(&new).await.unwrap();
            target.test(&new).await.unwrap();
            match target.test(&old).await {
                Err(TargetError::LoginFailed(msg)) => {
                    assert!(msg.contains("Access denied"), "{msg}");
                    assert!(!msg.contains("old-Password-1234"), "{msg}");
                }
                other => panic!("expected LoginFailed with the old password, got {other:?}"),
            }

            // Quotes and backslashes reach the server as written.
            let tricky = credential(&user, TRICKY);
            target.set(&tricky).await.unwrap();
            target.test(&tricky).await.unwrap();
            assert!(matches!(
                target.test(&new).await,
                Err(TargetError::LoginFailed(_))
            ));
        };
        with_cleanup(
            body,
            mariadb_admin(format!("DROP USER IF EXISTS '{user}'@'%'")),
        )
        .await;
    }

    #[tokio::test]
    async fn mariadb_honours_the_configured_host_and_refuses_unknown_users() {
        provider();
        let user = unique_name();
        mariadb_admin(format!(
            "CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'old-Password-1234'"
        ))
        .await;
        let body = async {
            // The account is 'user'@'127.0.0.1', so the default '%' names nobody.
            let new = credential(&user, "new-Password-5678");
            assert!(matches!(
                mariadb_target().set(&new).await,
                Err(TargetError::Refused(_))
            ));
            let target = MysqlTarget::new(MysqlTargetConfig {
                admin_url: SecretValue::new(MARIADB_ADMIN),
                login_url: MARIADB_LOGIN.into(),
                user_host: Some("127.0.0.1".into()),
            })
            .unwrap();
            target.set(&new).await.unwrap();
            target.test(&new).await.unwrap();
        };
        with_cleanup(
            body,
            mariadb_admin(format!("DROP USER IF EXISTS '{user}'@'127.0.0.1'")),
        )
        .await;
        let nowhere = MysqlTarget::new(MysqlTargetConfig {
            admin_url: SecretValue::new("mysql://root@127.0.0.1:1"),
            login_url: "mysql://127.0.0.1:1".into(),
            user_host: None,
        })
        .unwrap();
        assert!(matches!(
            nowhere.set(&credential("x", "y")).await,
            Err(TargetError::Unreachable(_))
        ));
    }

    #[test]
    fn literals_are_quoted() {
        provider();
        assert_eq!(pg_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(pg_literal("it's \\"), "E'it''s \\\\'");
        assert_eq!(mysql_literal("it's \\", true), "'it''s \\\\'");
        assert_eq!(mysql_literal("it's \\", false), "'it''s \\'");
    }

    // --- Commands -------------------------------------------------------------------------

    fn sh(script: &str, args: &[&str]) -> Vec<String> {
        let mut argv = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            script.to_owned(),
            "sh".to_owned(),
        ];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv
    }

    fn command_target(set: Option<Vec<String>>, test: Option<Vec<String>>) -> CommandTarget {
        CommandTarget::new(CommandTargetConfig {
            set_command: set,
            test_command: test,
            ..CommandTargetConfig::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn hook_gets_the_value_on_stdin_only() {
        provider();
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        let (stdin, args, env) = (path("stdin"), path("args"), path("env"));
        let argv = sh(
            r#"cat > "$1"; printf '%s\n' "$0" "$@" > "$2"; env > "$3""#,
            &[&stdin, &args, &env],
        );
        let target = command_target(Some(argv), None);
        let value = "hook-Value-0123456789";
        target.set(&credential("app", value)).await.unwrap();
        assert_eq!(std::fs::read_to_string(&stdin).unwrap(), value);
        let args = std::fs::read_to_string(&args).unwrap();
        assert!(args.contains("stdin") && !args.contains(value), "{args}");
        let env = std::fs::read_to_string(&env).unwrap();
        assert!(env.contains("PATH=") && !env.contains(value));
    }

    #[tokio::test]
    async fn failing_hook_reports_status_and_stderr_head() {
        provider();
        let target = command_target(Some(sh("echo boom >&2; exit 3", &[])), None);
        match target.set(&credential("app", "v")).await {
            Err(TargetError::Hook(msg)) => {
                assert!(msg.contains("exit status: 3"), "{msg}");
                assert!(msg.contains("boom"), "{msg}");
            }
            other => panic!("expected Hook error, got {other:?}"),
        }
        let chatty = command_target(
            Some(sh("head -c 100000 /dev/zero | tr '\\0' x >&2; exit 1", &[])),
            None,
        );
        match chatty.set(&credential("app", "v")).await {
            Err(TargetError::Hook(msg)) => {
                let stderr = msg.rsplit(": ").next().unwrap();
                assert_eq!(stderr, "x".repeat(STDERR_HEAD), "{msg}");
            }
            other => panic!("expected Hook error, got {other:?}"),
        }
        let missing = command_target(Some(vec!["/nonexistent/mayfly-hook".into()]), None);
        assert!(matches!(
            missing.set(&credential("app", "v")).await,
            Err(TargetError::Hook(msg)) if msg.contains("cannot start")
        ));
    }

    #[tokio::test]
    async fn hook_that_overruns_is_killed_with_its_children() {
        provider();
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let target = CommandTarget::new(CommandTargetConfig {
            set_command: Some(sh(
                r#"sleep 30 & echo $! > "$1"; wait"#,
                &[pid_file.to_str().unwrap()],
            )),
            test_command: None,
            timeout: Duration::from_millis(500),
        })
        .unwrap();
        let started = std::time::Instant::now();
        match target.set(&credential("app", "v")).await {
            Err(TargetError::Hook(msg)) => {
                assert!(msg.contains("did not finish within 500ms"), "{msg}")
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The backgrounded sleep was in the hook's process group, so it is gone too (give
        // the kernel a moment to deliver the signal; kill -0 fails once it is reaped or a
        // zombie of init).
        let mut alive = true;
        for _ in 0..50 {
            let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Field 3 of /proc/PID/stat is the state; Z (zombie) means already dead.
            alive = status.split_whitespace().nth(2).is_some_and(|s| s != "Z");
            if !alive {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!alive, "the hook's child {pid} outlived the timeout");
    }

    #[tokio::test]
    async fn test_command_checks_the_value_or_succeeds_when_absent() {
        provider();
        let checker = sh(r#"test "$(cat)" = expected-Value-1"#, &[]);
        let target = command_target(None, Some(checker));
        target
            .test(&credential("app", "expected-Value-1"))
            .await
            .unwrap();
        assert!(matches!(
            target.test(&credential("app", "other")).await,
            Err(TargetError::Hook(_))
        ));
        // No set command: set leaves the value to the store.
        target.set(&credential("app", "other")).await.unwrap();
        let bare = command_target(None, None);
        bare.test(&credential("app", "anything")).await.unwrap();
    }

    #[test]
    fn command_config_is_checked() {
        provider();
        assert!(matches!(
            CommandTarget::new(CommandTargetConfig {
                set_command: Some(vec![]),
                ..CommandTargetConfig::default()
            }),
            Err(TargetConfigError::EmptyCommand("set_command"))
        ));
        assert!(matches!(
            CommandTarget::new(CommandTargetConfig {
                timeout: Duration::ZERO,
                ..CommandTargetConfig::default()
            }),
            Err(TargetConfigError::ZeroTimeout)
        ));
        assert_eq!(
            CommandTargetConfig::default().timeout,
            Duration::from_secs(30)
        );
    }
}
