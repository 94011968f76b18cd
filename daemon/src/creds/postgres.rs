//! `postgres_dynamic`: one PostgreSQL role per lease, created from the definition's
//! statements with a `VALID UNTIL` at the lease's expiry (so the password stops at the
//! database even if nothing revokes it), and at revocation made unable to log in, its
//! sessions terminated, what it owns reassigned to the admin, and dropped: gone means gone.

use std::str::FromStr;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, Postgres};
use sqlx::{AssertSqlSafe, ConnectOptions as _, Connection, Executor};

use super::{BackendError, Issued};
use crate::secrets::SecretValue;

/// How long connecting to the database may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Admin connections kept open: issuing and revoking are a few statements each, and a
/// connection per call cost more than the statements (measured in `scripts/bench`).
const POOL_SIZE: u32 = 4;

/// An admin connection unused this long is closed, so that a database's pool holds nothing
/// while nobody asks for its users.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One pool per admin login, shared by every definition that names it: a thousand
/// definitions on one PostgreSQL hold at most `POOL_SIZE` connections between them, not a
/// pool each (which exhausted the server's `max_connections`, measured in `scripts/bench`).
/// Keyed by the SHA-256 of the URL, so the map keeps no copy of its password.
static POOLS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<Vec<u8>, PgPool>>> =
    std::sync::LazyLock::new(Default::default);

fn shared_pool(admin_url: &SecretValue, options: PgConnectOptions) -> PgPool {
    let key = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, admin_url.expose().as_bytes())
        .as_ref()
        .to_vec();
    let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    pools
        .entry(key)
        .or_insert_with(|| {
            // sqlx logs statements at debug level, and the creation statements carry
            // passwords.
            PgPoolOptions::new()
                .max_connections(POOL_SIZE)
                .min_connections(0)
                .idle_timeout(IDLE_TIMEOUT)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_lazy_with(options.disable_statement_logging())
        })
        .clone()
}

pub struct PostgresDynamic {
    admin: PgPool,
    creation: Vec<String>,
    prefix: String,
}

impl PostgresDynamic {
    pub fn new(
        admin_url: &SecretValue,
        creation: Vec<String>,
        prefix: String,
    ) -> Result<Self, BackendError> {
        let admin = PgConnectOptions::from_str(admin_url.expose()).map_err(|e| {
            // The parse error could quote the URL, password included.
            BackendError::Config(redact(&e.to_string(), admin_url.expose()))
        })?;
        let admin = shared_pool(admin_url, admin);
        Ok(Self {
            admin,
            creation,
            prefix,
        })
    }

    /// The role name a lease gets: the prefix and the lease id's hex (letters and digits
    /// only, so it needs no quoting beyond the statement's own).
    pub fn role_name(&self, lease_id: &str) -> String {
        let suffix: String = lease_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        format!("{}{suffix}", self.prefix)
    }

    async fn admin(&self) -> Result<PoolConnection<Postgres>, BackendError> {
        self.admin.acquire().await.map_err(|e| match e {
            sqlx::Error::PoolTimedOut => BackendError::Unavailable(format!(
                "no connection to PostgreSQL within {}s",
                CONNECT_TIMEOUT.as_secs()
            )),
            other => classify(other, ""),
        })
    }

    /// Creates `role` with a fresh password, valid until `expires_at` (unix seconds).
    pub async fn issue(&self, role: &str, expires_at: i64) -> Result<Issued, BackendError> {
        let password = random_password();
        let expiration = valid_until(expires_at)?;
        let mut conn = self.admin().await?;
        let result = async {
            let mut tx = conn.begin().await.map_err(|e| classify(e, &password))?;
            for template in &self.creation {
                // The name and password come from safe alphabets (letters, digits, '_'),
                // so substituting them cannot change the statement's meaning.
                let statement = SecretValue::new(
                    template
                        .replace("{{name}}", role)
                        .replace("{{password}}", &password)
                        .replace("{{expiration}}", &expiration),
                );
                tx.execute(sqlx::raw_sql(AssertSqlSafe(statement.expose().to_owned())))
                    .await
                    .map_err(|e| classify(e, &password))?;
            }
            tx.commit().await.map_err(|e| classify(e, &password))
        }
        .await;
        result?;
        Ok(Issued {
            backend_id: role.to_string(),
            values: vec![
                ("username".into(), SecretValue::new(role.to_string())),
                ("password".into(), SecretValue::new(password)),
            ],
        })
    }

