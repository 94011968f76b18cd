//! The tamper-evident audit trail: one record per security-relevant event, each hashed
//! onto the one before it (SHA-256), so that `mayflyd audit verify` finds the first record
//! that was edited, deleted or moved.
//!
//! Records go through one writer that commits whatever has queued up in one transaction
//! (group commit): `record` waits for the commit, `note` does not, and both keep the order
//! in which they were called. On a SQLite file the writer is a thread with a connection of
//! its own ([`AuditAppender`]); on PostgreSQL, a task on the pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

use mayfly_common::clock::unix_ms;

use crate::identity::Clock;
use crate::store::{
    AckUpdate, AuditAppender, AuditFields, AuditFilter, AuditRow, ChainTail, IssuedSvidRecord,
    Store, StoreError,
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

/// The answer to one job: the seq of its last record, or the error its group failed
/// with (one failed commit fails every job in it, so they share the error).
type Answer = Result<i64, AuditError>;

/// What the writer calls with a job's [`Answer`] once its commit is done.
type Then = Box<dyn FnOnce(Answer) + Send>;

struct Job {
    events: Vec<AuditFields>,
    issued: Vec<IssuedSvidRecord>,
    acks: Vec<AckUpdate>,
    done: Option<Then>,
}

/// What the writer is asked to do.
enum Work {
    Append(Job),
    /// Move what signing recorded into its indexes ([`Store::index_recent`]), between two
    /// group commits: on SQLite a second writer would hold the write lock while the
    /// writer's commit waits in SQLite's busy handler, which sleeps in steps of up to 100 ms.
    Index,
}

/// The handle every part of the daemon records through. Cloning is cheap.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::UnboundedSender<Work>,
    store: Store,
    clock: Arc<dyn Clock>,
    throttle: Arc<throttle::Throttle>,
    /// Records being made for the writer right now (a signing batch on a signing thread):
    /// a commit that would go without them waits a moment for them (see `thread_writer`).
    coming: Arc<Arrivals>,
}

/// The signing batches on their way to the writer, counted by the generation they began
/// in. Before a commit the writer starts a new generation and waits (at most
/// [`COMMIT_WAIT`]) for the one before it: the batches already being signed, which come
/// within a signature's time, and not those begun while it waits, which would keep it
/// waiting under a steady load.
#[derive(Default)]
struct Arrivals {
    counts: [AtomicUsize; 2],
    /// The generation new batches join (0 or 1).
    current: AtomicUsize,
    /// The writer's thread, woken when a generation has all arrived.
    writer: OnceLock<std::thread::Thread>,
}

impl Arrivals {
    /// Counts a batch in the current generation until the [`Coming`] is dropped.
    fn begin(self: &Arc<Self>) -> Coming {
        let generation = self.current.load(Ordering::Acquire);
        self.counts[generation].fetch_add(1, Ordering::AcqRel);
        Coming {
            arrivals: self.clone(),
            generation,
        }
    }

    /// Starts a new generation; the one to wait for.
    fn turn(&self) -> usize {
        self.current.fetch_xor(1, Ordering::AcqRel)
    }

    fn arrived(&self, generation: usize) -> bool {
        self.counts[generation].load(Ordering::Acquire) == 0
    }

    #[cfg(test)]
    fn outstanding(&self) -> usize {
        self.counts.iter().map(|c| c.load(Ordering::Acquire)).sum()
    }
}

/// A record on its way to the writer ([`Audit::expect`]); dropped once it is queued, or
/// when it will not come.
pub struct Coming {
    arrivals: Arc<Arrivals>,
    generation: usize,
}

