-- Codes at rest (src/secrets): one row per key, data or index, that sealed or keyed anything
-- in this ledger, with a check value made under it (a sealed constant, or the constant's
-- digest). A gateway or command started with other key material under a known id is refused
-- before it seals a code nobody else can open or keys a digest nobody else can find. Kept
-- column-for-column identical in migrations/sqlite and migrations/postgres.
CREATE TABLE key_checks (
    key_id        TEXT   NOT NULL PRIMARY KEY,
    kind          TEXT   NOT NULL CHECK (kind IN ('data', 'index')),
    check_value   TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL
);