    /// Moves `role`'s `VALID UNTIL` to `expires_at`: the same password, usable longer.
    pub async fn extend(&self, role: &str, expires_at: i64) -> Result<(), BackendError> {
        let expiration = valid_until(expires_at)?;
        let mut conn = self.admin().await?;
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_roles WHERE rolname = $1")
            .bind(role)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| classify(e, ""))?;
        if exists.is_none() {
            return Err(BackendError::Refused(format!(
                "role {role} no longer exists"
            )));
        }
        // The timestamp is formatted by us from an integer: digits, '-', ':' and ' ' only.
        conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER ROLE {} VALID UNTIL '{expiration}'",
            pg_identifier(role)
        ))))
        .await
        .map_err(|e| classify(e, ""))?;
        Ok(())
    }

    /// Makes `role` unable to log in, ends its sessions, hands what it owns to the admin
    /// and drops it. Idempotent: a role already gone is success.
    pub async fn revoke(&self, role: &str) -> Result<(), BackendError> {
        let mut conn = self.admin().await?;
        async {
            let exists: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM pg_roles WHERE rolname = $1")
                    .bind(role)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(|e| classify(e, ""))?;
            if exists.is_none() {
                return Ok(());
            }
            let ident = pg_identifier(role);
            // First no new logins, then end the open ones, so none slips in between.
            conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(
                "ALTER ROLE {ident} NOLOGIN"
            ))))
            .await
            .map_err(|e| classify(e, ""))?;
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            )
            .bind(role)
            .execute(&mut *conn)
            .await
            .map_err(|e| classify(e, ""))?;
            conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(
                "REASSIGN OWNED BY {ident} TO CURRENT_USER; DROP OWNED BY {ident}; DROP ROLE IF EXISTS {ident}"
            ))))
            .await
            .map_err(|e| classify(e, ""))?;
            Ok(())
        }
        .await
    }
}

impl PostgresDynamic {
    /// Revokes many roles in a few round trips instead of four each: the same steps as
    /// [`PostgresDynamic::revoke`] (no new logins, open sessions ended, what they own
    /// reassigned, dropped), each over the whole batch. Roles already gone are skipped.
    /// All or nothing: one transaction for the statements that can run in one.
    pub async fn revoke_batch(&self, roles: &[String]) -> Result<(), BackendError> {
        if roles.is_empty() {
            return Ok(());
        }
        let mut conn = self.admin().await?;
        let existing: Vec<String> =
            sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1)")
                .bind(roles)
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| classify(e, ""))?;
        if existing.is_empty() {
            return Ok(());
        }
        let idents: Vec<String> = existing.iter().map(|r| pg_identifier(r)).collect();
        let list = idents.join(", ");
        let mut nologin = String::with_capacity(idents.len() * 48);
        for ident in &idents {
            nologin.push_str(&format!("ALTER ROLE {ident} NOLOGIN;"));
        }
        // First no new logins, then end the open sessions, so none slips in between.
        conn.execute(sqlx::raw_sql(AssertSqlSafe(nologin)))
            .await
            .map_err(|e| classify(e, ""))?;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1)",
        )
        .bind(&existing)
        .execute(&mut *conn)
        .await
        .map_err(|e| classify(e, ""))?;
        conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(
            "BEGIN; REASSIGN OWNED BY {list} TO CURRENT_USER; DROP OWNED BY {list}; \
             DROP ROLE IF EXISTS {list}; COMMIT"
        ))))
        .await
        .map_err(|e| classify(e, ""))?;
        Ok(())
    }
}

