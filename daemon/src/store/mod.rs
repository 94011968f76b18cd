//! The daemon's datastore: registration entries, join tokens, agents, CA slots, the
//! bundle sequence, secrets, the audit log, revocations and the leases several daemons share, behind one schema with
//! two backends (SQLite in `data_dir` by default, PostgreSQL for HA), reached through one
//! code path over `sqlx::AnyPool`.

mod agents;
mod appender;
mod audit;
mod bundle;
mod ca_slots;
mod credentials;
mod elevations;
mod entries;
mod error;
mod join_tokens;
mod leases;
mod migrations;
mod revocations;
mod secrets;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Connection as _};

pub use agents::{AgentRecord, AgentStatus};
pub use appender::AuditAppender;
pub use audit::{
    AckUpdate, AuditFields, AuditFilter, AuditRow, ChainTail, GENESIS_HASH, IssuedSvidRecord,
};
pub use ca_slots::{CaSlotRecord, CaSlotState};
pub use credentials::{CredentialLease, CredentialRecord, LeaseFilter, LeaseState};
pub use elevations::{ElevationRecord, ElevationReview, ElevationState};
pub use entries::{EntryFilter, EntryRecord, EntryUpdate, NewEntry};
pub use error::StoreError;
pub use join_tokens::JoinTokenRecord;
pub use leases::LeaseRecord;
pub use revocations::{RevocationAckRecord, RevocationRecord, RevokedSerialRecord};
pub use secrets::{
    JobRecord, JobState, LocalVersionRecord, ScheduledStart, SecretRecord, TriggerKind,
};

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The file the SQLite backend keeps in `data_dir`.
pub const SQLITE_FILE_NAME: &str = "mayfly.db";

/// How long a statement waits on a locked SQLite database before failing. Writers queue
/// on SQLite's single write lock; a few seconds absorbs bursts (many agents attesting at
/// once) without hanging a request forever.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How much of the database file SQLite reads through a memory mapping (1 GiB).
const SQLITE_MMAP_SIZE: i64 = 1 << 30;

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A handle on the datastore. Cloning is cheap: clones share one connection pool.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// This process, in the change notices it sends (so it ignores its own).
    origin: Arc<str>,
    /// The PostgreSQL URL, for the connection that listens for other daemons' notices.
    url: Arc<str>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL as given: it may carry the database password.
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

