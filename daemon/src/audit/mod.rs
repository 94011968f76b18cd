//! The tamper-evident audit trail: one record per security-relevant event, each hashed
//! onto the one before it (SHA-256), so that `mayflyd audit verify` finds the first record
//! that was edited, deleted or moved.
//!
//! Records go through one writer task that commits whatever has queued up in one
//! transaction (group commit): `record` waits for the commit, `note` does not, and both
//! keep the order in which they were called.

use std::sync::Arc;

use aws_lc_rs::digest;
use tokio::sync::{mpsc, oneshot};

use mayfly_common::clock::unix_ms;

use crate::identity::Clock;
use crate::store::{
    AckUpdate, AuditFields, AuditFilter, AuditRow, ChainTail, GENESIS_HASH, IssuedSvidRecord,
    Store, StoreError,
};

mod throttle;

/// At most this many queued events go into one transaction.
const MAX_GROUP: usize = 512;

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// An operator on the admin socket, by uid.
    Operator(u32),
    /// An agent or a workload, by SPIFFE ID.
    Spiffe(String),
    /// The rotation scheduler (or another of the daemon's own timers).
    Scheduler,
    /// The daemon itself.
    Daemon,
    /// A caller that has not proven an identity (a join token presenter), as described.
    Unauthenticated(String),
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Operator(uid) => write!(f, "uid:{uid}"),
            Actor::Spiffe(id) => f.write_str(id),
            Actor::Scheduler => f.write_str("scheduler"),
            Actor::Daemon => f.write_str("daemon"),
            Actor::Unauthenticated(what) => write!(f, "unauthenticated:{what}"),
        }
    }
}

/// How it ended.
pub const OK: &str = "ok";
pub const DENIED: &str = "denied";
pub const FAILED: &str = "failed";
/// A policy denied it in shadow mode: it was let through and would have been refused.
pub const WOULD_DENY: &str = "would-deny";

/// One event, built up field by field. Never put a secret value in any field.
#[derive(Debug, Clone)]
pub struct Event {
    fields: AuditFields,
}

impl Event {
    pub fn new(actor: &Actor, action: &str, subject: impl Into<String>) -> Self {
        Self {
            fields: AuditFields {
                actor: actor.to_string(),
                action: action.to_string(),
                subject: subject.into(),
                outcome: OK.to_string(),
                ..AuditFields::default()
            },
        }
    }

    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.fields.scope = scope.into();
        self
    }

    pub fn ttl_secs(mut self, ttl: i64) -> Self {
        self.fields.ttl_secs = ttl;
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.fields.reason = reason.into();
        self
    }

    pub fn outcome(mut self, outcome: &str) -> Self {
        self.fields.outcome = outcome.to_string();
        self
    }

    /// A refused request: outcome `denied`, the refusal as the reason.
    pub fn denied(self, why: impl Into<String>) -> Self {
        self.outcome(DENIED).reason(why)
    }

    pub fn failed(self, why: impl Into<String>) -> Self {
        self.outcome(FAILED).reason(why)
    }

    /// Structured detail (serials, entry ids, what an agent did), stored as JSON.
    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.fields.detail = detail.to_string();
        self
    }

    /// What makes two refusals "the same" for throttling: who, what, on what, and why.
    fn kind_key(&self) -> String {
        let f = &self.fields;
        format!("{}\0{}\0{}\0{}", f.actor, f.action, f.subject, f.reason)
    }

    /// The record standing for `held_back` more events like this one over `seconds`.
    fn summary(&self, held_back: u64, seconds: u64) -> Event {
        let mut event = self.clone();
        event.fields.reason = format!(
            "{} ({held_back} more like it in {seconds} s, recorded once)",
            self.fields.reason
        );
        event.fields.detail =
            serde_json::json!({ "repeated": held_back, "seconds": seconds }).to_string();
        event
    }
}

struct Job {
    events: Vec<AuditFields>,
    issued: Vec<IssuedSvidRecord>,
    acks: Vec<AckUpdate>,
    /// One failed commit fails every job in its group, so they share the error.
    done: Option<oneshot::Sender<Result<i64, Arc<StoreError>>>>,
}

