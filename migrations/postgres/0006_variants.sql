-- Variants of images (thumbnails, previews) and the durable queue that generates them.

-- One generated (or failed) variant of one image. A ready variant is a blob like any other
-- (a `blobs` row whose ref_count counts this row, `replicas` rows, replication tasks), so
-- rebalance, drain and scrub handle it with no special case. Identical originals give
-- identical variants: their blob is stored once and referenced by each row. No ON DELETE
-- CASCADE: deleting an image deletes its variant rows first and drops their references in the
-- same transaction, so a reference can never be forgotten.
-- A variant not generated yet has no row: it is `pending` while its name is configured.
-- `fingerprint` names the spec and encoding it was made with; a row whose fingerprint differs
-- from the configured one is stale and is made again (on demand or by backfill).
CREATE TABLE image_variants (
    image_id      UUID        NOT NULL REFERENCES images (id),
    name          TEXT        NOT NULL,
    fingerprint   TEXT        NOT NULL,
    state         TEXT        NOT NULL CHECK (state IN ('ready', 'failed')),
    blob_checksum TEXT        REFERENCES blobs (checksum),
    content_type  TEXT        NOT NULL DEFAULT '',
    width         INTEGER     NOT NULL DEFAULT 0 CHECK (width >= 0),
    height        INTEGER     NOT NULL DEFAULT 0 CHECK (height >= 0),
    file_size     BIGINT      NOT NULL DEFAULT 0 CHECK (file_size >= 0),
    -- Why a failed variant failed (a decode error: the image's own fault).
    reason        TEXT,
    updated_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (image_id, name),
    CHECK ((state = 'ready') = (blob_checksum IS NOT NULL))
);

CREATE INDEX image_variants_by_blob ON image_variants (blob_checksum);

-- The variant generation queue: a sibling of replication_tasks, claimed the same way (a
-- lease, SKIP LOCKED on Postgres, retries with backoff). A sibling rather than a new kind in
-- replication_tasks because those rows name a copy (blob, shard) and keep their blob row alive
-- through a foreign key, while these name an (image, variant) and go with their image; and
-- SQLite cannot change that table's CHECK on kind without rebuilding it.
-- Tasks are queued in the upload's transaction, one per configured variant.
CREATE TABLE variant_tasks (
    id              BIGSERIAL   PRIMARY KEY,
    image_id        UUID        NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    name            TEXT        NOT NULL,
    attempts        INTEGER     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    claimed_by      TEXT,
    claimed_until   TIMESTAMPTZ,
    CHECK ((claimed_by IS NULL) = (claimed_until IS NULL)),
    UNIQUE (image_id, name)
);

CREATE INDEX variant_tasks_due ON variant_tasks (next_attempt_at, id);
CREATE INDEX variant_tasks_by_claimer ON variant_tasks (claimed_by) WHERE claimed_by IS NOT NULL;
