//! Real services for end-to-end tests: moto (AWS), an OpenBao dev server, and throwaway
//! users on the local MariaDB and PostgreSQL. Each picks a free port or a unique name.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::Connection;

use crate::harness::free_port;

/// A background server process, killed on drop.
pub struct Server {
    pub url: String,
    child: Child,
    _home: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_http(url: &str, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let addr = url.trim_start_matches("http://").to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status}");
        }
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `moto_server` on a free port (installed into .venv by scripts/test).
pub fn moto() -> anyhow::Result<Server> {
    let port = free_port();
    let home = tempfile::tempdir()?;
    let mut child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting moto_server (is .venv/bin on PATH? scripts/test puts it there)")?;
    let url = format!("http://127.0.0.1:{port}");
    wait_http(&url, &mut child, "moto_server")?;
    Ok(Server {
        url,
        child,
        _home: home,
    })
}

/// `bao server -dev` on a free port with root token `root`.
pub fn openbao() -> anyhow::Result<Server> {
    let port = free_port();
    let home = tempfile::tempdir()?;
    let mut child = Command::new("bao")
        .args([
            "server",
            "-dev",
            "-dev-root-token-id=root",
            &format!("-dev-listen-address=127.0.0.1:{port}"),
        ])
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting bao (is .venv/bin on PATH? scripts/test puts it there)")?;
    let url = format!("http://127.0.0.1:{port}");
    wait_http(&url, &mut child, "bao server -dev")?;
    // The listener opens before the KV mount is ready; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    Ok(Server {
        url,
        child,
        _home: home,
    })
}

pub fn mysql_admin_url() -> String {
    std::env::var("MAYFLY_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A unique MariaDB user with `password`, allowed to log in from anywhere.
pub async fn mysql_user(prefix: &str, password: &str) -> anyhow::Result<String> {
    let name = format!("{prefix}_{:08x}", rand::random::<u32>());
    let mut conn = sqlx::MySqlConnection::connect(&mysql_admin_url())
        .await
        .context("connecting to MariaDB (is it running on 127.0.0.1:3306?)")?;
    // Names are ours (a fixed prefix and hex); the password is a test constant.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'"
    )))
    .execute(&mut conn)
    .await?;
    Ok(name)
}

/// Logs in to MariaDB as `user` with `password`.
pub async fn mysql_login(user: &str, password: &str) -> anyhow::Result<()> {
    let options = sqlx::mysql::MySqlConnectOptions::new()
        .host("127.0.0.1")
        .port(3306)
        .username(user)
        .password(password);
    let mut conn = sqlx::MySqlConnection::connect_with(&options).await?;
    sqlx::query("SELECT 1").execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

pub async fn drop_mysql_user(user: &str) {
    if let Ok(mut conn) = sqlx::MySqlConnection::connect(&mysql_admin_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP USER IF EXISTS '{user}'@'%'"
        )))
        .execute(&mut conn)
        .await;
    }
}

/// A unique PostgreSQL role that may log in.
pub async fn pg_role(prefix: &str) -> anyhow::Result<String> {
    let name = format!("{prefix}_{:08x}", rand::random::<u32>());
    let mut conn =
        sqlx::PgConnection::connect(&format!("{}/postgres", crate::pg::server_url())).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {name} LOGIN")))
        .execute(&mut conn)
        .await?;
    Ok(name)
}

/// The role's stored password verifier, which changes whenever its password does.
pub async fn pg_verifier(role: &str) -> anyhow::Result<Option<String>> {
    let mut conn =
        sqlx::PgConnection::connect(&format!("{}/postgres", crate::pg::server_url())).await?;
    let row: Option<(Option<String>,)> =
        sqlx::query_as("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
            .bind(role)
            .fetch_optional(&mut conn)
            .await?;
    Ok(row.and_then(|r| r.0))
}

pub async fn drop_pg_role(role: &str) {
    if let Ok(mut conn) =
        sqlx::PgConnection::connect(&format!("{}/postgres", crate::pg::server_url())).await
    {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
            .execute(&mut conn)
            .await;
    }
}
