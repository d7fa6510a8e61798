-- Which event set a key's latest order (`order_id`, `user_id`) and its latest redemption
-- (`redeemer`, `redeemed_at_ms`): their stream entry ids. Writers commit a SKU's events in
-- batches of their own, so the ledger may apply an earlier take or redemption of a key after
-- a later one (two gateways' writers, or a batch taken over from a dead writer); the fields
-- then follow the event with the later entry id, as the engine's did, not the one committed
-- last. Keys recorded before have none: their next event sets them. Kept identical in
-- migrations/sqlite and migrations/postgres.
ALTER TABLE keys ADD COLUMN order_entry TEXT;
ALTER TABLE keys ADD COLUMN redeem_entry TEXT;
