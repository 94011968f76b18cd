//! Checking the hash chain: which record is the first that cannot be trusted, and why.
//!
//! A record's hash covers its seq, its fields and the previous record's hash, so each record
//! is checked three ways: its seq follows the one before, its hash fits its contents, and its
//! `prev_hash` is the hash of the record before it. Anyone who can write to the store can
//! recompute a hash, so a broken link alone does not say which side was changed: the record
//! after the break is believed only when the record after *it*, or a head kept elsewhere,
//! holds its hash. A head kept elsewhere is also the only thing that shows a tail deleted and
//! written again, since the new tail chains as well as the old one did.

use std::fmt;
use std::io::BufRead;
use std::str::FromStr;

use aws_lc_rs::digest;

use crate::store::{AuditFields, AuditRow, ChainTail, GENESIS_HASH};

/// How far from its place a row whose hash does not fit is looked for, to tell a swapped or
/// renumbered row from an edited one. Done once, for the first bad record only.
const MOVED_WINDOW: i64 = 1024;

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

/// A record noted down away from the store, written `SEQ:HASH` as `audit verify` prints it:
/// the chain must still hold that record with that hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    seq: i64,
    hash: String,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeadError {
    #[error("a head is written SEQ:HASH, as `audit verify` prints it, not {0:?}")]
    Form(String),
    #[error("a head's seq is a record number (0 for an empty log), not {0:?}")]
    Seq(String),
    #[error("a head's hash is a SHA-256 in 64 hex digits, not {0:?}")]
    Hash(String),
    #[error("the head of an empty log (seq 0) is the genesis hash, all zeros")]
    EmptyLog,
}

impl AuditHead {
    pub fn new(seq: i64, hash: &str) -> Result<Self, HeadError> {
        if seq < 0 {
            return Err(HeadError::Seq(seq.to_string()));
        }
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(HeadError::Hash(hash.to_string()));
        }
        let hash = hash.to_ascii_lowercase();
        if seq == 0 && hash != GENESIS_HASH {
            return Err(HeadError::EmptyLog);
        }
        Ok(Self { seq, hash })
    }

    pub fn seq(&self) -> i64 {
        self.seq
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }
}

impl FromStr for AuditHead {
    type Err = HeadError;

    fn from_str(text: &str) -> Result<Self, HeadError> {
        let (seq, hash) = text
            .trim()
            .split_once(':')
            .ok_or_else(|| HeadError::Form(text.to_string()))?;
        let seq = seq.parse().map_err(|_| HeadError::Seq(seq.to_string()))?;
        Self::new(seq, hash)
    }
}

impl fmt::Display for AuditHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// What is wrong with the first record that cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Records `first..=last` are not there.
    Missing { first: i64, last: i64 },
    /// A record comes again, or before one it should follow (lines of an export moved).
    OutOfOrder { seq: i64, after: i64 },
    /// The record's contents do not match its hash.
    Altered { seq: i64 },
    /// The record's hash fits its contents at another seq: rows swapped or renumbered.
    Moved { seq: i64, written_as: i64 },
    /// The record matches its own hash, but the record after it, which is itself vouched
    /// for, holds another hash for it: it was edited and its hash recomputed.
    Rehashed { seq: i64 },
    /// The record after this one does not chain to it, and nothing later says which of the
    /// two was changed.
    Unlinked { seq: i64 },
    /// The record matches its own hash, but it neither chains to the record before it nor
    /// is held by the record after it.
    Rewritten { seq: i64 },
    /// Record 1 does not chain to the genesis hash.
    BadStart,
    /// The record at the head's seq has another hash than the head.
    NotHead {
        seq: i64,
        found: String,
        expected: String,
    },
    /// The log ends before the head.
    CutShort { last: i64, head: i64 },
}

