-- A SKU's order events in sequence: rebuilding an engine's order records pages through them.
CREATE INDEX events_sku_seq ON events (sku, seq);
