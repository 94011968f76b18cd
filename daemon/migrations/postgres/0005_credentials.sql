-- TTL-bound credentials and their leases. Keep in step with the other backend's 0005 file.

CREATE TABLE credentials (
    name          TEXT    NOT NULL PRIMARY KEY,
    -- The definition as JSON, sealed with the local key (it holds the backend's admin
    -- credentials).
    spec_sealed   BYTEA    NOT NULL,
    -- 'config' (daemon.toml) or 'api' (mayflyd credential create).
    source        TEXT    NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

-- One row per credential issued. The row is written before the backend is asked, so a
-- crash in between leaves a lease the sweeper revokes, never a user nobody knows of.
-- Times are unix seconds.
CREATE TABLE credential_leases (
    id            TEXT    NOT NULL PRIMARY KEY,
    credential    TEXT    NOT NULL,
    -- The workload's SPIFFE ID, and the agent that asked for it.
    holder        TEXT    NOT NULL,
    agent_id      TEXT    NOT NULL,
    -- The backend's name for what it issued (a role name); never a secret.
    backend_id    TEXT    NOT NULL,
    issued_at     BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    -- issuing, active, revoked, revoke_failed
    state         TEXT    NOT NULL,
    revoked_at    BIGINT,
    reason        TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX credential_leases_live ON credential_leases (state, expires_at);
CREATE INDEX credential_leases_holder ON credential_leases (holder);
CREATE INDEX credential_leases_credential ON credential_leases (credential);