impl Fault {
    /// The record named: the first that cannot be trusted.
    pub fn seq(&self) -> i64 {
        match self {
            Fault::Missing { first: seq, .. }
            | Fault::OutOfOrder { seq, .. }
            | Fault::Altered { seq }
            | Fault::Moved { seq, .. }
            | Fault::Rehashed { seq }
            | Fault::Unlinked { seq }
            | Fault::Rewritten { seq }
            | Fault::NotHead { seq, .. } => *seq,
            Fault::BadStart => 1,
            Fault::CutShort { last, .. } => last + 1,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Missing { first, last } if first == last => {
                write!(f, "record {first} is missing: it was deleted")
            }
            Fault::Missing { first, last } => {
                write!(
                    f,
                    "records {first} to {last} are missing: they were deleted"
                )
            }
            Fault::OutOfOrder { seq, after } => write!(
                f,
                "record {seq} appears after record {after}: records are repeated or out of \
                 order"
            ),
            Fault::Altered { seq } => write!(
                f,
                "record {seq} was altered: its contents do not match its hash"
            ),
            Fault::Moved { seq, written_as } => write!(
                f,
                "record {seq} is out of order: the row at {seq} was written as record \
                 {written_as}, so records were swapped or renumbered"
            ),
            Fault::Rehashed { seq } => write!(
                f,
                "record {seq} was altered and its hash recomputed: record {} holds a \
                 different hash for it",
                seq + 1
            ),
            Fault::Unlinked { seq } => write!(
                f,
                "record {next} does not chain to record {seq}: record {seq} was altered and \
                 its hash recomputed, or record {next} was rewritten (a head noted at record \
                 {next} or later tells which)",
                next = seq + 1
            ),
            Fault::Rewritten { seq } => write!(
                f,
                "record {seq} was rewritten with its hash recomputed: it does not chain to \
                 record {}, and record {} holds a different hash for it",
                seq - 1,
                seq + 1
            ),
            Fault::BadStart => f.write_str(
                "record 1 does not start the chain: its prev_hash is not the genesis hash, so \
                 records before it were removed or it was rewritten",
            ),
            Fault::NotHead {
                seq,
                found,
                expected,
            } => write!(
                f,
                "record {seq} has hash {found}, not the head's {expected}: the log was \
                 rewritten at or before record {seq}"
            ),
            Fault::CutShort { last: 0, head } => write!(
                f,
                "the log is empty, but the head given is record {head}: every record was \
                 deleted"
            ),
            Fault::CutShort { last, head } => write!(
                f,
                "the log ends at record {last}, before the head given (record {head}): the \
                 records after {last} were deleted"
            ),
        }
    }
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Records checked and found good.
    pub good: i64,
    /// The last good record's seq and hash: note it down, and pass it to a later verify
    /// with `--head`.
    pub head: ChainTail,
    /// The first record that cannot be trusted, and why.
    pub first_bad: Option<Fault>,
}

/// Checks records one by one, in seq order.
#[derive(Debug)]
pub struct ChainCheck {
    head: Option<AuditHead>,
    /// The seq the next row must have.
    expected_seq: i64,
    /// The hashes of the last trusted record and of the one before it: a broken link
    /// found later may take the last one back.
    prev_hash: String,
    before_prev_hash: String,
    /// A row that matches its hash but does not chain to the row before: the next row
    /// says which of the two was changed.
    suspect: Option<AuditRow>,
    failed: Option<(Fault, ChainTail)>,
}

impl ChainCheck {
    /// A check that also requires the chain to hold `head`.
    pub fn new(head: Option<AuditHead>) -> Self {
        Self {
            head,
            expected_seq: 1,
            prev_hash: GENESIS_HASH.to_string(),
            before_prev_hash: GENESIS_HASH.to_string(),
            suspect: None,
            failed: None,
        }
    }

