-- The gateways sharing this ledger and when each last reported alive. Kept column-for-column
-- identical to migrations/sqlite/0010_gateways.sql.
--
-- After Redis lost a SKU's data, its rebuild waits until every gateway seen alive within
-- `rebuild_grace_ms` has written what it answered into the ledger (src/gateway.rs): a row
-- per running gateway, refreshed every half second, removed when it stops; rows of gateways
-- that died are removed an hour later.
CREATE TABLE gateways (
    id          TEXT    NOT NULL PRIMARY KEY,
    seen_at_ms  BIGINT  NOT NULL
);
