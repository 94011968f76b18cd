-- The policy sets (Mayfly::EntrySet) an entry is in, as a JSON list of names like its
-- selectors. Keep in step with the other backend's 0006 file.

ALTER TABLE registration_entries ADD COLUMN sets TEXT NOT NULL DEFAULT '[]';
