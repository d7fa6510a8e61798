-- One order's events: restoring an order the engine retired (lua/retire.lua) reads them
-- when the order is retried.
CREATE INDEX events_sku_order ON events (sku, order_id, seq);
