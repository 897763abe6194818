-- The replication task queue and the progress of resumable maintenance jobs (DESIGN invariant 3).
-- Timestamps are INTEGER microseconds since the Unix epoch, as in 0001.

-- One unit of background work on one copy: create it ('copy') or remove it ('delete').
-- Tasks are inserted in the transaction that makes them necessary, at most one per
-- (blob, shard, kind). A worker claims a due task by setting claimed_by and claimed_until (a
-- lease); a claim whose lease ran out may be taken by another worker. No ON DELETE CASCADE:
-- a blob row only goes once its tasks are gone, like its copies.
CREATE TABLE replication_tasks (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    blob_checksum   TEXT    NOT NULL REFERENCES blobs (checksum),
    shard           TEXT    NOT NULL,
    kind            TEXT    NOT NULL CHECK (kind IN ('copy', 'delete')),
    -- Failed attempts; a claim that expired because its worker died does not count.
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error      TEXT,
    last_failed_at  INTEGER,
    created_at      INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    claimed_by      TEXT,
    claimed_until   INTEGER,
    CHECK ((claimed_by IS NULL) = (claimed_until IS NULL)),
    UNIQUE (blob_checksum, shard, kind)
) STRICT;

-- The claim takes the due task that has waited longest; the unique constraint above serves
-- the lookups by blob.
CREATE INDEX replication_tasks_due ON replication_tasks (next_attempt_at, id);
-- Queue statistics group by target shard.
CREATE INDEX replication_tasks_by_shard ON replication_tasks (shard);
-- A worker shutting down releases its claims.
CREATE INDEX replication_tasks_by_claimer ON replication_tasks (claimed_by) WHERE claimed_by IS NOT NULL;

-- Where a resumable job (rebalance, scrub) stopped, as a blob key; NULL once it has finished.
CREATE TABLE maintenance_jobs (
    name       TEXT    PRIMARY KEY,
    cursor     TEXT,
    updated_at INTEGER NOT NULL
) STRICT;