/// The handle every part of the daemon records through. Cloning is cheap.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::UnboundedSender<Job>,
    store: Store,
    clock: Arc<dyn Clock>,
    throttle: Arc<throttle::Throttle>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("the audit record could not be written: {0}")]
    Write(Arc<StoreError>),
    #[error("the audit writer has stopped")]
    Stopped,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Audit {
    /// Starts the writer on `store`.
    pub async fn start(store: Store, clock: Arc<dyn Clock>) -> Result<Self, AuditError> {
        let tail = store.audit_tail().await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(store.clone(), rx, tail));
        let audit = Self {
            tx,
            store,
            clock,
            throttle: Arc::new(throttle::Throttle::new()),
        };
        // Summaries of throttled refusals. The task holds the writer's channel only while
        // it notes them, so the writer still ends with the last handle.
        let weak = audit.tx.downgrade();
        let (store, clock, throttle) = (
            audit.store.clone(),
            audit.clock.clone(),
            audit.throttle.clone(),
        );
        tokio::spawn(async move {
            let mut timer = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                timer.tick().await;
                let Some(tx) = weak.upgrade() else { return };
                Audit {
                    tx,
                    store: store.clone(),
                    clock: clock.clone(),
                    throttle: throttle.clone(),
                }
                .note_summaries();
            }
        });
        Ok(audit)
    }

    fn stamp(&self, event: Event) -> AuditFields {
        let mut fields = event.fields;
        fields.at_ms = unix_ms(self.clock.now());
        fields
    }

    /// Waits until everything noted so far is committed.
    pub async fn flush(&self) -> Result<(), AuditError> {
        self.submit(Vec::new(), Vec::new()).await.map(|_| ())
    }

    /// Appends and waits until the record is committed; returns its sequence number.
    pub async fn record(&self, event: Event) -> Result<i64, AuditError> {
        self.submit(vec![self.stamp(event)], Vec::new()).await
    }

    /// Appends without waiting. The record still lands in order; a write failure is logged.
    pub fn note(&self, event: Event) {
        let _ = self.tx.send(Job {
            events: vec![self.stamp(event)],
            issued: Vec::new(),
            acks: Vec::new(),
            done: None,
        });
    }

    /// Records an agent's acknowledgement of a revocation with its audit record, without
    /// waiting. Losing it in a crash is harmless: the revocation stays pending for the
    /// agent, which applies it again (nothing left to do) and acknowledges again.
    pub fn note_ack(&self, event: Event, ack: AckUpdate) {
        let _ = self.tx.send(Job {
            events: vec![self.stamp(event)],
            issued: Vec::new(),
            acks: vec![ack],
            done: None,
        });
    }

    /// Appends the record of a signing batch together with the serials it issued, in one
    /// transaction, and waits for the commit.
    pub async fn record_issued(
        &self,
        event: Event,
        issued: Vec<IssuedSvidRecord>,
    ) -> Result<i64, AuditError> {
        self.submit(vec![self.stamp(event)], issued).await
    }

    async fn submit(
        &self,
        events: Vec<AuditFields>,
        issued: Vec<IssuedSvidRecord>,
    ) -> Result<i64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job {
                events,
                issued,
                acks: Vec::new(),
                done: Some(done),
            })
            .map_err(|_| AuditError::Stopped)?;
        wait.await
            .map_err(|_| AuditError::Stopped)?
            .map_err(AuditError::Write)
    }

    pub async fn list(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>, AuditError> {
        Ok(self.store.list_audit(filter).await?)
    }

    /// Walks the whole chain; see [`verify_rows`].
    pub async fn verify(&self) -> Result<Verification, AuditError> {
        let mut check = ChainCheck::default();
        let mut after = 0;
        loop {
            let page = self
                .store
                .list_audit(&AuditFilter {
                    after_seq: after,
                    limit: 5000,
                    ..AuditFilter::default()
                })
                .await?;
            let Some(last) = page.last() else {
                break;
            };
            after = last.seq;
            for row in &page {
                if !check.push(row) {
                    return Ok(check.finish());
                }
            }
        }
        Ok(check.finish())
    }
}

