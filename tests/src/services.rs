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
    moto_server(None)
}

/// `moto_server` that verifies every request's signature and session token once its first
/// `unauthenticated` requests are done (`INITIAL_NO_AUTH_ACTION_COUNT`): those bootstrap
/// an IAM user with keys, which nothing else can do while authentication is on.
pub fn moto_with_auth(unauthenticated: u32) -> anyhow::Result<Server> {
    moto_server(Some(unauthenticated))
}

fn moto_server(unauthenticated: Option<u32>) -> anyhow::Result<Server> {
    let port = free_port();
    let home = tempfile::tempdir()?;
    let mut command = Command::new("moto_server");
    if let Some(count) = unauthenticated {
        command.env("INITIAL_NO_AUTH_ACTION_COUNT", count.to_string());
    }
    let mut child = command
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

/// A PostgreSQL server of the test's own that checks passwords (SCRAM), on a free port.
/// The machine's server trusts every local login, which would make a rotated password
/// impossible to tell from a stale one; this one refuses a wrong password as production does.
pub struct PasswordPostgres {
    pub port: u16,
    pub admin_password: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PasswordPostgres {
    /// initdb and start, both as the `postgres` user (PostgreSQL refuses to run as root).
    pub fn start() -> anyhow::Result<Self> {
        let bin = postgres_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("mayfly-pg-").tempdir()?;
        let admin_password = format!("Admin-{:016x}", rand::random::<u64>());
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, &admin_password)?;
        let chown = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status()?;
        if !chown.success() {
            bail!("chown postgres {} failed", dir.path().display());
        }
        let data = dir.path().join("data");
        let initdb = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["--auth=scram-sha-256", "--username=postgres", "-E", "UTF8"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        if !initdb.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        }
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log"))?;
        let mut child = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        wait_http(&format!("127.0.0.1:{port}"), &mut child, "postgres")?;
        Ok(Self {
            port,
            admin_password,
            child,
            _dir: dir,
        })
    }

    pub fn admin_url(&self) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/postgres",
            self.admin_password, self.port
        )
    }

    /// A login role with `password`.
    pub async fn role(&self, prefix: &str, password: &str) -> anyhow::Result<String> {
        let name = format!("{prefix}_{:08x}", rand::random::<u32>());
        let mut conn = self.admin().await?;
        // The name is ours (a prefix and hex); the password is a test constant.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {name} LOGIN PASSWORD '{password}'"
        )))
        .execute(&mut conn)
        .await?;
        Ok(name)
    }

    /// Logs in as `user` with `password` and runs one query.
    pub async fn login(&self, user: &str, password: &str) -> anyhow::Result<()> {
        let options = sqlx::postgres::PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username(user)
            .password(password)
            .database("postgres");
        let mut conn = sqlx::PgConnection::connect_with(&options).await?;
        sqlx::query("SELECT 1").execute(&mut conn).await?;
        conn.close().await?;
        Ok(())
    }

    async fn admin(&self) -> anyhow::Result<sqlx::PgConnection> {
        Ok(sqlx::PgConnection::connect(&self.admin_url()).await?)
    }
}

impl Drop for PasswordPostgres {
    fn drop(&mut self) {
        // runuser passes SIGTERM on; postgres then shuts down fast.
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The newest installed PostgreSQL's bin directory (initdb, postgres).
fn postgres_bin_dir() -> anyhow::Result<std::path::PathBuf> {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: the PostgreSQL server is not installed")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort();
    let version = versions
        .last()
        .context("no PostgreSQL version under /usr/lib/postgresql")?;
    Ok(std::path::PathBuf::from(format!(
        "/usr/lib/postgresql/{version}/bin"
    )))
}
