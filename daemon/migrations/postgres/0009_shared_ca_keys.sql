-- Every daemon on one datastore signs with the same CA: each slot's private keys live in
-- its row, sealed with the sealing key the daemons share (secrets.key), not in one
-- daemon's data_dir. NULL for a slot made before this migration until a daemon that holds
-- its key files seals them in. Keep in step with the other backend's 0009 file.
ALTER TABLE ca_slots ADD COLUMN x509_key_sealed BYTEA;
ALTER TABLE ca_slots ADD COLUMN jwt_key_sealed BYTEA;

-- One prepared CA at a time, whichever daemon prepares it.
CREATE UNIQUE INDEX ca_slots_one_prepared ON ca_slots (state) WHERE state = 'prepared';

-- A value sealed with the datastore's sealing key by the first daemon: a daemon whose
-- secrets.key does not open it refuses to start, rather than fail on every sealed row.
CREATE TABLE sealing_check (
    id          BIGINT  NOT NULL PRIMARY KEY,
    sealed      BYTEA      NOT NULL,
    created_at  BIGINT  NOT NULL
);
