-- A deletion whose outcome is unknown (its DELETE timed out or failed: it may still be carried
-- out by the shard later) fences its copy until this time (microseconds since the epoch).
-- Uploads of the same bytes do not write to that shard meanwhile, and replication does not copy
-- onto it, so a late DELETE can never remove a copy recorded as stored after it
-- (src/maintenance/deletion.rs).
ALTER TABLE replicas ADD COLUMN delete_in_doubt_until INTEGER;
