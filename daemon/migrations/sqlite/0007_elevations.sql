-- Just-in-time elevations, their reviews, and the leases issued under them. Keep in step
-- with the other backend's 0007 file. Times are unix seconds; flags are 0 or 1.

CREATE TABLE elevations (
    id              TEXT    NOT NULL PRIMARY KEY,
    -- "uid:1000" for an operator, the SPIFFE ID for a workload.
    requester       TEXT    NOT NULL,
    -- The operator's user name, or the workload's agent: what the record shows.
    requester_name  TEXT    NOT NULL,
    -- operator, workload or ai_agent
    requester_kind  TEXT    NOT NULL,
    -- The agent that asked for a workload; "" for an operator.
    agent_id        TEXT    NOT NULL,
    -- credential (the scope kinds to come: secret, entry)
    scope_kind      TEXT    NOT NULL,
    scope_name      TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    ticket          TEXT    NOT NULL,
    requested_ttl   INTEGER  NOT NULL,
    break_glass     INTEGER  NOT NULL,
    -- pending, active, rejected, expired, cancelled, ended, elapsed
    state           TEXT    NOT NULL,
    created_at      INTEGER  NOT NULL,
    -- A pending request expires then.
    pending_until   INTEGER  NOT NULL,
    activated_at    INTEGER,
    ends_at         INTEGER,
    ended_at        INTEGER,
    ended_by        TEXT    NOT NULL DEFAULT '',
    end_reason      TEXT    NOT NULL DEFAULT '',
    -- The acknowledged revocation that took back what was issued under it.
    revocation_id   TEXT    NOT NULL DEFAULT '',
    -- Break-glass: reviewed afterwards, by whom, when, with what comment.
    review_required INTEGER  NOT NULL DEFAULT 0,
    reviewed_by     TEXT    NOT NULL DEFAULT '',
    reviewed_at     INTEGER,
    review_comment  TEXT    NOT NULL DEFAULT '',
    -- The policy set that decided the request.
    policy_set      TEXT    NOT NULL
);
CREATE INDEX elevations_state ON elevations (state, ends_at);
CREATE INDEX elevations_requester ON elevations (requester, scope_kind, scope_name);

-- One verdict per reviewer and elevation.
CREATE TABLE elevation_reviews (
    elevation_id    TEXT    NOT NULL,
    reviewer_uid    INTEGER  NOT NULL,
    reviewer_name   TEXT    NOT NULL,
    -- approve or deny
    verdict         TEXT    NOT NULL,
    comment         TEXT    NOT NULL,
    at              INTEGER  NOT NULL,
    policy_set      TEXT    NOT NULL,
    PRIMARY KEY (elevation_id, reviewer_uid)
);

ALTER TABLE credential_leases ADD COLUMN elevation_id TEXT NOT NULL DEFAULT '';
CREATE INDEX credential_leases_elevation ON credential_leases (elevation_id);
