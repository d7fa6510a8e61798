-- An order's events are found through one index, `events_order` (order_id, seq), as
-- statements and reconciliation find them; `events_sku_order` (sku, order_id, seq) repeated
-- it for the restore of a retired order, which now reads the same range and keeps the rows
-- of its SKU (an order id names the orders of a few SKUs at most). Every event recorded
-- paid an insert into both. Kept identical in migrations/sqlite and migrations/postgres.
DROP INDEX events_sku_order;
