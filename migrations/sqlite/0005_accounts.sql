-- Accounts: users, their API keys, and who owns each image (DESIGN "Accounts, keys and
-- ownership"). src/accounts/ holds the rules; this is only what they need stored.

-- A user signs in with a password (password_hash, Argon2id in PHC form) or with API keys; a
-- user made by an external issuer's token has external_subject ("issuer|sub") and no password.
-- used_bytes and used_images are changed in the same transaction as the image rows they
-- count, so they never drift from them; the quota columns are NULL for "the configured default".
CREATE TABLE users (
    id               TEXT        PRIMARY KEY,
    username         TEXT        NOT NULL UNIQUE,
    password_hash    TEXT,
    role             TEXT        NOT NULL CHECK (role IN ('user', 'admin')),
    disabled         INTEGER     NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    quota_bytes      INTEGER     CHECK (quota_bytes >= 0),
    quota_images     INTEGER     CHECK (quota_images >= 0),
    used_bytes       INTEGER     NOT NULL DEFAULT 0 CHECK (used_bytes >= 0),
    used_images      INTEGER     NOT NULL DEFAULT 0 CHECK (used_images >= 0),
    external_subject TEXT        UNIQUE,
    created_at       INTEGER     NOT NULL
) STRICT;

-- Only the SHA-256 of a key is kept (hex); prefix is its first characters, to tell keys apart
-- in a list without revealing them.
CREATE TABLE api_keys (
    id           TEXT        PRIMARY KEY,
    user_id      TEXT        NOT NULL REFERENCES users (id),
    name         TEXT        NOT NULL,
    key_hash     TEXT        NOT NULL UNIQUE,
    prefix       TEXT        NOT NULL,
    created_at   INTEGER     NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
) STRICT;
CREATE INDEX api_keys_by_user ON api_keys (user_id);

-- The secret that signs this store's access tokens and signed URLs, shared by every instance.
-- One row, created on first use (unless the config sets auth.token_secret).
CREATE TABLE auth_secret (
    singleton  INTEGER     PRIMARY KEY CHECK (singleton = 1),
    secret     TEXT        NOT NULL,
    created_at INTEGER     NOT NULL
) STRICT;

-- Images uploaded before accounts existed have no owner until the first start with accounts
-- on gives them to the first admin.
ALTER TABLE images ADD COLUMN owner_id TEXT REFERENCES users (id);
ALTER TABLE images ADD COLUMN visibility TEXT NOT NULL DEFAULT 'public'
    CHECK (visibility IN ('public', 'private'));
-- A user's own list, newest first.
CREATE INDEX images_by_owner ON images (owner_id, created_at DESC, id DESC);
