//! The audit writer's own SQLite connection, used from the writer's own thread.
//!
//! Every SVID a daemon signs waits for one of these appends, so they are the one serial
//! step of signing. Through the pool, an append went from the writer's task to the
//! connection's thread and back (sqlx runs each SQLite connection on a thread of its own)
//! and through sqlx's `Any` layer, and each group's multi-row `INSERT` was a new statement
//! to parse. Here the writer's thread holds the connection itself, and each table's
//! one-row `INSERT` is prepared once and run per row (measured in docs/benchmarks.md).
//! PostgreSQL, and a SQLite database that is not a file, keep the pool's path
//! ([`Store::append_audit`]).

use std::path::PathBuf;

use rusqlite::{OpenFlags, OptionalExtension as _, TransactionBehavior, params};

use super::audit::{
    ACK_SQL, AUDIT_INSERT_HEAD, INDEX_SUBJECTS_SQL, ISSUED_INSERT_HEAD, ISSUED_INSERT_TAIL,
    MARK_SUBJECTS_SQL, MOVE_RECENT_SQLITE, TAIL_SQL, values_sql,
};
use super::{
    AckUpdate, AuditFields, ChainTail, GENESIS_HASH, IssuedSvidRecord, Result, SQLITE_BUSY_TIMEOUT,
    SQLITE_MMAP_SIZE, Store,
};

/// A connection that appends to the audit log and indexes what signing recorded. Owned by
/// one thread; every method blocks.
pub struct AuditAppender {
    conn: rusqlite::Connection,
    audit_insert: String,
    issued_insert: String,
}

impl std::fmt::Debug for AuditAppender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditAppender").finish_non_exhaustive()
    }
}

impl Store {
    /// A connection of its own for the audit writer, on the same SQLite file as the pool;
    /// `None` on PostgreSQL or for a SQLite database that is not a file (`:memory:`).
    pub fn audit_appender(&self) -> Result<Option<AuditAppender>> {
        let Some(path) = self.sqlite_file() else {
            return Ok(None);
        };
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // The pool's settings (`Store::connect`). FULL is SQLite's compiled default and
        // the pool's: in WAL mode each commit is synced before it returns, which is what
        // "on the trail before the SVID is handed out" rests on; stated, not assumed.
        conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "mmap_size", SQLITE_MMAP_SIZE)?;
        // The once-a-second move into the indexes is one statement over thousands of rows,
        // whose statement journal SQLite would otherwise spill to a file under /var/tmp
        // past 64 KiB: written, read back and deleted every second.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        let journal: String = conn.pragma_query_value(None, "journal_mode", |row| row.get(0))?;
        if !journal.eq_ignore_ascii_case("wal") {
            // Not the file `connect` prepared: keep to the pool.
            return Ok(None);
        }
        Ok(Some(AuditAppender {
            conn,
            audit_insert: values_sql(AUDIT_INSERT_HEAD, 12, 1, ""),
            issued_insert: values_sql(ISSUED_INSERT_HEAD, 7, 1, ISSUED_INSERT_TAIL),
        }))
    }

    /// The file of a SQLite store, if it is one.
    fn sqlite_file(&self) -> Option<PathBuf> {
        use std::str::FromStr as _;
        if self.backend != super::Backend::Sqlite {
            return None;
        }
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&self.url).ok()?;
        let path = options.get_filename();
        let name = path.to_str()?;
        if name.is_empty() || name == ":memory:" || name.starts_with("file:") {
            return None;
        }
        path.is_file().then(|| path.to_path_buf())
    }
}

impl AuditAppender {
    /// The last row of the chain, or `(0, GENESIS_HASH)` when there is none.
    pub fn tail(&mut self) -> Result<ChainTail> {
        Ok(read_tail(&self.conn)?)
    }

    /// [`Store::append_audit`] on this connection: the same rows, in one transaction that
    /// holds the write lock from its start. With `known_tail` the chain is trusted to end
    /// there (a wrong tail fails on the duplicate seq); without, it is read under the lock.
    pub fn append(
        &mut self,
        records: &[AuditFields],
        issued: &[IssuedSvidRecord],
        acks: &[AckUpdate],
        known_tail: Option<&ChainTail>,
        hash: impl Fn(i64, &str, &AuditFields) -> String,
    ) -> Result<ChainTail> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut tail = match known_tail {
            Some(tail) => tail.clone(),
            None => read_tail(&tx)?,
        };
        {
            let mut insert = tx.prepare_cached(&self.audit_insert)?;
            for record in records {
                let seq = tail.0 + 1;
                let digest = hash(seq, &tail.1, record);
                insert.execute(params![
                    seq,
                    record.at_ms,
                    record.actor,
                    record.action,
                    record.subject,
                    record.scope,
                    record.ttl_secs,
                    record.reason,
                    record.outcome,
                    record.detail,
                    tail.1,
                    digest,
                ])?;
                tail = (seq, digest);
            }
        }
        if !issued.is_empty() {
            let mut insert = tx.prepare_cached(&self.issued_insert)?;
            for svid in issued {
                insert.execute(params![
                    svid.serial,
                    svid.entry_id,
                    svid.spiffe_id,
                    svid.agent_id,
                    svid.ca_slot,
                    svid.issued_at,
                    svid.not_after,
                ])?;
            }
        }
        if !acks.is_empty() {
            let mut update = tx.prepare_cached(ACK_SQL)?;
            for ack in acks {
                update.execute(params![
                    ack.at_ms,
                    ack.detail,
                    ack.revocation_id,
                    ack.agent_id
                ])?;
            }
        }
        // Dropped uncommitted on any error above, which rolls the transaction back.
        tx.commit()?;
        Ok(tail)
    }

    /// [`Store::index_recent`] on this connection.
    pub fn index_recent(&mut self) -> Result<(u64, u64)> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let moved = tx.execute(MOVE_RECENT_SQLITE[0], [])?;
        tx.execute(MOVE_RECENT_SQLITE[1], [])?;
        let indexed = tx.execute(INDEX_SUBJECTS_SQL, [])?;
        if indexed > 0 {
            tx.execute(MARK_SUBJECTS_SQL, [])?;
        }
        tx.commit()?;
        Ok((moved as u64, indexed as u64))
    }
}

fn read_tail(conn: &rusqlite::Connection) -> rusqlite::Result<ChainTail> {
    Ok(conn
        .query_row(TAIL_SQL, [], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?
        .unwrap_or_else(|| (0, GENESIS_HASH.to_string())))
}
