//! The tamper-evident audit trail: one record per security-relevant event, each hashed
//! onto the one before it (SHA-256), so that `mayflyd audit verify` finds the first record
//! that was edited, deleted or moved.
//!
//! Records go through one writer task that commits whatever has queued up in one
//! transaction (group commit): `record` waits for the commit, `note` does not, and both
//! keep the order in which they were called.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use mayfly_common::clock::unix_ms;

use crate::identity::Clock;
use crate::store::{
    AckUpdate, AuditFields, AuditFilter, AuditRow, ChainTail, IssuedSvidRecord, Store, StoreError,
};

mod chain;
mod throttle;

pub use chain::{
    AuditHead, ChainCheck, ExportError, Fault, HeadError, Verification, record_hash, verify_export,
    verify_rows,
};

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

    /// Appends several records in one commit and waits for it; returns the last one's
    /// sequence number.
    pub async fn record_all(&self, events: Vec<Event>) -> Result<i64, AuditError> {
        let events = events.into_iter().map(|e| self.stamp(e)).collect();
        self.submit(events, Vec::new()).await
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

    /// Walks the whole chain, which must hold `head` if one is given; see [`ChainCheck`].
    pub async fn verify(&self, head: Option<AuditHead>) -> Result<Verification, AuditError> {
        let mut check = ChainCheck::new(head);
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

/// How often the writer moves what signing recorded into its indexes
/// ([`Store::index_recent`]).
const INDEX_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

async fn writer(store: Store, mut rx: mpsc::UnboundedReceiver<Job>, mut tail: ChainTail) {
    // The move runs here, between two group commits, rather than from a task of its own:
    // on SQLite a second writer would hold the write lock while this one's commit waits in
    // SQLite's busy handler, which sleeps in steps of up to 100 ms.
    let mut index_timer = tokio::time::interval(INDEX_EVERY);
    index_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
            _ = index_timer.tick() => {
                if let Err(e) = store.index_recent().await {
                    tracing::warn!(error = %e, "could not index the serials and audit records of the last second; they stay readable, and the next try takes them");
                }
                continue;
            }
        };
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