async fn writer(store: Store, mut rx: mpsc::UnboundedReceiver<Job>, mut tail: ChainTail) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let events: Vec<AuditFields> = jobs.iter().flat_map(|j| j.events.clone()).collect();
        let issued: Vec<IssuedSvidRecord> = jobs.iter().flat_map(|j| j.issued.clone()).collect();
        let acks: Vec<AckUpdate> = jobs.iter().flat_map(|j| j.acks.clone()).collect();
        let mut result = store
            .append_audit(&events, &issued, &acks, Some(&tail), record_hash)
            .await;
        if result.is_err() {
            // Another writer may have moved the tail (a daemon sharing a SQLite file, or a
            // transient error): read it again and try once more.
            result = store
                .append_audit(&events, &issued, &acks, None, record_hash)
                .await;
        }
        match result {
            Ok(new_tail) => {
                // Each job learns the seq of its last record.
                let mut seq = new_tail.0 - events.len() as i64;
                for job in jobs {
                    seq += job.events.len() as i64;
                    if let Some(done) = job.done {
                        let _ = done.send(Ok(seq));
                    }
                }
                tail = new_tail;
            }
            Err(e) => {
                tracing::error!(error = %e, records = events.len(), "could not append to the audit log");
                let e = Arc::new(e);
                for job in jobs {
                    if let Some(done) = job.done {
                        let _ = done.send(Err(e.clone()));
                    }
                }
                if let Ok(t) = store.audit_tail().await {
                    tail = t;
                }
            }
        }
    }
}

/// The hash of record `seq` chained onto `prev_hash`: SHA-256 over a version tag, the
/// position, the previous hash and every field, each length-prefixed so no two different
/// records encode alike.
pub fn record_hash(seq: i64, prev_hash: &str, fields: &AuditFields) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"mayfly-audit-v1\0");
    ctx.update(&seq.to_be_bytes());
    ctx.update(&fields.at_ms.to_be_bytes());
    ctx.update(&fields.ttl_secs.to_be_bytes());
    for text in [
        prev_hash,
        &fields.actor,
        &fields.action,
        &fields.subject,
        &fields.scope,
        &fields.reason,
        &fields.outcome,
        &fields.detail,
    ] {
        ctx.update(&(text.len() as u64).to_be_bytes());
        ctx.update(text.as_bytes());
    }
    hex::encode(ctx.finish())
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Records checked and found good.
    pub good: i64,
    /// The last good record's seq and hash: note it down, and a later verify that ends
    /// before it shows the log was cut short.
    pub head: ChainTail,
    /// The first bad record and what is wrong with it.
    pub first_bad: Option<(i64, String)>,
}

/// Checks records one by one, in seq order.
#[derive(Debug)]
pub struct ChainCheck {
    expected_seq: i64,
    prev_hash: String,
    good: i64,
    first_bad: Option<(i64, String)>,
}

impl Default for ChainCheck {
    fn default() -> Self {
        Self {
            expected_seq: 1,
            prev_hash: GENESIS_HASH.to_string(),
            good: 0,
            first_bad: None,
        }
    }
}

impl ChainCheck {
    /// Checks the next row; false (with the problem recorded) at the first bad one.
    pub fn push(&mut self, row: &AuditRow) -> bool {
        let problem = if row.seq > self.expected_seq {
            Some(if self.expected_seq + 1 == row.seq {
                format!("record {} is missing: it was deleted", self.expected_seq)
            } else {
                format!(
                    "records {} to {} are missing: they were deleted",
                    self.expected_seq,
                    row.seq - 1
                )
            })
        } else if row.seq < self.expected_seq {
            Some(format!("record {} appears twice", row.seq))
        } else if row.prev_hash != self.prev_hash {
            Some(if self.expected_seq == 1 {
                "the first record does not start the chain: records before it were removed"
                    .to_string()
            } else {
                format!(
                    "record {} does not chain to record {}: record {} was rewritten or the \
                     records were reordered",
                    row.seq,
                    row.seq - 1,
                    row.seq - 1
                )
            })
        } else if record_hash(row.seq, &row.prev_hash, &fields_of(row)) != row.hash {
            Some(format!(
                "record {} was altered: its contents do not match its hash",
                row.seq
            ))
        } else {
            None
        };
        match problem {
            Some(problem) => {
                let at = if row.seq > self.expected_seq {
                    self.expected_seq
                } else {
                    row.seq
                };
                self.first_bad = Some((at, problem));
                false
            }
            None => {
                self.good += 1;
                self.expected_seq = row.seq + 1;
                self.prev_hash = row.hash.clone();
                true
            }
        }
    }

