//! The audit log's rows and the issued-SVID register written beside them. Appending is
//! the only write: rows are never updated or deleted by the daemon. Each append is one
//! transaction that reads the chain's tail, hashes the new rows onto it and inserts them;
//! on PostgreSQL an advisory lock orders the appends of every daemon sharing the store.

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Backend, Result, Store};

/// The columns of `issued_svids`, in the order `issued_row` reads them.
macro_rules! issued_columns {
    () => {
        "serial, entry_id, spiffe_id, agent_id, ca_slot, issued_at, not_after"
    };
}

/// The issued SVIDs matching `$condition`, wherever they are (migration 0010): the indexed
/// table and the recent serials not moved into it yet, read in one statement.
macro_rules! issued_where {
    ($condition:expr) => {
        concat!(
            "SELECT ",
            issued_columns!(),
            " FROM issued_svids WHERE ",
            $condition,
            " UNION SELECT ",
            issued_columns!(),
            " FROM issued_svids_recent WHERE ",
            $condition
        )
    };
}

/// How many values go into one `IN (...)` list: far below SQLite's and PostgreSQL's
/// limits on bound parameters.
pub(super) const IN_LIST_CHUNK: usize = 500;

/// `$first, $first+1, …` for `count` values.
pub(super) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The chain's last row.
pub(super) const TAIL_SQL: &str = "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1";

/// The start of an audit row's `INSERT`, followed by 12 values a row.
pub(super) const AUDIT_INSERT_HEAD: &str = "INSERT INTO audit_log (seq, at_ms, actor, action, \
     subject, scope, ttl_secs, reason, outcome, detail, prev_hash, hash) VALUES ";

/// The start of a recent serial's `INSERT`, followed by 7 values a row, then the tail.
pub(super) const ISSUED_INSERT_HEAD: &str = "INSERT INTO issued_svids_recent (serial, entry_id, \
     spiffe_id, agent_id, ca_slot, issued_at, not_after) VALUES ";
pub(super) const ISSUED_INSERT_TAIL: &str = " ON CONFLICT (serial) DO NOTHING";

/// An agent's acknowledgement: when, what it did, of which revocation, which agent. A
/// second acknowledgement keeps the first.
pub(super) const ACK_SQL: &str = "UPDATE revocation_acks SET acked_at = $1, detail = $2 \
     WHERE revocation_id = $3 AND agent_id = $4 AND acked_at IS NULL";

/// The SQLite move of recent serials into the indexed table; the write lock held by the
/// transaction keeps anything from being added between the copy and the delete.
pub(super) const MOVE_RECENT_SQLITE: [&str; 2] = [
    concat!(
        "INSERT INTO issued_svids (",
        issued_columns!(),
        ") SELECT ",
        issued_columns!(),
        " FROM issued_svids_recent WHERE true ON CONFLICT (serial) DO NOTHING"
    ),
    "DELETE FROM issued_svids_recent",
];

/// Indexes the subjects of the audit records past the mark…
pub(super) const INDEX_SUBJECTS_SQL: &str = "INSERT INTO audit_subjects (subject, seq) \
     SELECT subject, seq FROM audit_log \
     WHERE seq > (SELECT seq FROM audit_subjects_mark WHERE id = 1) \
     ON CONFLICT (subject, seq) DO NOTHING";

/// …and moves the mark to the chain's end.
pub(super) const MARK_SUBJECTS_SQL: &str =
    "UPDATE audit_subjects_mark SET seq = (SELECT MAX(seq) FROM audit_log) WHERE id = 1";

/// Orders audit appends across daemons on PostgreSQL (`pg_advisory_xact_lock`).
const APPEND_LOCK: i64 = 0x6d61_7966_6c79_0001;

