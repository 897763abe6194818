-- The request a replication task came from (its x-request-id), so that the worker that runs
-- the task logs under the same id as the request that queued it. NULL for tasks queued by
-- background work (scrub, repair) or before this migration.
ALTER TABLE replication_tasks ADD COLUMN request_id TEXT;
