-- Fences between a rebuild of a SKU and commits of the engine generations it replaced. Kept
-- column-for-column identical in migrations/sqlite and migrations/postgres.
--
-- After the engine lost a SKU, a rebuild reads it back from here (src/inventory/warm.rs,
-- `finish_restore`), as a new generation (lua/prelude.lua, `emit`). A gateway's event writer
-- may still hold events of the lost generation that it read before the loss (its gateway
-- paused, or cut off from the ledger, past the rebuild's grace); committed after the
-- rebuild read the ledger, they are in the ledger alone, and the engine offers what the
-- ledger records sold, or holds pools the ledger does not. So the rebuild records its
-- generation here before its first read (`read_gen`), and a commit of events of another
-- generation locks this row for share and, finding a generation other than its own, marks
-- the SKU in `rereads`: every gateway's sync pass then drains the generation the engine has
-- and rebuilds the SKU again. The lock orders each commit before or after the fence: before
-- it, the rebuild reads it; after it, the commit sees the fence. A fence of a new generation
-- clears the mark in the same transaction (that rebuild reads whatever set it).
--
-- A row per SKU, from its creation (the lock needs a row to take); `read_gen` is NULL until
-- the SKU's first rebuild.
CREATE TABLE rebuild_fences (
    sku      TEXT NOT NULL PRIMARY KEY,
    read_gen TEXT
);
INSERT INTO rebuild_fences (sku) SELECT sku FROM skus;

CREATE TABLE rereads (
    sku          TEXT   NOT NULL PRIMARY KEY,
    marked_at_ms BIGINT NOT NULL
);