/// `expires_at` (unix seconds) as PostgreSQL's `VALID UNTIL` reads it, in UTC.
fn valid_until(expires_at: i64) -> Result<String, BackendError> {
    Ok(chrono::DateTime::from_timestamp(expires_at, 0)
        .ok_or_else(|| BackendError::Config(format!("expiry {expires_at} is out of range")))?
        .format("%Y-%m-%d %H:%M:%S+00")
        .to_string())
}

fn pg_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// 32 characters of letters and digits: about 190 bits, and safe inside any quoting.
fn random_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut out = String::with_capacity(32);
    while out.len() < 32 {
        let mut raw = [0u8; 64];
        rand::fill(&mut raw);
        // 62 * 4 = 248: bytes at or above it are dropped, so every character is equally likely.
        for b in raw {
            if out.len() < 32 && b < 248 {
                out.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
    }
    out
}

/// A database that answered with an error refused; anything else means it was not reached.
fn classify(error: sqlx::Error, secret: &str) -> BackendError {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            BackendError::Refused(redact(&format!("{code}: {}", db.message()), secret))
        }
        sqlx::Error::Configuration(e) => BackendError::Config(redact(&e.to_string(), secret)),
        other => BackendError::Unavailable(redact(&other.to_string(), secret)),
    }
}

fn redact(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        text.to_owned()
    } else {
        text.replace(secret, "<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_and_role_names_are_from_safe_alphabets() {
        let a = random_password();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, random_password());
        let backend = PostgresDynamic::new(
            &SecretValue::new("postgres://postgres@127.0.0.1/db"),
            vec!["CREATE ROLE \"{{name}}\"".into()],
            "mayfly_".into(),
        )
        .unwrap();
        assert_eq!(backend.role_name("ls-0A1b'; DROP"), "mayfly_ls0a1bdrop");
    }

    /// Against this machine's PostgreSQL (MAYFLY_TEST_PG_URL): a batch drops every role,
    /// ends their open sessions, takes back what they own, and skips those already gone.
    #[tokio::test]
    async fn a_batch_revokes_every_role_and_ends_its_sessions() {
        let Ok(base) = std::env::var("MAYFLY_TEST_PG_URL") else {
            eprintln!("MAYFLY_TEST_PG_URL is not set: scripts/test sets it");
            return;
        };
        let backend = PostgresDynamic::new(
            &SecretValue::new(format!("{base}/postgres")),
            vec![
                "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'"
                    .into(),
                "GRANT CREATE ON SCHEMA public TO \"{{name}}\"".into(),
            ],
            "mayfly_bt_".into(),
        )
        .unwrap();
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let roles: Vec<String> = (0..3)
            .map(|i| backend.role_name(&format!("ls{tag}{i}")))
            .collect();
        let expires = mayfly_common::clock::unix(std::time::SystemTime::now()) + 600;
        let mut issued = Vec::new();
        for role in &roles {
            issued.push(backend.issue(role, expires).await.unwrap());
        }
        // The first one holds a session and owns a table.
        let password = issued[0].values[1].1.expose().to_owned();
        let url = format!("postgres://{}:{password}@127.0.0.1:5432/postgres", roles[0]);
        let mut session = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE public.t_{tag} (x int)"
        )))
        .execute(&mut session)
        .await
        .unwrap();

        let mut batch = roles.clone();
        batch.push(backend.role_name("ls-never-issued"));
        backend.revoke_batch(&batch).await.unwrap();

        let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres"))
            .await
            .unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = ANY($1)")
            .bind(&roles)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert_eq!(left, 0, "every role is dropped");
        assert!(
            sqlx::query("SELECT 1").execute(&mut session).await.is_err(),
            "the open session was ended"
        );
        let owner: String =
            sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE tablename = $1")
                .bind(format!("t_{tag}"))
                .fetch_one(&mut admin)
                .await
                .unwrap_or_default();
        assert!(
            owner.is_empty() || !owner.starts_with("mayfly_bt_"),
            "{owner}"
        );
        // Again: nothing left, nothing fails.
        backend.revoke_batch(&batch).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS public.t_{tag}"
        )))
        .execute(&mut admin)
        .await
        .unwrap();
    }
}
