-- The audit trail and revocation. Keep in step with the other backend's 0004 file.

-- Append-only, one row per event. seq counts from 1 without gaps; hash is the SHA-256 of
-- the row's fields and prev_hash (the hash of row seq-1; 64 zeros for the first), so an
-- edited, deleted or reordered row breaks the chain where it happened. Times: unix ms.
CREATE TABLE audit_log (
    seq         INTEGER NOT NULL PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    actor       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    scope       TEXT    NOT NULL,
    ttl_secs    INTEGER NOT NULL,
    reason      TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,
    detail      TEXT    NOT NULL,
    prev_hash   TEXT    NOT NULL,
    hash        TEXT    NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at_ms);
CREATE INDEX audit_log_subject ON audit_log (subject);

-- Every workload SVID signed, so a revocation can name the serials an entry or an agent
-- holds. Rows go once the certificate has expired. Times: unix seconds.
CREATE TABLE issued_svids (
    serial      TEXT    NOT NULL PRIMARY KEY,
    entry_id    TEXT    NOT NULL,
    spiffe_id   TEXT    NOT NULL,
    agent_id    TEXT    NOT NULL,
    ca_slot     TEXT    NOT NULL,
    issued_at   INTEGER NOT NULL,
    not_after   INTEGER NOT NULL
);
CREATE INDEX issued_svids_entry ON issued_svids (entry_id);
CREATE INDEX issued_svids_agent ON issued_svids (agent_id);
CREATE INDEX issued_svids_not_after ON issued_svids (not_after);

-- One row per operator revocation. detail is JSON: the entries, SPIFFE IDs and secrets it
-- covered. created_at: unix ms.
CREATE TABLE revocations (
    id          TEXT    NOT NULL PRIMARY KEY,
    kind        TEXT    NOT NULL,
    target      TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    actor       TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    detail      TEXT    NOT NULL
);

-- The deny list: revoked serials, kept until the certificate would have expired anyway
-- (not_after, unix seconds).
CREATE TABLE revoked_serials (
    serial          TEXT    NOT NULL PRIMARY KEY,
    not_after       INTEGER NOT NULL,
    revocation_id   TEXT    NOT NULL REFERENCES revocations (id)
);
CREATE INDEX revoked_serials_not_after ON revoked_serials (not_after);

-- Which agents a revocation reached: acked_at (unix ms) stays NULL until the agent says
-- what it did (detail, JSON). An agent that reconnects gets its unacknowledged ones first.
CREATE TABLE revocation_acks (
    revocation_id   TEXT    NOT NULL REFERENCES revocations (id),
    agent_id        TEXT    NOT NULL,
    acked_at        INTEGER,
    detail          TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (revocation_id, agent_id)
);
CREATE INDEX revocation_acks_agent ON revocation_acks (agent_id);
