//! MariaDB (and MySQL) accounts: the password changed with `ALTER USER` over an admin
//! connection and proven by logging in as the account.

use std::fmt;
use std::str::FromStr;

use sqlx::mysql::MySqlConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor};

use super::*;
use crate::secrets::{Credential, SecretValue, Target, TargetError};

/// Where a MariaDB (or MySQL) account's password is changed and checked.
pub struct MysqlTargetConfig {
    /// An account allowed to ALTER USER, `mysql://admin:pw@host:port/db`.
    pub admin_url: SecretValue,
    /// Where the rotated account logs in, without user or password: `mysql://host:port/db`.
    pub login_url: String,
    /// The host part of the account, `'user'@'<host>'`. `None` means `%`.
    pub user_host: Option<String>,
}

/// A MariaDB account: `set` runs `ALTER USER 'user'@'host' IDENTIFIED BY …` as the admin,
/// `test` logs in as the account. The account must exist; nothing is created.
pub struct MysqlTarget {
    admin: MySqlConnectOptions,
    login: MySqlConnectOptions,
    user_host: String,
}

impl MysqlTarget {
    pub fn new(config: MysqlTargetConfig) -> Result<Self, TargetConfigError> {
        require_scheme(
            "admin_url",
            config.admin_url.expose(),
            &["mysql", "mariadb"],
        )?;
        require_scheme("login_url", &config.login_url, &["mysql", "mariadb"])?;
        let admin = MySqlConnectOptions::from_str(config.admin_url.expose()).map_err(|e| {
            TargetConfigError::BadUrl {
                which: "admin_url",
                reason: redact(&e.to_string(), config.admin_url.expose()),
            }
        })?;
        reject_login_credentials(&config.login_url)?;
        let login = MySqlConnectOptions::from_str(&config.login_url).map_err(|e| {
            TargetConfigError::BadUrl {
                which: "login_url",
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            admin: admin.disable_statement_logging(),
            login: login.disable_statement_logging(),
            user_host: config.user_host.unwrap_or_else(|| "%".to_owned()),
        })
    }
}

#[tonic::async_trait]
impl Target for MysqlTarget {
    async fn set(&self, credential: &Credential) -> Result<(), TargetError> {
        let password = credential.password.expose();
        reject_nul(credential)?;
        let mut conn = connect(self.admin.connect(), Step::Admin, password).await?;
        let result = async {
            // Whether a backslash escapes depends on the session's sql_mode; ask rather than
            // guess, or a backslash in a value would silently change the password.
            let sql_mode: String = sqlx::query_scalar("SELECT @@SESSION.sql_mode")
                .fetch_one(&mut conn)
                .await?;
            let backslash_escapes = !sql_mode
                .split(',')
                .any(|mode| mode.eq_ignore_ascii_case("NO_BACKSLASH_ESCAPES"));
            let statement = SecretValue::new(format!(
                "ALTER USER {}@{} IDENTIFIED BY {}",
                mysql_literal(&credential.username, backslash_escapes),
                mysql_literal(&self.user_host, backslash_escapes),
                mysql_literal(password, backslash_escapes)
            ));
            conn.execute(sqlx::raw_sql(AssertSqlSafe(statement.expose().to_owned())))
                .await
        }
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

impl fmt::Debug for MysqlTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // MySqlConnectOptions' own Debug prints the password.
        f.debug_struct("MysqlTarget")
            .field(
                "admin",
                &describe(
                    "mysql",
                    Some(self.admin.get_username()),
                    self.admin.get_host(),
                    self.admin.get_port(),
                    self.admin.get_database(),
                ),
            )
            .field(
                "login",
                &describe(
                    "mysql",
                    None,
                    self.login.get_host(),
                    self.login.get_port(),
                    self.login.get_database(),
                ),
            )
            .field("user_host", &self.user_host)
            .finish()
    }
}

/// `'value'`, with single quotes doubled and, unless NO_BACKSLASH_ESCAPES is set,
/// backslashes escaped.
pub(super) fn mysql_literal(value: &str, backslash_escapes: bool) -> String {
    let value = if backslash_escapes {
        value.replace('\\', "\\\\")
    } else {
        value.to_owned()
    };
    format!("'{}'", value.replace('\'', "''"))
}