    /// Checks the next row; false once the first bad record is known.
    pub fn push(&mut self, row: &AuditRow) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if let Some(suspect) = self.suspect.take() {
            let holds = (row.seq == suspect.seq + 1 && hash_fits(row))
                .then(|| row.prev_hash == suspect.hash);
            self.blame_link(&suspect, holds);
            return false;
        }
        if row.seq != self.expected_seq {
            let fault = if row.seq > self.expected_seq {
                Fault::Missing {
                    first: self.expected_seq,
                    last: row.seq - 1,
                }
            } else {
                Fault::OutOfOrder {
                    seq: row.seq,
                    after: self.expected_seq - 1,
                }
            };
            self.fail(fault, self.last_trusted());
            return false;
        }
        if !hash_fits(row) {
            let fault = match moved_from(row) {
                Some(written_as) => Fault::Moved {
                    seq: row.seq,
                    written_as,
                },
                None => Fault::Altered { seq: row.seq },
            };
            self.fail(fault, self.last_trusted());
            return false;
        }
        let at_head = self.head.as_ref().filter(|h| h.seq == row.seq);
        if let Some(head) = at_head
            && head.hash != row.hash
        {
            let fault = Fault::NotHead {
                seq: row.seq,
                found: row.hash.clone(),
                expected: head.hash.clone(),
            };
            self.fail(fault, self.last_trusted());
            return false;
        }
        if row.prev_hash != self.prev_hash {
            if at_head.is_some() {
                // The head vouches for this row, so the row before it is the changed one.
                self.blame_link(row, Some(true));
                return false;
            }
            self.suspect = Some(row.clone());
            return true;
        }
        self.before_prev_hash = std::mem::replace(&mut self.prev_hash, row.hash.clone());
        self.expected_seq = row.seq + 1;
        true
    }

    pub fn finish(mut self) -> Verification {
        if let Some(suspect) = self.suspect.take() {
            self.blame_link(&suspect, None);
        }
        if self.failed.is_none()
            && let Some(head) = &self.head
            && head.seq >= self.expected_seq
        {
            let fault = Fault::CutShort {
                last: self.expected_seq - 1,
                head: head.seq,
            };
            self.fail(fault, self.last_trusted());
        }
        let (first_bad, head) = match self.failed.take() {
            Some((fault, head)) => (Some(fault), head),
            None => (None, self.last_trusted()),
        };
        Verification {
            good: head.0,
            head,
            first_bad,
        }
    }

    /// `row` matches its hash but not the previous record's: `holds` says whether the next
    /// record (or the head) holds `row`'s hash, when that can be told.
    fn blame_link(&mut self, row: &AuditRow, holds: Option<bool>) {
        let before_last = (row.seq - 2, self.before_prev_hash.clone());
        match holds {
            _ if row.seq == 1 => self.fail(Fault::BadStart, (0, GENESIS_HASH.to_string())),
            Some(true) => self.fail(Fault::Rehashed { seq: row.seq - 1 }, before_last),
            Some(false) => self.fail(Fault::Rewritten { seq: row.seq }, self.last_trusted()),
            None => self.fail(Fault::Unlinked { seq: row.seq - 1 }, before_last),
        }
    }

    fn last_trusted(&self) -> ChainTail {
        (self.expected_seq - 1, self.prev_hash.clone())
    }

    fn fail(&mut self, fault: Fault, last_good: ChainTail) {
        self.failed = Some((fault, last_good));
    }
}

/// Checks a whole chain held in memory (a test, a small export).
pub fn verify_rows<'a>(
    rows: impl IntoIterator<Item = &'a AuditRow>,
    head: Option<&AuditHead>,
) -> Verification {
    let mut check = ChainCheck::new(head.cloned());
    for row in rows {
        if !check.push(row) {
            break;
        }
    }
    check.finish()
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    #[error("the export could not be read: {0}")]
    Read(#[from] std::io::Error),
    #[error("line {line} of the export is not an audit record: {error}")]
    Line {
        line: usize,
        error: serde_json::Error,
    },
}

/// Checks an export written by `audit export` (one JSON record a line, in seq order)
/// without a daemon, reading it line by line.
pub fn verify_export(
    reader: impl BufRead,
    head: Option<&AuditHead>,
) -> Result<Verification, ExportError> {
    let mut check = ChainCheck::new(head.cloned());
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let row: AuditRow = serde_json::from_str(&line)
            .map_err(|error| ExportError::Line { line: n + 1, error })?;
        if !check.push(&row) {
            break;
        }
    }
    Ok(check.finish())
}

fn hash_fits(row: &AuditRow) -> bool {
    record_hash(row.seq, &row.prev_hash, &fields_of(row)) == row.hash
}