/// The hash the first record chains to.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit record as stored, and as `audit export` writes it (read back by
/// `audit verify --file`, which refuses a line with a field it does not know).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRow {
    pub seq: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub scope: String,
    pub ttl_secs: i64,
    pub reason: String,
    pub outcome: String,
    /// JSON, or empty.
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// One record to append: every field but the position in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditFields {
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub scope: String,
    pub ttl_secs: i64,
    pub reason: String,
    pub outcome: String,
    pub detail: String,
}

/// An SVID the daemon signed: a workload's (with its entry), or an agent's own (with an
/// empty entry id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSvidRecord {
    pub serial: String,
    pub entry_id: String,
    pub spiffe_id: String,
    pub agent_id: String,
    pub ca_slot: String,
    /// Unix seconds.
    pub issued_at: i64,
    pub not_after: i64,
}

/// An agent's acknowledgement of a revocation, recorded with its audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckUpdate {
    pub revocation_id: String,
    pub agent_id: String,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// JSON: what the agent did.
    pub detail: String,
}

/// Which audit rows to read.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only rows at or after this time (unix ms).
    pub since_ms: Option<i64>,
    /// Only rows about this subject: equal, or starting with it when it ends in `*`.
    pub subject: Option<String>,
    /// Only rows with this action, or whose action starts with it followed by `.`.
    pub action: Option<String>,
    /// Only rows after this sequence number (paging).
    pub after_seq: i64,
    pub limit: i64,
}

/// The position a new row chains onto: the last row's seq and hash.
pub type ChainTail = (i64, String);

impl Store {
    /// The last row of the chain, or `(0, GENESIS_HASH)` when there is none.
    pub async fn audit_tail(&self) -> Result<ChainTail> {
        let row = sqlx::query(TAIL_SQL).fetch_optional(&self.pool).await?;
        Ok(match row {
            Some(row) => (row.try_get("seq")?, row.try_get("hash")?),
            None => (0, GENESIS_HASH.to_string()),
        })
    }

