-- What an active elevation of an entry created: the temporary entry that gives the
-- requesting workload the elevated identity until the elevation ends. Keep in step with
-- the other backend's 0008 file.
ALTER TABLE elevations ADD COLUMN granted_entry TEXT NOT NULL DEFAULT '';

-- When an entry stops: no SVID signed for it lasts past this, and none is signed after
-- (unix seconds; 0 for never). An elevation's temporary entry ends with the elevation.
ALTER TABLE registration_entries ADD COLUMN expires_at BIGINT NOT NULL DEFAULT 0;