impl Drop for Coming {
    fn drop(&mut self) {
        let left = self.arrivals.counts[self.generation].fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0
            && let Some(writer) = self.arrivals.writer.get()
        {
            // Costs a system call only when the writer is parked, waiting.
            writer.unpark();
        }
    }
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
        let coming = Arc::new(Arrivals::default());
        match store.audit_appender()? {
            Some(appender) => {
                let thread = std::thread::Builder::new()
                    .name("mayfly-audit".into())
                    .spawn({
                        let coming = coming.clone();
                        move || thread_writer(appender, rx, tail, &coming)
                    })
                    .map_err(|e| StoreError::Io {
                        what: "the audit writer's thread",
                        detail: e.to_string(),
                    })?;
                let _ = coming.writer.set(thread.thread().clone());
            }
            None => {
                tokio::spawn(writer(store.clone(), rx, tail));
            }
        }
        let audit = Self {
            tx,
            store,
            clock,
            throttle: Arc::new(throttle::Throttle::new()),
            coming,
        };
        // Once a second: summaries of throttled refusals, and the move of what signing
        // recorded into its indexes. The task holds the writer's channel only while it
        // sends them, so the writer still ends with the last handle.
        let weak = audit.tx.downgrade();
        let (store, clock, throttle, coming) = (
            audit.store.clone(),
            audit.clock.clone(),
            audit.throttle.clone(),
            audit.coming.clone(),
        );
        tokio::spawn(async move {
            let mut timer = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                timer.tick().await;
                let Some(tx) = weak.upgrade() else { return };
                let _ = tx.send(Work::Index);
                Audit {
                    tx,
                    store: store.clone(),
                    clock: clock.clone(),
                    throttle: throttle.clone(),
                    coming: coming.clone(),
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

    /// Says that a record is being made for the writer (a signing batch being signed), until
    /// the returned [`Coming`] is dropped.
    pub fn expect(&self) -> Coming {
        self.coming.begin()
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
        let _ = self.tx.send(Work::Append(Job {
            events: vec![self.stamp(event)],
            issued: Vec::new(),
            acks: Vec::new(),
            done: None,
        }));
    }

    /// Records an agent's acknowledgement of a revocation with its audit record, without
    /// waiting. Losing it in a crash is harmless: the revocation stays pending for the
    /// agent, which applies it again (nothing left to do) and acknowledges again.
    pub fn note_ack(&self, event: Event, ack: AckUpdate) {
        let _ = self.tx.send(Work::Append(Job {
            events: vec![self.stamp(event)],
            issued: Vec::new(),
            acks: vec![ack],
            done: None,
        }));
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

    /// [`Audit::record_issued`] without waiting: the records are queued at once, and the
    /// writer calls `then` with the commit's outcome (or it is called at once if the
    /// writer has stopped). A signing thread hands its answer to the writer this way, and
    /// the call waiting for it wakes once, when its SVIDs may leave.
    pub fn queue_issued_then(
        &self,
        event: Event,
        issued: Vec<IssuedSvidRecord>,
        then: impl FnOnce(Result<i64, AuditError>) + Send + 'static,
    ) {
        self.queue_job(vec![self.stamp(event)], issued, Box::new(then));
    }

    async fn submit(
        &self,
        events: Vec<AuditFields>,
        issued: Vec<IssuedSvidRecord>,
    ) -> Result<i64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.queue_job(
            events,
            issued,
            Box::new(move |answer| {
                let _ = done.send(answer);
            }),
        );
        wait.await.map_err(|_| AuditError::Stopped)?
    }

    fn queue_job(&self, events: Vec<AuditFields>, issued: Vec<IssuedSvidRecord>, then: Then) {
        let job = Job {
            events,
            issued,
            acks: Vec::new(),
            done: Some(then),
        };
        if let Err(mpsc::error::SendError(Work::Append(job))) = self.tx.send(Work::Append(job))
            && let Some(then) = job.done
        {
            then(Err(AuditError::Stopped));
        }
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

/// What the writer takes in one go: the appends queued up (at most [`MAX_GROUP`]), and
/// whether a move into the indexes was asked for meanwhile.
struct Group {
    jobs: Vec<Job>,
    /// How many records each job brought, in order (the rows leave the jobs).
    counts: Vec<usize>,
    events: Vec<AuditFields>,
    issued: Vec<IssuedSvidRecord>,
    acks: Vec<AckUpdate>,
    index: bool,
}

impl Group {
    /// `first` and whatever else is queued right now.
    fn take(first: Work, rx: &mut mpsc::UnboundedReceiver<Work>) -> Group {
        let mut group = Group {
            jobs: Vec::new(),
            counts: Vec::new(),
            events: Vec::new(),
            issued: Vec::new(),
            acks: Vec::new(),
            index: false,
        };
        group.add(first);
        group.take_queued(rx);
        group
    }

    /// Adds whatever is queued right now, up to [`MAX_GROUP`] jobs.
    fn take_queued(&mut self, rx: &mut mpsc::UnboundedReceiver<Work>) {
        while self.jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(work) => self.add(work),
                Err(_) => break,
            }
        }
    }

    fn add(&mut self, work: Work) {
        match work {
            Work::Append(mut job) => {
                self.counts.push(job.events.len());
                self.events.append(&mut job.events);
                self.issued.append(&mut job.issued);
                self.acks.append(&mut job.acks);
                self.jobs.push(job);
            }
            Work::Index => self.index = true,
        }
    }

    /// Tells each job how its commit went; the new tail if it went.
    fn answer(self, result: Result<ChainTail, StoreError>) -> Option<ChainTail> {
        match result {
            Ok(new_tail) => {
                // Each job learns the seq of its last record.
                let mut seq = new_tail.0 - self.events.len() as i64;
                for (job, count) in self.jobs.into_iter().zip(self.counts) {
                    seq += count as i64;
                    if let Some(done) = job.done {
                        done(Ok(seq));
                    }
                }
                Some(new_tail)
            }
            Err(e) => {
                tracing::error!(error = %e, records = self.events.len(), "could not append to the audit log");
                let e = Arc::new(e);
                for job in self.jobs {
                    if let Some(done) = job.done {
                        done(Err(AuditError::Write(e.clone())));
                    }
                }
                None
            }
        }
    }
}

fn indexed(result: Result<(u64, u64), StoreError>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not index the serials and audit records of the last second; they stay readable, and the next try takes them");
    }
}

/// The writer on the pool (PostgreSQL, or SQLite that is not a file).
async fn writer(store: Store, mut rx: mpsc::UnboundedReceiver<Work>, mut tail: ChainTail) {
    while let Some(first) = rx.recv().await {
        let group = Group::take(first, &mut rx);
        let index = group.index;
        if !group.jobs.is_empty() {
            let (events, issued, acks) = (&group.events, &group.issued, &group.acks);
            let mut result = store
                .append_audit(events, issued, acks, Some(&tail), record_hash)
                .await;
            if result.is_err() {
                // Another writer may have moved the tail (a daemon sharing the store, or a
                // transient error): read it again and try once more.
                result = store
                    .append_audit(events, issued, acks, None, record_hash)
                    .await;
            }
            match group.answer(result) {
                Some(new_tail) => tail = new_tail,
                None => {
                    if let Ok(t) = store.audit_tail().await {
                        tail = t;
                    }
                }
            }
        }
        if index {
            indexed(store.index_recent().await);
        }
    }
}

/// The longest a commit waits for signing batches on their way. Measured on two cores
/// (docs/benchmarks.md): without it a batched commit held 1.2 calls and an unbatched one
/// 2.5; 1 ms cut the daemon's CPU a certificate by a tenth to a sixth and lowered p50 and
/// p99, where 2 ms saved no more CPU and signed less.
const COMMIT_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// The writer on its own SQLite connection and thread: [`writer`] without a hop to the
/// pool's connection thread, or sqlx, between a call and its commit.
fn thread_writer(
    mut appender: AuditAppender,
    mut rx: mpsc::UnboundedReceiver<Work>,
    mut tail: ChainTail,
    coming: &Arrivals,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = Group::take(first, &mut rx);
        // Wait for the signing batches already on their way (up to COMMIT_WAIT): each
        // commit costs a sync and its pages' writes whatever it holds, and without the wait
        // most held one batch. Nothing waits when nothing is being signed.
        let deadline = std::time::Instant::now() + COMMIT_WAIT;
        let waiting = coming.turn();
        loop {
            // A batch is queued before its arrival is counted: what has arrived is taken.
            let arrived = coming.arrived(waiting);
            group.take_queued(&mut rx);
            if arrived || group.jobs.len() >= MAX_GROUP {
                break;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            // A batch's `Coming` wakes this thread when its generation has all arrived.
            std::thread::park_timeout(deadline - now);
        }
        let index = group.index;
        if !group.jobs.is_empty() {
            let (events, issued, acks) = (&group.events, &group.issued, &group.acks);
            let mut result = appender.append(events, issued, acks, Some(&tail), record_hash);
            if result.is_err() {
                // As in `writer`: another process on the file may have moved the tail.
                result = appender.append(events, issued, acks, None, record_hash);
            }
            match group.answer(result) {
                Some(new_tail) => tail = new_tail,
                None => {
                    if let Ok(t) = appender.tail() {
                        tail = t;
                    }
                }
            }
        }
        if index {
            indexed(appender.index_recent());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer on a SQLite file of its own (the thread writer), and its store.
    async fn started() -> (tempfile::TempDir, Store, Audit) {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(None, dir.path()).await.unwrap();
        let audit = Audit::start(store.clone(), Arc::new(crate::identity::SystemClock))
            .await
            .unwrap();
        (dir, store, audit)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_waits_for_a_signing_batch_only_while_one_is_coming() {
        let (_dir, store, audit) = started().await;
        let event = |n: i64| Event::new(&Actor::Daemon, "test", format!("r{n}"));

        // A batch that never comes holds nothing up for long: the record commits.
        let coming = audit.expect();
        let seq = tokio::time::timeout(std::time::Duration::from_secs(5), audit.record(event(1)))
            .await
            .expect("committed without the batch")
            .unwrap();
        assert_eq!(seq, 1);

        // One that does come is committed, in the order the records were queued, and the
        // count of what is coming goes back to nothing when its guard goes.
        let (done, committed) = oneshot::channel();
        audit.queue_issued_then(event(2), Vec::new(), move |answer| {
            let _ = done.send(answer);
        });
        drop(coming);
        assert_eq!(committed.await.unwrap().unwrap(), 2);
        assert_eq!(audit.coming.outstanding(), 0);
        // A signing thread that fails (or panics) drops its guard without queueing.
        let failed = std::thread::spawn({
            let coming = audit.expect();
            move || {
                let _coming = coming;
                panic!("signing failed");
            }
        });
        assert!(failed.join().is_err());
        assert_eq!(audit.coming.outstanding(), 0);
        assert_eq!(audit.record(event(3)).await.unwrap(), 3);
        let rows = store.list_audit(&AuditFilter::default()).await.unwrap();
        let subjects: Vec<&str> = rows.iter().map(|r| r.subject.as_str()).collect();
        assert_eq!(subjects, ["r1", "r2", "r3"]);
    }

    #[test]
    fn a_commit_waits_for_the_batches_begun_before_it_not_after() {
        let arrivals = Arc::new(Arrivals::default());
        let before = arrivals.begin();
        let waiting = arrivals.turn();
        assert!(!arrivals.arrived(waiting));
        // Begun while the writer waits: counted, but not waited for.
        let after = arrivals.begin();
        drop(before);
        assert!(arrivals.arrived(waiting));
        assert_eq!(arrivals.outstanding(), 1);
        // The next commit waits for it.
        let next = arrivals.turn();
        assert_ne!(next, waiting);
        assert!(!arrivals.arrived(next));
        drop(after);
        assert!(arrivals.arrived(next));
        assert_eq!(arrivals.outstanding(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queued_batch_answers_through_its_callback_after_the_commit() {
        let (_dir, store, audit) = started().await;
        let (tx, rx) = oneshot::channel();
        audit.queue_issued_then(
            Event::new(&Actor::Daemon, "svid.sign", "batch"),
            Vec::new(),
            move |answer| {
                let _ = tx.send(answer);
            },
        );
        let seq = rx.await.expect("answered").expect("committed");
        assert_eq!(seq, 1);
        // Answered only once the record is committed: it is there to read.
        let rows = store.list_audit(&AuditFilter::default()).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].subject, "batch");
    }
}
