-- Mayfly datastore, initial schema (PostgreSQL).
-- Keep this file in step with migrations/sqlite/0001_init.sql: same tables, same columns,
-- same constraints; only the type names differ (BIGINT/BYTEA here, INTEGER/BLOB there).
-- Times are unix seconds. Once released, never edit this file: add 0002_*.sql instead.

CREATE TABLE registration_entries (
    id            TEXT    NOT NULL PRIMARY KEY,
    spiffe_id     TEXT    NOT NULL,
    parent_id     TEXT    NOT NULL,
    -- JSON array of selector strings, sorted and deduplicated so that the unique
    -- constraint below treats the selector set, not its spelling order, as identity.
    selectors     TEXT    NOT NULL,
    x509_svid_ttl BIGINT  NOT NULL,
    jwt_svid_ttl  BIGINT  NOT NULL,
    -- JSON array, kept in the caller's order (the first name may become the CN).
    dns_names     TEXT    NOT NULL,
    hint          TEXT    NOT NULL,
    revision      BIGINT  NOT NULL,
    created_at    BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL,
    UNIQUE (spiffe_id, parent_id, selectors)
);

-- The sync stream asks "which entries belong to this agent" on every connect.
CREATE INDEX registration_entries_parent_id ON registration_entries (parent_id);

CREATE TABLE join_tokens (
    -- SHA-256 hex of the token: the token itself is never stored.
    hash       TEXT    NOT NULL PRIMARY KEY,
    spiffe_id  TEXT    NOT NULL,
    expires_at BIGINT  NOT NULL,
    created_at BIGINT  NOT NULL,
    used_at    BIGINT
);

CREATE TABLE agents (
    spiffe_id       TEXT    NOT NULL PRIMARY KEY,
    serial          TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('active', 'evicted', 'banned')),
    attested_at     BIGINT  NOT NULL,
    svid_expires_at BIGINT  NOT NULL,
    last_seen       BIGINT  NOT NULL,
    -- No foreign key to join_tokens: expired tokens are purged, agents outlive them.
    token_hash      TEXT    NOT NULL
);

CREATE TABLE ca_slots (
    id              TEXT    NOT NULL PRIMARY KEY,
    state           TEXT    NOT NULL CHECK (state IN ('prepared', 'active', 'retired')),
    cert_der        BYTEA   NOT NULL,
    jwt_kid         TEXT    NOT NULL UNIQUE,
    jwt_public_spki BYTEA   NOT NULL,
    not_before      BIGINT  NOT NULL,
    not_after       BIGINT  NOT NULL,
    created_at      BIGINT  NOT NULL,
    activated_at    BIGINT
);

-- At most one CA signs at a time, whatever the code above the store gets wrong.
CREATE UNIQUE INDEX ca_slots_one_active ON ca_slots (state) WHERE state = 'active';

CREATE TABLE bundle_sequence (
    id    BIGINT  NOT NULL PRIMARY KEY CHECK (id = 1),
    value BIGINT  NOT NULL
);

INSERT INTO bundle_sequence (id, value) VALUES (1, 0);
