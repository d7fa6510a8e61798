-- Channel statements and reconciliation (src/http/statements.rs). Kept column-for-column
-- identical to migrations/postgres/0007_order_channels.sql; only the functions computing
-- `channel` differ, each backend spelling the same rule its own way.
--
-- `channel` names the selling channel of an order event: the part of `order_id` before the
-- first `/` (src/channel/mod.rs, `scoped`), `default` for a bare order id, NULL for events
-- of no order. A generated column: every writer, old or new, fills it, and events recorded
-- before this migration have it at once.
ALTER TABLE events ADD COLUMN channel TEXT GENERATED ALWAYS AS (
    CASE
        WHEN order_id IS NULL THEN NULL
        WHEN instr(order_id, '/') > 0 THEN substr(order_id, 1, instr(order_id, '/') - 1)
        ELSE 'default'
    END
) VIRTUAL;

-- A channel's order events in time: a statement pages through the orders created in its
-- range by (at_ms, seq).
CREATE INDEX events_channel_time ON events (channel, at_ms, seq);
-- An order's events: a statement page and a reconcile look orders up by id.
CREATE INDEX events_order ON events (order_id, seq);
