-- Secrets and their rotation jobs. Keep in step with the other backend's 0002 file.

CREATE TABLE secrets (
    name          TEXT    NOT NULL PRIMARY KEY,
    -- The secret's definition as JSON, sealed with the local key (it may hold target
    -- admin credentials).
    spec_sealed   BLOB    NOT NULL,
    -- 'config' (daemon.toml) or 'api' (mayflyd secret create).
    source        TEXT    NOT NULL,
    next_run_at   INTEGER,
    last_run_at   INTEGER,
    last_outcome  TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE rotation_jobs (
    -- The rotation token: 32+ characters, and the id of the version it creates.
    token         TEXT    NOT NULL PRIMARY KEY,
    secret_name   TEXT    NOT NULL,
    -- created, pending_stored, target_set, tested, promoted, failed
    state         TEXT    NOT NULL,
    username      TEXT    NOT NULL,
    trigger_kind  TEXT    NOT NULL,
    attempts      INTEGER NOT NULL,
    last_error    TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    finished_at   INTEGER
);

CREATE INDEX rotation_jobs_secret ON rotation_jobs (secret_name, created_at);

-- Mayfly's own secret store: AES-256-GCM ciphertexts, bound to (secret, version).
CREATE TABLE local_secret_versions (
    secret_name   TEXT    NOT NULL,
    version_id    TEXT    NOT NULL,
    -- 'current', 'previous', 'pending', or '' once a version has aged out of every stage.
    stage         TEXT    NOT NULL,
    sealed        BLOB    NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (secret_name, version_id)
);
