-- A key's voids less its restores, kept beside `void` (which is now `voids > 0`). Kept
-- column-for-column identical to migrations/postgres/0012_void_count.sql.
--
-- Writers commit a SKU's events in batches of their own, so the ledger may apply a restore
-- before the void it undoes (a gateway died holding the void; another writer committed the
-- restore, then took the void over). A flag set by the last event applied would end void
-- while the engine's key is not. The engine emits a key's voids and restores strictly in
-- turn (void.lua and restore.lua refuse a repeat), so their difference, a sum, is the same
-- in any order: 1 while the key is void, 0 once restored.
ALTER TABLE keys ADD COLUMN voids BIGINT NOT NULL DEFAULT 0;
UPDATE keys SET voids = 1 WHERE void;
