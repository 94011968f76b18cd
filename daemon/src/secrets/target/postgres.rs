//! PostgreSQL roles: the password changed with `ALTER ROLE` over an admin connection and
//! proven by logging in as the role.

use std::fmt;
use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor};

use super::*;
use crate::secrets::{Credential, SecretValue, Target, TargetError};

/// Where a PostgreSQL role's password is changed and checked.
pub struct PostgresTargetConfig {
    /// A superuser or CREATEROLE login, `postgres://admin:pw@host:port/db`.
    pub admin_url: SecretValue,
    /// Where the rotated role logs in, without user or password: `postgres://host:port/db`.
    pub login_url: String,
}

/// A PostgreSQL role: `set` runs `ALTER ROLE … WITH LOGIN PASSWORD …` as the admin, `test`
/// logs in as the role. The role must exist; nothing is created.
pub struct PostgresTarget {
    admin: PgConnectOptions,
    login: PgConnectOptions,
}

impl PostgresTarget {
    pub fn new(config: PostgresTargetConfig) -> Result<Self, TargetConfigError> {
        require_scheme(
            "admin_url",
            config.admin_url.expose(),
            &["postgres", "postgresql"],
        )?;
        require_scheme("login_url", &config.login_url, &["postgres", "postgresql"])?;
        let admin = PgConnectOptions::from_str(config.admin_url.expose()).map_err(|e| {
            TargetConfigError::BadUrl {
                which: "admin_url",
                // The parse error could quote the URL, password included.
                reason: redact(&e.to_string(), config.admin_url.expose()),
            }
        })?;
        reject_login_credentials(&config.login_url)?;
        let login = PgConnectOptions::from_str(&config.login_url).map_err(|e| {
            TargetConfigError::BadUrl {
                which: "login_url",
                reason: e.to_string(),
            }
        })?;
        // sqlx logs every statement at debug level, and ours carries the new password.
        Ok(Self {
            admin: admin.disable_statement_logging(),
            login: login.disable_statement_logging(),
        })
    }
}

#[tonic::async_trait]
impl Target for PostgresTarget {
    async fn set(&self, credential: &Credential) -> Result<(), TargetError> {
        let password = credential.password.expose();
        reject_nul(credential)?;
        // ALTER ROLE takes no bind parameters, so the value is quoted into the statement. An
        // E'' literal is read the same whatever standard_conforming_strings says.
        let statement = SecretValue::new(format!(
            "ALTER ROLE {} WITH LOGIN PASSWORD {}",
            pg_identifier(&credential.username),
            pg_literal(password)
        ));
        let mut conn = connect(self.admin.connect(), Step::Admin, password).await?;
        let result = conn
            .execute(sqlx::raw_sql(AssertSqlSafe(statement.expose().to_owned())))
            .await;
        let _ = conn.close().await;
        result
            .map(|_| ())
            .map_err(|e| classify(e, Step::Admin, password))
    }

    async fn test(&self, credential: &Credential) -> Result<(), TargetError> {
        let password = credential.password.expose();
        reject_nul(credential)?;
        let options = self
            .login
            .clone()
            .username(&credential.username)
            .password(password);
        let mut conn = connect(options.connect(), Step::Login, password).await?;
        let result = conn.execute(sqlx::raw_sql("SELECT 1")).await;
        let _ = conn.close().await;
        result
            .map(|_| ())
            .map_err(|e| classify(e, Step::Login, password))
    }
}

impl fmt::Debug for PostgresTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // PgConnectOptions' own Debug prints the password.
        f.debug_struct("PostgresTarget")
            .field(
                "admin",
                &describe(
                    "postgres",
                    Some(self.admin.get_username()),
                    self.admin.get_host(),
                    self.admin.get_port(),
                    self.admin.get_database(),
                ),
            )
            .field(
                "login",
                &describe(
                    "postgres",
                    None,
                    self.login.get_host(),
                    self.login.get_port(),
                    self.login.get_database(),
                ),
            )
            .finish()
    }
}

/// `"name"`, with embedded double quotes doubled.
pub(super) fn pg_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `E'value'`, with backslashes and single quotes escaped; an E'' string treats backslash as
/// an escape regardless of standard_conforming_strings.
pub(super) fn pg_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}
