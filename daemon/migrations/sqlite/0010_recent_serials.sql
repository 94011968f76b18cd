-- Keys that are random per certificate, indexed in batches rather than at every commit.
-- Keep in step with the other backend's 0010 file.
--
-- Signing commits its audit record and serials before it answers. Every index whose key is
-- random per certificate (the entry and agent of a serial, the subject of an audit record)
-- costs that commit a page of its own for every certificate in it, written whole to the
-- write-ahead log: most of what a commit wrote. New serials now go to a table keyed by the
-- serial alone (which starts with the issuing millisecond, so it grows at its end), and the
-- audit log keeps no subject index; the daemon moves them into their indexes about once a
-- second, when one page takes many keys at a time. Readers read both, in one statement.

CREATE TABLE issued_svids_recent (
    serial      TEXT    NOT NULL PRIMARY KEY,
    entry_id    TEXT    NOT NULL,
    spiffe_id   TEXT    NOT NULL,
    agent_id    TEXT    NOT NULL,
    ca_slot     TEXT    NOT NULL,
    issued_at   INTEGER NOT NULL,
    not_after   INTEGER NOT NULL
);

-- The audit log's subjects by seq, up to the mark; rows past it are read from audit_log.
CREATE TABLE audit_subjects (
    subject     TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (subject, seq)
) WITHOUT ROWID;
CREATE TABLE audit_subjects_mark (
    id          INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    seq         INTEGER NOT NULL
);
INSERT INTO audit_subjects (subject, seq) SELECT subject, seq FROM audit_log;
INSERT INTO audit_subjects_mark (id, seq) SELECT 1, COALESCE(MAX(seq), 0) FROM audit_log;
DROP INDEX audit_log_subject;