impl Store {
    /// Opens the datastore and brings its schema up to date.
    ///
    /// `url` is `None` for the default SQLite file `<data_dir>/mayfly.db` (the directory and
    /// file are created, mode 0700/0600, if missing), a `postgres://` or `postgresql://` URL
    /// for PostgreSQL, or an explicit `sqlite:` URL.
    pub async fn connect(url: Option<&str>, data_dir: &Path) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (backend, url) = match url {
            None => (Backend::Sqlite, prepare_sqlite_file(data_dir)?),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                (Backend::Postgres, u.to_owned())
            }
            Some(u) if u.starts_with("sqlite:") => (Backend::Sqlite, u.to_owned()),
            Some(u) => {
                return Err(StoreError::UnsupportedUrl {
                    scheme: u.split(':').next().unwrap_or_default().to_owned(),
                });
            }
        };
        let connect_error = |source| StoreError::Connect {
            target: redact_url(&url),
            source,
        };

        // One plain connection first: a wrong host or password fails here at once, where the
        // pool would keep retrying until its acquire timeout.
        let mut conn = sqlx::AnyConnection::connect(&url)
            .await
            .map_err(connect_error)?;
        if backend == Backend::Sqlite {
            // WAL lets readers (every agent stream) proceed while one writer commits. It is a
            // property of the database file, and switching needs an exclusive lock that the
            // busy timeout cannot wait for, so set it once here, before the pool opens more.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&mut conn)
                .await
                .map_err(connect_error)?;
        }
        conn.close().await.map_err(connect_error)?;

        let mut options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(30));
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    // sqlx already turns both on for SQLite; stating them here keeps the
                    // guarantees visible and independent of a driver default changing.
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    // PRAGMA statements take no bound parameters: the values are numbers
                    // formatted from the constants above.
                    let busy = format!("PRAGMA busy_timeout = {}", SQLITE_BUSY_TIMEOUT.as_millis());
                    sqlx::query(sqlx::AssertSqlSafe(busy))
                        .execute(&mut *conn)
                        .await?;
                    // Read the file through a shared mapping rather than each connection's
                    // 2 MB page cache: every signing writes into the serials' entry index
                    // and the audit log's subject index at pages spread over the file, and
                    // once the file outgrew the cache each was a read system call. Measured
                    // in docs/benchmarks.md (signing slowed by half from 20,000 to 50,000
                    // certificates). The mapping is the kernel's page cache, not more memory.
                    let mmap = format!("PRAGMA mmap_size = {SQLITE_MMAP_SIZE}");
                    sqlx::query(sqlx::AssertSqlSafe(mmap))
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(&url).await.map_err(connect_error)?;

        migrations::run(&pool, backend).await?;
        Ok(Store {
            pool,
            backend,
            origin: uuid::Uuid::new_v4().simple().to_string().into(),
            url: url.into(),
        })
    }

    /// Tells the other daemons on this PostgreSQL datastore what changed, after it is
    /// committed (`crate::cluster` listens). A no-op on SQLite, which one daemon has to
    /// itself. A notice that fails to go is logged: the listeners' periodic catch-up reads
    /// it from the rows.
    pub async fn announce(&self, notice: &crate::cluster::Notice) {
        if self.backend != Backend::Postgres {
            return;
        }
        let payload = crate::cluster::encode(&self.origin, notice);
        if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::cluster::CHANNEL)
            .bind(payload)
            .execute(&self.pool)
            .await
        {
            tracing::warn!(error = %e, ?notice, "could not notify the other daemons of a change");
        }
    }

    /// Writes a consistent copy of the SQLite datastore to `path` while it is in use
    /// (`VACUUM INTO`: one read transaction, so the copy is the database at one moment,
    /// WAL included). The file is created here, 0600 and empty, before SQLite fills it, so
    /// no other user can read the copy at any point. PostgreSQL has its own tools.
    pub async fn backup_to(&self, path: &Path) -> Result<u64> {
        use std::os::unix::fs::OpenOptionsExt as _;
        if self.backend != Backend::Sqlite {
            return Err(StoreError::Unsupported(
                "backup of a PostgreSQL datastore: use pg_dump or your PostgreSQL backups",
            ));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::Io {
                what: "backup file",
                detail: format!("{}: {e}", path.display()),
            })?;
        let result = sqlx::query("VACUUM INTO $1")
            .bind(path.to_string_lossy().into_owned())
            .execute(&self.pool)
            .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(path);
            return Err(e.into());
        }
        Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
    }

    /// This process's id in change notices.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The PostgreSQL URL (with its password), for the listening connection only.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The database this store talks to.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Begins a transaction that writes. On SQLite it takes the write lock first (`BEGIN
    /// IMMEDIATE`), waiting out the busy timeout for it: a deferred transaction that reads
    /// and then writes fails at once with "database is locked" when another connection has
    /// committed since its read (SQLITE_BUSY_SNAPSHOT), which no busy timeout waits out, and
    /// with the audit writer committing beside every rotation step that was most of them.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Runs the most trivial query there is: the datastore answers, whatever its schema.
    /// Waits for a pooled connection as long as any query would; callers that must
    /// answer sooner bound it themselves.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes every pooled connection; later calls fail. Lets tests and shutdown release a
    /// PostgreSQL database or the SQLite file deterministically.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Creates `data_dir` (0700) and the database file (0600) if missing, and returns the
/// SQLite URL for it. Creating the file ourselves fixes its mode: SQLite would create it
/// from the umask, and its WAL and shared-memory files copy the database file's mode.
fn prepare_sqlite_file(data_dir: &Path) -> Result<String> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};

    let data_dir_error = |source| StoreError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(data_dir_error)?;
    let file = data_dir.join(SQLITE_FILE_NAME);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&file)
        .map_err(data_dir_error)?;

    let path = file.to_str().ok_or_else(|| StoreError::DataDir {
        path: data_dir.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path is not valid UTF-8, which a SQLite URL requires",
        ),
    })?;
    Ok(format!("sqlite://{}?mode=rwc", percent_encode_path(path)))
}

/// Escapes the characters that would otherwise end the path part of a URL or be decoded
/// by sqlx (`%`), so any directory name survives the trip through the URL.
fn percent_encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        let special = matches!(c, '%' | ' ' | '"' | '#' | '<' | '>' | '?' | '`' | '{' | '}');
        if special || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A form of a database URL that is safe to show: the password and the query string
/// (which may carry `password=` or `sslpassword=`) are replaced.
fn redact_url(url: &str) -> String {
    let (base, has_query) = match url.split_once('?') {
        Some((base, _)) => (base, true),
        None => (url, false),
    };
    let redacted = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _password)) => format!("{user}:***@{host}"),
                    None => format!("{userinfo}@{host}"),
                },
                None => authority.to_owned(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => base.to_owned(),
    };
    if has_query {
        format!("{redacted}?…")
    } else {
        redacted
    }
}
