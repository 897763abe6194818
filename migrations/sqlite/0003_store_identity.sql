-- Who this store is. The id is written into every shard's label (src/storage/identity.rs), so
-- that a shard whose disk is not mounted, or a bucket of another store, is fenced instead of
-- being taken for an empty shard of this one. One row, created on first use.
CREATE TABLE store_identity (
    singleton  INTEGER PRIMARY KEY CHECK (singleton = 1),
    id         TEXT    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
