-- Blobs, images and the copies of each blob (DESIGN invariants 1, 2 and 7).
-- Later migrations (0002...) add the replication task queue.

-- A blob is the stored bytes of one or more images, named by their SHA-256 (lowercase hex).
-- ref_count is the number of images that point at it; a blob at zero is being deleted, or is
-- being uploaded under the lock of an upload that has not committed yet.
CREATE TABLE blobs (
    checksum   TEXT        PRIMARY KEY,
    size       BIGINT      NOT NULL CHECK (size >= 0),
    ref_count  BIGINT      NOT NULL CHECK (ref_count >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE images (
    id            UUID        PRIMARY KEY,
    filename      TEXT        NOT NULL,
    content_type  TEXT        NOT NULL,
    file_size     BIGINT      NOT NULL CHECK (file_size >= 0),
    width         INTEGER     NOT NULL CHECK (width >= 0),
    height        INTEGER     NOT NULL CHECK (height >= 0),
    blob_checksum TEXT        NOT NULL REFERENCES blobs (checksum),
    created_at    TIMESTAMPTZ NOT NULL
);

-- The list is keyset-paginated newest first on (created_at, id).
CREATE INDEX images_newest_first ON images (created_at DESC, id DESC);
-- Deleting an image looks up the other references to its blob.
CREATE INDEX images_by_blob ON images (blob_checksum);

-- Every copy of a blob on a shard. No ON DELETE CASCADE: a blob row may only go once it has
-- no recorded copy, so a copy can never be forgotten by deleting its blob.
CREATE TABLE replicas (
    blob_checksum TEXT        NOT NULL REFERENCES blobs (checksum),
    shard         TEXT        NOT NULL,
    state         TEXT        NOT NULL
                  CHECK (state IN ('pending', 'stored', 'missing', 'deleting')),
    -- When the copy entered its current state: scans take the oldest first.
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (blob_checksum, shard)
);

-- Deletion, replication and repair scan copies by state, oldest first.
CREATE INDEX replicas_by_state ON replicas (state, updated_at);