    pub fn finish(self) -> Verification {
        Verification {
            good: self.good,
            head: (self.expected_seq - 1, self.prev_hash),
            first_bad: self.first_bad,
        }
    }
}

/// Checks a whole chain held in memory (an exported file, a test).
pub fn verify_rows<'a>(rows: impl IntoIterator<Item = &'a AuditRow>) -> Verification {
    let mut check = ChainCheck::default();
    for row in rows {
        if !check.push(row) {
            break;
        }
    }
    check.finish()
}

fn fields_of(row: &AuditRow) -> AuditFields {
    AuditFields {
        at_ms: row.at_ms,
        actor: row.actor.clone(),
        action: row.action.clone(),
        subject: row.subject.clone(),
        scope: row.scope.clone(),
        ttl_secs: row.ttl_secs,
        reason: row.reason.clone(),
        outcome: row.outcome.clone(),
        detail: row.detail.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRow> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let fields = AuditFields {
                    at_ms: 1000 + seq,
                    actor: "uid:0".into(),
                    action: "entry.create".into(),
                    subject: format!("spiffe://example.org/w{seq}"),
                    outcome: OK.into(),
                    ..AuditFields::default()
                };
                let hash = record_hash(seq, &prev, &fields);
                let row = AuditRow {
                    seq,
                    at_ms: fields.at_ms,
                    actor: fields.actor,
                    action: fields.action,
                    subject: fields.subject,
                    scope: fields.scope,
                    ttl_secs: fields.ttl_secs,
                    reason: fields.reason,
                    outcome: fields.outcome,
                    detail: fields.detail,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                row
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let rows = chain(5);
        let v = verify_rows(&rows);
        assert_eq!(v.first_bad, None);
        assert_eq!(v.good, 5);
        assert_eq!(v.head, (5, rows[4].hash.clone()));
    }

    #[test]
    fn an_edit_is_found_at_its_row() {
        let mut rows = chain(5);
        rows[2].outcome = "denied".into();
        let v = verify_rows(&rows);
        assert_eq!(v.good, 2);
        let (at, why) = v.first_bad.unwrap();
        assert_eq!(at, 3);
        assert!(why.contains("altered"), "{why}");
    }

    #[test]
    fn a_rehashed_edit_breaks_the_next_link() {
        let mut rows = chain(5);
        rows[2].subject = "forged".into();
        rows[2].hash = record_hash(3, &rows[2].prev_hash.clone(), &fields_of(&rows[2]));
        let (at, why) = verify_rows(&rows).first_bad.unwrap();
        assert_eq!(at, 4);
        assert!(why.contains("record 3 was rewritten"), "{why}");
    }

    #[test]
    fn deletions_and_reordering_are_found() {
        let mut rows = chain(5);
        rows.remove(1);
        let (at, why) = verify_rows(&rows).first_bad.unwrap();
        assert_eq!(at, 2);
        assert!(why.contains("record 2 is missing"), "{why}");

        let mut rows = chain(5);
        // Swap the contents of rows 2 and 3 but keep their positions.
        let (a, b) = (rows[1].clone(), rows[2].clone());
        rows[1] = AuditRow { seq: 2, ..b };
        rows[2] = AuditRow { seq: 3, ..a };
        assert_eq!(verify_rows(&rows).first_bad.unwrap().0, 2);

        let mut rows = chain(3);
        rows.remove(0);
        let (at, why) = verify_rows(&rows).first_bad.unwrap();
        assert_eq!(at, 1);
        assert!(why.contains("record 1 is missing"), "{why}");
    }

    #[test]
    fn fields_are_length_prefixed() {
        let a = AuditFields {
            actor: "ab".into(),
            action: "c".into(),
            ..AuditFields::default()
        };
        let b = AuditFields {
            actor: "a".into(),
            action: "bc".into(),
            ..AuditFields::default()
        };
        assert_ne!(
            record_hash(1, GENESIS_HASH, &a),
            record_hash(1, GENESIS_HASH, &b)
        );
    }
}
