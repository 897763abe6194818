-- Variants of images (thumbnails, previews) and the durable queue that generates them.
-- Timestamps are INTEGER microseconds since the Unix epoch and UUIDs lowercase TEXT, as in 0001.
-- The Postgres migration of the same number explains each table.

CREATE TABLE image_variants (
    image_id      TEXT    NOT NULL REFERENCES images (id),
    name          TEXT    NOT NULL,
    fingerprint   TEXT    NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('ready', 'failed')),
    blob_checksum TEXT    REFERENCES blobs (checksum),
    content_type  TEXT    NOT NULL DEFAULT '',
    width         INTEGER NOT NULL DEFAULT 0 CHECK (width >= 0),
    height        INTEGER NOT NULL DEFAULT 0 CHECK (height >= 0),
    file_size     INTEGER NOT NULL DEFAULT 0 CHECK (file_size >= 0),
    reason        TEXT,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (image_id, name),
    CHECK ((state = 'ready') = (blob_checksum IS NOT NULL))
) STRICT;

CREATE INDEX image_variants_by_blob ON image_variants (blob_checksum);

CREATE TABLE variant_tasks (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id        TEXT    NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    name            TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    claimed_by      TEXT,
    claimed_until   INTEGER,
    CHECK ((claimed_by IS NULL) = (claimed_until IS NULL)),
    UNIQUE (image_id, name)
) STRICT;

CREATE INDEX variant_tasks_due ON variant_tasks (next_attempt_at, id);
CREATE INDEX variant_tasks_by_claimer ON variant_tasks (claimed_by) WHERE claimed_by IS NOT NULL;
