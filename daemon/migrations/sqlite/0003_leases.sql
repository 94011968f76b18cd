-- Several daemons on one datastore. Keep in step with the other backend's 0003 file.

-- Named leases: the daemon whose lease has not expired runs what the lease guards (the
-- rotation scheduler). Times are unix milliseconds.
CREATE TABLE leases (
    name          TEXT    NOT NULL PRIMARY KEY,
    holder        TEXT    NOT NULL,
    expires_at    INTEGER NOT NULL
);

-- The schedule slot (unix ms) a scheduled job was started for; NULL for manual jobs.
ALTER TABLE rotation_jobs ADD COLUMN scheduled_for INTEGER;
-- The daemon running the job, and until when its claim holds (unix ms). A claim that is
-- not renewed lapses, and another daemon finishes the job.
ALTER TABLE rotation_jobs ADD COLUMN claimed_by TEXT NOT NULL DEFAULT '';
ALTER TABLE rotation_jobs ADD COLUMN claim_expires_at INTEGER NOT NULL DEFAULT 0;

-- Daemons before this migration could leave two unfinished jobs for one secret when
-- several shared a datastore. Keep the oldest; the others cannot be run safely beside it.
UPDATE rotation_jobs
SET state = 'failed',
    last_error = 'superseded by an older unfinished rotation of this secret (migration 0003)',
    finished_at = updated_at
WHERE state <> 'promoted' AND state <> 'failed'
  AND EXISTS (
    SELECT 1 FROM rotation_jobs older
    WHERE older.secret_name = rotation_jobs.secret_name
      AND older.state <> 'promoted' AND older.state <> 'failed'
      AND (older.created_at < rotation_jobs.created_at
           OR (older.created_at = rotation_jobs.created_at AND older.token < rotation_jobs.token))
  );

-- At most one unfinished rotation per secret, whichever daemon started it.
CREATE UNIQUE INDEX rotation_jobs_one_unfinished ON rotation_jobs (secret_name)
    WHERE state <> 'promoted' AND state <> 'failed';
-- At most one job per schedule slot.
CREATE UNIQUE INDEX rotation_jobs_one_per_slot ON rotation_jobs (secret_name, scheduled_for)
    WHERE scheduled_for IS NOT NULL;
