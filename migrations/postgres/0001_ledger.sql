-- The ledger schema, PostgreSQL flavour. Kept column-for-column identical to
-- migrations/sqlite/0001_ledger.sql: the queries in src/ledger/sql.rs serve both.
-- Times are integer milliseconds since the epoch (BIGINT), as the engine passes them.

-- One row per SKU. `next_local_id` is the per-SKU counter key ids are allocated from, inside
-- the import transaction (its row lock serialises concurrent imports of one SKU), so ids are
-- monotonic and never reused (aborted batches leave gaps).
CREATE TABLE skus (
    sku            TEXT    NOT NULL PRIMARY KEY,
    config_json    TEXT    NOT NULL,
    format_version BIGINT  NOT NULL,
    epoch          TEXT,
    next_local_id  BIGINT  NOT NULL DEFAULT 1,
    created_at_ms  BIGINT  NOT NULL,
    updated_at_ms  BIGINT  NOT NULL
);

-- One row per import. Keys of a batch count and warm only once it is `active`.
CREATE TABLE batches (
    sku             TEXT    NOT NULL REFERENCES skus (sku),
    batch_id        TEXT    NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'active', 'aborted')),
    accepted        BIGINT  NOT NULL DEFAULT 0,
    rejected        BIGINT  NOT NULL DEFAULT 0,
    duplicate       BIGINT  NOT NULL DEFAULT 0,
    created_at_ms   BIGINT  NOT NULL,
    activated_at_ms BIGINT,
    PRIMARY KEY (sku, batch_id)
);

-- One row per card key. The counters mirror the engine's key record; `state` is derived from
-- them (src/ledger/rules.rs) and stored so counts are an indexed GROUP BY. `active` copies
-- the batch's state onto its keys, so activating a batch is one UPDATE and counts need no join.
CREATE TABLE keys (
    sku            TEXT    NOT NULL,
    local_id       BIGINT  NOT NULL,
    digest         TEXT    NOT NULL,
    code           TEXT    NOT NULL,
    batch_id       TEXT    NOT NULL,
    active         BOOLEAN NOT NULL DEFAULT FALSE,
    format_version BIGINT  NOT NULL,
    expires_at_ms  BIGINT,
    max_issues     BIGINT  NOT NULL,
    max_uses       BIGINT  NOT NULL,
    held           BIGINT  NOT NULL DEFAULT 0,
    sold           BIGINT  NOT NULL DEFAULT 0,
    uses           BIGINT  NOT NULL DEFAULT 0,
    void           BOOLEAN NOT NULL DEFAULT FALSE,
    state          TEXT    NOT NULL DEFAULT 'available'
                           CHECK (state IN ('available', 'held', 'claimed', 'redeemed', 'void')),
    order_id       TEXT,
    user_id        TEXT,
    redeemer       TEXT,
    redeemed_at_ms BIGINT,
    updated_at_ms  BIGINT  NOT NULL,
    PRIMARY KEY (sku, local_id),
    UNIQUE (sku, digest),
    FOREIGN KEY (sku, batch_id) REFERENCES batches (sku, batch_id)
);

-- Counts by state over active keys: `WHERE sku = ? AND active = TRUE GROUP BY state` is
-- answered from this index alone, without touching rows.
CREATE INDEX keys_counts ON keys (sku, active, state);
-- Activation and abort of a batch.
CREATE INDEX keys_batch ON keys (sku, batch_id);

-- Every engine event, once: `event_id` ("<sku>/<stream entry id>") makes applying idempotent.
-- `seq` is the order the ledger recorded them in, the audit trail's tie-breaker.
CREATE TABLE events (
    seq           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      TEXT    NOT NULL UNIQUE,
    sku           TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    at_ms         BIGINT  NOT NULL,
    key_local_ids TEXT    NOT NULL,
    order_id      TEXT,
    user_id       TEXT,
    redeemer      TEXT,
    reason        TEXT,
    late          BOOLEAN NOT NULL DEFAULT FALSE,
    fields_json   TEXT    NOT NULL
);

-- Which events named which key: a key's audit trail is one index range.
CREATE TABLE event_keys (
    sku       TEXT   NOT NULL,
    local_id  BIGINT NOT NULL,
    event_seq BIGINT NOT NULL REFERENCES events (seq),
    PRIMARY KEY (sku, local_id, event_seq)
);