    /// Appends `records` (in order), records `issued` and applies `acks` (an agent that
    /// had already acknowledged keeps its first acknowledgement), in one transaction, and
    /// returns the new tail. `known_tail` is where the caller believes the chain ends; on SQLite,
    /// which one daemon owns, it is trusted (the insert fails on a duplicate seq if it is
    /// wrong), while on PostgreSQL the tail is read under the append lock.
    pub async fn append_audit(
        &self,
        records: &[AuditFields],
        issued: &[IssuedSvidRecord],
        acks: &[AckUpdate],
        known_tail: Option<&ChainTail>,
        hash: impl Fn(i64, &str, &AuditFields) -> String,
    ) -> Result<ChainTail> {
        let mut tx = self.begin_write().await?;
        let mut tail = match (self.backend, known_tail) {
            (Backend::Sqlite, Some(tail)) => tail.clone(),
            (backend, _) => {
                // Hold the write lock before reading the tail, so no other writer can
                // append between the read and the insert. SQLite's transaction took it
                // when it began (see `begin_write`).
                if backend == Backend::Postgres {
                    sqlx::query("SELECT pg_advisory_xact_lock($1)")
                        .bind(APPEND_LOCK)
                        .execute(&mut *tx)
                        .await?;
                }
                let row = sqlx::query(TAIL_SQL).fetch_optional(&mut *tx).await?;
                match row {
                    Some(row) => (row.try_get("seq")?, row.try_get("hash")?),
                    None => (0, GENESIS_HASH.to_string()),
                }
            }
        };
        // One multi-row INSERT per table and chunk: each statement is a round trip to the
        // database's connection (a thread hop for SQLite), and a group can hold hundreds.
        for statement in append_statements(records, issued, acks, &mut tail, &hash) {
            statement.query().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(tail)
    }

    /// Rows in chain order, filtered.
    pub async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>> {
        enum Bind {
            Int(i64),
            Text(String),
        }
        let mut sql = String::from(
            "SELECT seq, at_ms, actor, action, subject, scope, ttl_secs, reason, outcome, \
             detail, prev_hash, hash FROM audit_log WHERE seq > $1",
        );
        let mut binds = vec![Bind::Int(filter.after_seq)];
        let mut push = |sql: &mut String, clause: &str, values: Vec<Bind>| {
            // Each `?` in the clause becomes the next numbered placeholder.
            let mut text = String::new();
            for part in clause.split('?').enumerate() {
                if part.0 > 0 {
                    text.push_str(&format!("${}", binds.len() + 1));
                    binds.push(Bind::Int(0));
                }
                text.push_str(part.1);
            }
            let first = binds.len() - values.len();
            for (i, value) in values.into_iter().enumerate() {
                binds[first + i] = value;
            }
            sql.push_str(&text);
        };
        if let Some(since) = filter.since_ms {
            push(&mut sql, " AND at_ms >= ?", vec![Bind::Int(since)]);
        }
        if let Some(subject) = &filter.subject {
            match subject.strip_suffix('*') {
                Some(prefix) => push(
                    &mut sql,
                    " AND substr(subject, 1, CAST(? AS INTEGER)) = ?",
                    vec![
                        Bind::Int(prefix.chars().count() as i64),
                        Bind::Text(prefix.to_string()),
                    ],
                ),
                // Indexed up to the mark; past it (the last second or so), read directly.
                None => push(
                    &mut sql,
                    " AND seq IN (SELECT seq FROM audit_subjects WHERE subject = ? \
                     UNION ALL SELECT seq FROM audit_log WHERE subject = ? \
                     AND seq > (SELECT seq FROM audit_subjects_mark WHERE id = 1))",
                    vec![Bind::Text(subject.clone()), Bind::Text(subject.clone())],
                ),
            }
        }
        if let Some(action) = &filter.action {
            let dotted = format!("{action}.");
            push(
                &mut sql,
                " AND (action = ? OR substr(action, 1, CAST(? AS INTEGER)) = ?)",
                vec![
                    Bind::Text(action.clone()),
                    Bind::Int(dotted.chars().count() as i64),
                    Bind::Text(dotted),
                ],
            );
        }
        let limit = if filter.limit > 0 {
            filter.limit
        } else {
            i64::MAX
        };
        push(&mut sql, " ORDER BY seq LIMIT ?", vec![Bind::Int(limit)]);
        // Built from the fixed fragments above only; every value is a bound parameter.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for value in binds {
            query = match value {
                Bind::Int(n) => query.bind(n),
                Bind::Text(t) => query.bind(t),
            };
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(audit_row).collect()
    }

    /// The serials signed for these entries that have not expired.
    pub async fn live_serials_for_entries(
        &self,
        entry_ids: &[String],
        now: i64,
    ) -> Result<Vec<IssuedSvidRecord>> {
        let mut out = Vec::new();
        // A few statements for a thousand entries, not a thousand statements.
        for chunk in entry_ids.chunks(IN_LIST_CHUNK) {
            let ids = placeholders(2, chunk.len());
            let sql = format!(
                "SELECT {columns} FROM issued_svids WHERE not_after > $1 AND entry_id IN ({ids}) \
                 UNION SELECT {columns} FROM issued_svids_recent \
                 WHERE not_after > $1 AND entry_id IN ({ids})",
                columns = issued_columns!(),
            );
            // Built from fixed text and numbered placeholders only.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
            for id in chunk {
                query = query.bind(id);
            }
            for row in query.fetch_all(&self.pool).await? {
                out.push(issued_row(&row)?);
            }
        }
        Ok(out)
    }

    /// The SVIDs signed to this agent (its workloads' and its own) that have not expired.
    pub async fn live_serials_for_agent(
        &self,
        agent_id: &str,
        now: i64,
    ) -> Result<Vec<IssuedSvidRecord>> {
        self.live_serials_where(
            issued_where!("agent_id = $1 AND not_after > $2"),
            agent_id,
            now,
        )
        .await
    }

    /// Unexpired SVIDs (workload and agent) signed by CA slot `slot`.
    pub async fn live_serials_for_slot(
        &self,
        slot: &str,
        now: i64,
    ) -> Result<Vec<IssuedSvidRecord>> {
        self.live_serials_where(issued_where!("ca_slot = $1 AND not_after > $2"), slot, now)
            .await
    }

    async fn live_serials_where(
        &self,
        sql: &'static str,
        key: &str,
        now: i64,
    ) -> Result<Vec<IssuedSvidRecord>> {
        let rows = sqlx::query(sql)
            .bind(key)
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(issued_row).collect()
    }

    pub async fn issued_svid(&self, serial: &str) -> Result<Option<IssuedSvidRecord>> {
        let row = sqlx::query(issued_where!("serial = $1"))
            .bind(serial)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(issued_row).transpose()
    }

    /// Forgets SVIDs that expired before `before` (unix seconds).
    pub async fn prune_issued_svids(&self, before: i64) -> Result<u64> {
        let mut pruned = 0;
        for sql in [
            "DELETE FROM issued_svids WHERE not_after < $1",
            "DELETE FROM issued_svids_recent WHERE not_after < $1",
        ] {
            let done = sqlx::query(sql).bind(before).execute(&self.pool).await?;
            pruned += done.rows_affected();
        }
        Ok(pruned)
    }

    /// Moves the serials recorded since the last call into the indexed table, and indexes
    /// the audit records appended since by subject, in one transaction; returns how many
    /// of each. Signing writes both where a commit costs least (see migration 0010); the
    /// daemon calls this about once a second, when one index page takes many keys at once.
    /// Readers read both places in one statement, so a move is never half seen.
    pub async fn index_recent(&self) -> Result<(u64, u64)> {
        let mut tx = self.begin_write().await?;
        let moved = match self.backend {
            Backend::Sqlite => {
                let copied = sqlx::query(MOVE_RECENT_SQLITE[0]).execute(&mut *tx).await?;
                sqlx::query(MOVE_RECENT_SQLITE[1]).execute(&mut *tx).await?;
                copied.rows_affected()
            }
            Backend::Postgres => {
                // Other daemons sign meanwhile: move exactly the rows this statement
                // deletes. Under the append lock, no audit record is committed past the
                // tail read below while the subjects are indexed.
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(APPEND_LOCK)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(concat!(
                    "WITH moved AS (DELETE FROM issued_svids_recent RETURNING ",
                    issued_columns!(),
                    ") INSERT INTO issued_svids (",
                    issued_columns!(),
                    ") SELECT ",
                    issued_columns!(),
                    " FROM moved ON CONFLICT (serial) DO NOTHING"
                ))
                .execute(&mut *tx)
                .await?
                .rows_affected()
            }
        };
        let indexed = sqlx::query(INDEX_SUBJECTS_SQL)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if indexed > 0 {
            sqlx::query(MARK_SUBJECTS_SQL).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok((moved, indexed))
    }
}

fn audit_row(row: &AnyRow) -> Result<AuditRow> {
    Ok(AuditRow {
        seq: row.try_get("seq")?,
        at_ms: row.try_get("at_ms")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        subject: row.try_get("subject")?,
        scope: row.try_get("scope")?,
        ttl_secs: row.try_get("ttl_secs")?,
        reason: row.try_get("reason")?,
        outcome: row.try_get("outcome")?,
        detail: row.try_get("detail")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

fn issued_row(row: &AnyRow) -> Result<IssuedSvidRecord> {
    Ok(IssuedSvidRecord {
        serial: row.try_get("serial")?,
        entry_id: row.try_get("entry_id")?,
        spiffe_id: row.try_get("spiffe_id")?,
        agent_id: row.try_get("agent_id")?,
        ca_slot: row.try_get("ca_slot")?,
        issued_at: row.try_get("issued_at")?,
        not_after: row.try_get("not_after")?,
    })
}

/// A value bound to a placeholder.
enum Bind<'a> {
    Int(i64),
    Text(&'a str),
    Owned(String),
}

/// One SQL statement and the values of its placeholders, in order.
struct Statement<'a> {
    sql: String,
    binds: Vec<Bind<'a>>,
}

impl<'a> Statement<'a> {
    fn query(self) -> sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments> {
        // Only numbered placeholders are spliced into the fixed SQL; every value is bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(self.sql));
        for bind in self.binds {
            query = match bind {
                Bind::Int(n) => query.bind(n),
                Bind::Text(t) => query.bind(t),
                Bind::Owned(t) => query.bind(t),
            };
        }
        query
    }
}

/// The statements that append `records` onto `tail` (advanced to the new end), record
/// `issued` and apply `acks`, each with its placeholders numbered from 1.
fn append_statements<'a>(
    records: &'a [AuditFields],
    issued: &'a [IssuedSvidRecord],
    acks: &'a [AckUpdate],
    tail: &mut ChainTail,
    hash: &impl Fn(i64, &str, &AuditFields) -> String,
) -> Vec<Statement<'a>> {
    let mut statements = Vec::new();
    for chunk in records.chunks(ROWS_PER_INSERT) {
        let sql = values_sql(AUDIT_INSERT_HEAD, 12, chunk.len(), "");
        let mut binds = Vec::with_capacity(chunk.len() * 12);
        for record in chunk {
            let seq = tail.0 + 1;
            let digest = hash(seq, &tail.1, record);
            binds.extend([
                Bind::Int(seq),
                Bind::Int(record.at_ms),
                Bind::Text(&record.actor),
                Bind::Text(&record.action),
                Bind::Text(&record.subject),
                Bind::Text(&record.scope),
                Bind::Int(record.ttl_secs),
                Bind::Text(&record.reason),
                Bind::Text(&record.outcome),
                Bind::Text(&record.detail),
                Bind::Owned(std::mem::take(&mut tail.1)),
                Bind::Owned(digest.clone()),
            ]);
            *tail = (seq, digest);
        }
        statements.push(Statement { sql, binds });
    }
    for chunk in issued.chunks(ROWS_PER_INSERT) {
        let sql = values_sql(ISSUED_INSERT_HEAD, 7, chunk.len(), ISSUED_INSERT_TAIL);
        let mut binds = Vec::with_capacity(chunk.len() * 7);
        for svid in chunk {
            binds.extend([
                Bind::Text(&svid.serial),
                Bind::Text(&svid.entry_id),
                Bind::Text(&svid.spiffe_id),
                Bind::Text(&svid.agent_id),
                Bind::Text(&svid.ca_slot),
                Bind::Int(svid.issued_at),
                Bind::Int(svid.not_after),
            ]);
        }
        statements.push(Statement { sql, binds });
    }
    for ack in acks {
        statements.push(Statement {
            sql: ACK_SQL.to_owned(),
            binds: vec![
                Bind::Int(ack.at_ms),
                Bind::Text(&ack.detail),
                Bind::Text(&ack.revocation_id),
                Bind::Text(&ack.agent_id),
            ],
        });
    }
    statements
}

/// Rows per multi-row INSERT: 12 values a row stays far below SQLite's 32,766 bound
/// parameters and PostgreSQL's 65,535.
const ROWS_PER_INSERT: usize = 256;

/// `head` followed by `rows` tuples of `columns` numbered placeholders from `$1`
/// (`($1, $2), ($3, $4)`), then `tail`.
pub(super) fn values_sql(head: &str, columns: usize, rows: usize, tail: &str) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * columns * 6);
    sql.push_str(head);
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            let sep = if column == 0 { "" } else { ", " };
            let _ = write!(sql, "{sep}${}", 1 + row * columns + column);
        }
        sql.push(')');
    }
    sql.push_str(tail);
    sql
}
