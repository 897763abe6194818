-- Blobs, images and the copies of each blob (DESIGN invariants 1, 2 and 7).
-- Later migrations (0002...) add the replication task queue.
--
-- Encodings (STRICT tables, so SQLite enforces them):
-- * timestamps are INTEGER microseconds since the Unix epoch, so they order numerically and
--   keep the precision Postgres keeps;
-- * UUIDs are TEXT, lowercase and hyphenated, whose text order is the byte order Postgres
--   uses for its uuid type, so both backends page the list identically.

-- A blob is the stored bytes of one or more images, named by their SHA-256 (lowercase hex).
-- ref_count is the number of images that point at it; a blob at zero is being deleted, or is
-- being uploaded under the lock of an upload that has not committed yet.
CREATE TABLE blobs (
    checksum   TEXT    PRIMARY KEY,
    size       INTEGER NOT NULL CHECK (size >= 0),
    ref_count  INTEGER NOT NULL CHECK (ref_count >= 0),
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE images (
    id            TEXT    PRIMARY KEY,
    filename      TEXT    NOT NULL,
    content_type  TEXT    NOT NULL,
    file_size     INTEGER NOT NULL CHECK (file_size >= 0),
    width         INTEGER NOT NULL CHECK (width >= 0),
    height        INTEGER NOT NULL CHECK (height >= 0),
    blob_checksum TEXT    NOT NULL REFERENCES blobs (checksum),
    created_at    INTEGER NOT NULL
) STRICT;

-- The list is keyset-paginated newest first on (created_at, id).
CREATE INDEX images_newest_first ON images (created_at DESC, id DESC);
-- Deleting an image looks up the other references to its blob.
CREATE INDEX images_by_blob ON images (blob_checksum);

-- Every copy of a blob on a shard. No ON DELETE CASCADE: a blob row may only go once it has
-- no recorded copy, so a copy can never be forgotten by deleting its blob.
CREATE TABLE replicas (
    blob_checksum TEXT    NOT NULL REFERENCES blobs (checksum),
    shard         TEXT    NOT NULL,
    state         TEXT    NOT NULL
                  CHECK (state IN ('pending', 'stored', 'missing', 'deleting')),
    -- When the copy entered its current state: scans take the oldest first.
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (blob_checksum, shard)
) STRICT;

-- Deletion, replication and repair scan copies by state, oldest first.
CREATE INDEX replicas_by_state ON replicas (state, updated_at);