/// The seq near `row`'s at which its hash would fit, if there is one.
fn moved_from(row: &AuditRow) -> Option<i64> {
    let fields = fields_of(row);
    ((row.seq - MOVED_WINDOW).max(1)..=row.seq + MOVED_WINDOW)
        .filter(|&seq| seq != row.seq)
        .find(|&seq| record_hash(seq, &row.prev_hash, &fields) == row.hash)
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
    use crate::audit::OK;

    fn chain(n: i64) -> Vec<AuditRow> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let row = row_after(seq, &prev, &format!("spiffe://example.org/w{seq}"));
                prev = row.hash.clone();
                row
            })
            .collect()
    }

    /// A record at `seq` chained onto `prev`, hashed as the writer would.
    fn row_after(seq: i64, prev: &str, subject: &str) -> AuditRow {
        let fields = AuditFields {
            at_ms: 1000 + seq,
            actor: "uid:0".into(),
            action: "entry.create".into(),
            subject: subject.into(),
            outcome: OK.into(),
            ..AuditFields::default()
        };
        AuditRow {
            seq,
            hash: record_hash(seq, prev, &fields),
            at_ms: fields.at_ms,
            actor: fields.actor,
            action: fields.action,
            subject: fields.subject,
            scope: fields.scope,
            ttl_secs: fields.ttl_secs,
            reason: fields.reason,
            outcome: fields.outcome,
            detail: fields.detail,
            prev_hash: prev.to_string(),
        }
    }

    /// Recomputes `row`'s hash over what it now holds, as a forger with store access would.
    fn rehash(row: &mut AuditRow) {
        row.hash = record_hash(row.seq, &row.prev_hash, &fields_of(row));
    }

    fn head_of(row: &AuditRow) -> AuditHead {
        AuditHead::new(row.seq, &row.hash).unwrap()
    }

    fn first_bad(rows: &[AuditRow], head: Option<&AuditHead>) -> Fault {
        verify_rows(rows, head)
            .first_bad
            .expect("the tampering is found")
    }

    #[test]
    fn an_intact_chain_verifies() {
        let rows = chain(5);
        let v = verify_rows(&rows, None);
        assert_eq!(v.first_bad, None);
        assert_eq!(v.good, 5);
        assert_eq!(v.head, (5, rows[4].hash.clone()));
        // Held against its own head, or one noted earlier, it still verifies.
        for at in [0, 2, 4] {
            let v = verify_rows(&rows, Some(&head_of(&rows[at])));
            assert_eq!(v.first_bad, None, "head at {}", at + 1);
            assert_eq!(v.good, 5);
        }
        let empty = AuditHead::new(0, GENESIS_HASH).unwrap();
        assert_eq!(verify_rows(&rows, Some(&empty)).first_bad, None);
    }

    #[test]
    fn an_edit_without_a_new_hash_names_that_record() {
        let mut rows = chain(6);
        rows[2].subject = "forged".into();
        let v = verify_rows(&rows, None);
        assert_eq!(v.first_bad, Some(Fault::Altered { seq: 3 }));
        assert_eq!((v.good, v.head), (2, (2, rows[1].hash.clone())));
        assert!(
            Fault::Altered { seq: 3 }
                .to_string()
                .starts_with("record 3 was altered")
        );
    }

    #[test]
    fn an_edit_with_a_recomputed_hash_names_that_record_not_the_next() {
        let mut rows = chain(6);
        rows[2].subject = "forged".into();
        rehash(&mut rows[2]);
        let v = verify_rows(&rows, None);
        assert_eq!(v.first_bad, Some(Fault::Rehashed { seq: 3 }));
        // Record 3 matched its own hash, but is not trusted: the head goes back to 2.
        assert_eq!((v.good, v.head), (2, (2, rows[1].hash.clone())));
        let why = v.first_bad.unwrap().to_string();
        assert!(
            why.starts_with("record 3 was altered and its hash recomputed"),
            "{why}"
        );

        // The next-to-last record: the head noted at the last one vouches for it.
        let mut rows = chain(6);
        let last = head_of(&rows[5]);
        rows[4].reason = "forged".into();
        rehash(&mut rows[4]);
        assert_eq!(first_bad(&rows, Some(&last)), Fault::Rehashed { seq: 5 });
        // Without it, record 6 might be the rewritten one: the earlier of the two is named.
        assert_eq!(first_bad(&rows, None), Fault::Unlinked { seq: 5 });

        // The last record: nothing in the log can tell, the head can.
        let mut rows = chain(6);
        let last = head_of(&rows[5]);
        rows[5].outcome = "denied".into();
        rehash(&mut rows[5]);
        assert_eq!(verify_rows(&rows, None).first_bad, None);
        assert!(matches!(
            first_bad(&rows, Some(&last)),
            Fault::NotHead { seq: 6, .. }
        ));
    }

    #[test]
    fn a_record_relinked_and_rehashed_is_named_not_the_one_before() {
        // Its prev_hash changed and its hash recomputed: record 5 no longer holds its hash,
        // so record 4 is the forged one, and record 3 before it is intact.
        let mut rows = chain(6);
        rows[3].prev_hash = rows[0].hash.clone();
        rehash(&mut rows[3]);
        let v = verify_rows(&rows, None);
        assert_eq!(v.first_bad, Some(Fault::Rewritten { seq: 4 }));
        assert_eq!(v.head, (3, rows[2].hash.clone()));
    }

    #[test]
    fn two_swapped_records_name_the_first_of_them() {
        let mut rows = chain(6);
        let (a, b) = (rows[2].clone(), rows[3].clone());
        rows[2] = AuditRow { seq: 3, ..b };
        rows[3] = AuditRow { seq: 4, ..a };
        let v = verify_rows(&rows, None);
        assert_eq!(
            v.first_bad,
            Some(Fault::Moved {
                seq: 3,
                written_as: 4
            })
        );
        assert_eq!(v.head, (2, rows[1].hash.clone()));
        let why = v.first_bad.unwrap().to_string();
        assert!(why.starts_with("record 3 is out of order"), "{why}");
    }

    #[test]
    fn a_deleted_middle_record_is_named() {
        let mut rows = chain(6);
        rows.remove(2);
        let v = verify_rows(&rows, None);
        assert_eq!(v.first_bad, Some(Fault::Missing { first: 3, last: 3 }));
        assert_eq!(v.good, 2);

        let mut rows = chain(6);
        rows.drain(1..4);
        assert_eq!(
            first_bad(&rows, None).to_string(),
            "records 2 to 4 are missing: they were deleted"
        );

        let mut rows = chain(3);
        rows.remove(0);
        assert_eq!(first_bad(&rows, None), Fault::Missing { first: 1, last: 1 });
    }

    #[test]
    fn a_tail_deleted_and_written_again_is_caught_by_the_head() {
        let original = chain(6);
        let noted = head_of(&original[4]);
        // Records 4 to 6 deleted; the daemon, reading the tail again, appends 4 to 7.
        let mut rows = original[..3].to_vec();
        for seq in 4..=7 {
            let prev = rows.last().unwrap().hash.clone();
            rows.push(row_after(seq, &prev, "spiffe://example.org/new"));
        }
        assert_eq!(verify_rows(&rows, None).first_bad, None, "it chains");
        let fault = first_bad(&rows, Some(&noted));
        assert_eq!(
            fault,
            Fault::NotHead {
                seq: 5,
                found: rows[4].hash.clone(),
                expected: original[4].hash.clone(),
            }
        );
        assert!(
            fault.to_string().starts_with("record 5 has hash"),
            "{fault}"
        );

        // Deleted and not written again: the log ends before the head.
        let fault = first_bad(&original[..3], Some(&noted));
        assert_eq!(fault, Fault::CutShort { last: 3, head: 5 });
        assert_eq!(fault.seq(), 4);
    }

    #[test]
    fn a_first_record_off_the_genesis_hash_is_named() {
        let mut rows = chain(3);
        rows[0].prev_hash = rows[2].hash.clone();
        rehash(&mut rows[0]);
        assert_eq!(first_bad(&rows, None), Fault::BadStart);
    }

    #[test]
    fn an_export_is_read_line_by_line() {
        let rows = chain(4);
        let mut export = String::new();
        for row in &rows {
            export.push_str(&serde_json::to_string(row).unwrap());
            export.push('\n');
        }
        let v = verify_export(export.as_bytes(), Some(&head_of(&rows[3]))).unwrap();
        assert_eq!((v.good, v.first_bad), (4, None));

        let edited = export.replacen("spiffe://example.org/w2", "spiffe://example.org/x2", 1);
        let v = verify_export(edited.as_bytes(), None).unwrap();
        assert_eq!(v.first_bad, Some(Fault::Altered { seq: 2 }));

        // Lines moved in the file are records out of order.
        let lines: Vec<&str> = export.lines().collect();
        let moved = [lines[0], lines[2], lines[1], lines[3]].join("\n");
        let v = verify_export(moved.as_bytes(), None).unwrap();
        assert_eq!(v.first_bad, Some(Fault::Missing { first: 2, last: 2 }));
        let repeated = [lines[0], lines[1], lines[1]].join("\n");
        let v = verify_export(repeated.as_bytes(), None).unwrap();
        assert_eq!(v.first_bad, Some(Fault::OutOfOrder { seq: 2, after: 2 }));

        let err = verify_export("{\"seq\": 1}\n".as_bytes(), None).unwrap_err();
        assert!(err.to_string().starts_with("line 1 of the export"), "{err}");
    }

    #[test]
    fn a_head_is_read_as_printed() {
        let head: AuditHead = format!("12:{}", "AB".repeat(32)).parse().unwrap();
        assert_eq!(head.seq(), 12);
        assert_eq!(head.to_string(), format!("12:{}", "ab".repeat(32)));
        for bad in ["12", "x:00", "-1:00", "3:abc", "0:11"] {
            assert!(bad.parse::<AuditHead>().is_err(), "{bad}");
        }
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
