-- Stock pools (lua/prelude.lua, "Stock pools"): how many of a SKU's available codes each
-- channel's pool reserves, as the events the ledger applied say. Claims and holds take from
-- a pool, releases and lapses give back, pool events set and move them; applying an event
-- adds its part here in the same transaction, once. After the engine lost a SKU, its pools
-- are restored from here. Kept column-for-column identical in migrations/sqlite and
-- migrations/postgres.
CREATE TABLE pools (
    sku           TEXT   NOT NULL,
    pool          TEXT   NOT NULL,
    level         BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (sku, pool)
);
