-- A key is visible (counted, warmed) while its batch is `active`, read from `batches`
-- instead of a copy on every key. Kept column-for-column identical to
-- migrations/postgres/0011_batch_visibility.sql.
--
-- The copy cost an import a second write of every key it added: activating a batch of a
-- million keys was an UPDATE of a million rows, each a new row version in every index of
-- `keys` on PostgreSQL, because `active` was indexed. Queries now leave out the keys of
-- batches not active (`batch_id NOT IN` them: a SKU's pending batches, usually none, and its
-- aborted ones, which have no keys left). One index over (sku, batch_id, state) serves the counts by state,
-- from the index alone, and the activation and abort of a batch.
DROP INDEX keys_counts;
DROP INDEX keys_batch;
CREATE INDEX keys_counts ON keys (sku, batch_id, state);
ALTER TABLE keys DROP COLUMN active;
