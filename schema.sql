-- Schema of the sync hub. The one source: the hub applies it at start, every
-- statement idempotent (IF NOT EXISTS), under an advisory lock so that
-- several processes starting at once do not race.
--
-- Stamps (HLC) and names compare with COLLATE "C": byte order, which for the
-- fixed-width stamp form is the stamp order of PROTOCOL.md.

-- One row per user: the version counter that every committing push locks
-- (SELECT ... FOR UPDATE, users in order), so that one user's versions commit
-- in increasing order across all hub processes. `horizon`: cursors older than
-- this version were made before a retention purge and get 410.
CREATE TABLE IF NOT EXISTS hub_users (
    user_id    text PRIMARY KEY,
    version    bigint NOT NULL DEFAULT 0,
    horizon    bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per deleted record: its delete stamp. A record that was never
-- deleted has no row here (its fields are its whole state); rows of live
-- records written by earlier versions of the hub are harmless. `version` is
-- the version of the push that last raised the delete stamp.
CREATE TABLE IF NOT EXISTS hub_records (
    user_id     text NOT NULL,
    collection  text COLLATE "C" NOT NULL,
    record_id   text COLLATE "C" NOT NULL,
    deleted_hlc text COLLATE "C",
    deleted_at  timestamptz,
    version     bigint NOT NULL,
    device      text,
    origin      text,
    actor       jsonb,
    PRIMARY KEY (user_id, collection, record_id)
);

-- Pull reads deletes of one user in version order.
CREATE INDEX IF NOT EXISTS hub_records_user_version
    ON hub_records (user_id, version, collection, record_id)
    WHERE deleted_hlc IS NOT NULL;

-- One row per field of a record: its last written value and stamp, and the
-- version, device, origin and actor of the push that wrote it. A field stamped
-- at or before its record's delete stamp is not part of the record's state.
CREATE TABLE IF NOT EXISTS hub_fields (
    user_id    text NOT NULL,
    collection text COLLATE "C" NOT NULL,
    record_id  text COLLATE "C" NOT NULL,
    field      text COLLATE "C" NOT NULL,
    value      jsonb NOT NULL,
    hlc        text COLLATE "C" NOT NULL,
    version    bigint NOT NULL,
    device     text,
    origin     text,
    actor      jsonb,
    PRIMARY KEY (user_id, collection, record_id, field)
);

-- Pull: the deltas of one user after a cursor, in (version, record) order.
CREATE INDEX IF NOT EXISTS hub_fields_user_version
    ON hub_fields (user_id, version, collection, record_id);

-- Idempotency receipts: the answer given to a keyed push, kept 24 h. `scope`
-- is "http" (Idempotency-Key, unique per user) or "ws:<device>" (message id,
-- unique per device). `digest` tells a replay from a reused key.
CREATE TABLE IF NOT EXISTS hub_receipts (
    user_id    text NOT NULL,
    scope      text NOT NULL,
    key        text NOT NULL,
    digest     bytea NOT NULL,
    response   jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, scope, key)
);

-- Receipts are written in time order: a BRIN index finds the expired ones for
-- the purge at almost no cost per insert.
CREATE INDEX IF NOT EXISTS hub_receipts_created_at ON hub_receipts USING brin (created_at);

-- Devices of a user, registered on first use.
CREATE TABLE IF NOT EXISTS hub_devices (
    user_id    text NOT NULL,
    device     text NOT NULL,
    name       text,
    platform   text,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    PRIMARY KEY (user_id, device)
);

-- API keys: "hub_" + id + secret + checksum. Only an HMAC-SHA256 of the whole
-- key with the server's pepper is kept; the raw key is shown once, at creation.
CREATE TABLE IF NOT EXISTS hub_api_keys (
    id           text PRIMARY KEY,
    user_id      text NOT NULL,
    name         text NOT NULL,
    scopes       text[] NOT NULL,
    key_hash     bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

CREATE INDEX IF NOT EXISTS hub_api_keys_user ON hub_api_keys (user_id, created_at);
