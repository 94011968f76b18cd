//! The one error type of the datastore. Each variant says what went wrong in words an
//! operator can act on; none carries a connection string with its password.

use std::path::PathBuf;

use sqlx::migrate::MigrateError;

/// Everything a store call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record the call names does not exist.
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },

    /// Writing would duplicate a record that must be unique.
    #[error("{kind} already exists: {detail}")]
    Conflict { kind: &'static str, detail: String },

    /// No join token with this hash was ever issued (or it was purged).
    #[error("unknown join token: generate a new one with `mayflyd token generate`")]
    TokenUnknown,

    /// The join token expired before it was presented; it stays unused.
    #[error("join token expired at {expires_at} (unix seconds): generate a new one")]
    TokenExpired { expires_at: i64 },

    /// The join token was already presented once; join tokens are single-use.
    #[error("join token already used at {used_at} (unix seconds): generate a new one")]
    TokenAlreadyUsed { used_at: i64 },

    /// The agent is banned: it may not attest again until an operator lifts the ban.
    #[error("agent {spiffe_id} is banned and may not attest")]
    AgentBanned { spiffe_id: String },

    /// The agent exists but is evicted or banned, so it may not be issued a new SVID.
    #[error("agent {spiffe_id} is {status}, not active: it must attest again")]
    AgentNotActive { spiffe_id: String, status: String },

    /// Only a prepared CA slot can become the active one.
    #[error("CA slot {id:?} is {state}, not prepared: only a prepared slot can be activated")]
    CaSlotNotPrepared { id: String, state: String },

    /// The active CA slot signs everything; removing it would leave the daemon unable to
    /// issue.
    #[error("CA slot {id:?} is active: activate another slot (or retire it) before deleting it")]
    CaSlotActive { id: String },

    /// What this backend does not do (a backup of PostgreSQL, say).
    #[error("{0}")]
    Unsupported(&'static str),

    /// A file the store was asked to write could not be.
    #[error("{what}: {detail}")]
    Io { what: &'static str, detail: String },

    /// The datastore URL names a database this build does not support.
    #[error(
        "unsupported datastore URL scheme {scheme:?}: use postgres://, postgresql:// or sqlite:, \
         or leave it unset for SQLite in data_dir"
    )]
    UnsupportedUrl { scheme: String },

    /// The data directory or the SQLite file in it could not be created or opened.
    #[error("cannot prepare the datastore in {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The database could not be reached. `target` is the URL with its password removed.
    #[error("cannot connect to the datastore at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },

    /// The schema could not be brought up to date.
    #[error("datastore migration failed: {0}")]
    Migrate(#[source] MigrateError),

    /// A stored value could not be read back (hand-edited or written by a newer version).
    #[error("datastore holds an unreadable {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },

    /// Any other database failure.
    #[error("datastore error: {0}")]
    Database(#[from] sqlx::Error),

    /// A failure on the audit writer's own SQLite connection ([`super::AuditAppender`]).
    #[error("datastore error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl StoreError {
    /// Turns a unique-constraint violation into [`StoreError::Conflict`] and anything else
    /// into [`StoreError::Database`].
    pub(crate) fn conflict_or_database(
        err: sqlx::Error,
        kind: &'static str,
        detail: impl FnOnce() -> String,
    ) -> StoreError {
        match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict {
                kind,
                detail: detail(),
            },
            _ => StoreError::Database(err),
        }
    }
}
