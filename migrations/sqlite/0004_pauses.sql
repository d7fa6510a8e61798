-- Incident controls: claims or redemptions paused, per SKU or for the whole gateway. Kept
-- column-for-column identical to migrations/postgres/0004_pauses.sql.
--
-- `pauses` holds what is paused now, one row per target and action: `sku` is the SKU, or ''
-- for the whole gateway (SKU names are never empty); `action` is `claims` or `redemptions`.
-- Every gateway sharing the ledger reads it every few hundred milliseconds.
CREATE TABLE pauses (
    sku             TEXT    NOT NULL,
    action          TEXT    NOT NULL CHECK (action IN ('claims', 'redemptions')),
    reason          TEXT    NOT NULL,
    paused_by       TEXT    NOT NULL,
    paused_at_ms    BIGINT  NOT NULL,
    expected_end_ms BIGINT,
    PRIMARY KEY (sku, action)
) WITHOUT ROWID;

-- Every pause and resume, in the order recorded: the incident's audit trail.
CREATE TABLE pause_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    sku             TEXT    NOT NULL,
    action          TEXT    NOT NULL CHECK (action IN ('claims', 'redemptions')),
    kind            TEXT    NOT NULL CHECK (kind IN ('pause', 'resume')),
    reason          TEXT,
    actor           TEXT    NOT NULL,
    at_ms           BIGINT  NOT NULL,
    expected_end_ms BIGINT
);
-- One SKU's history, newest first.
CREATE INDEX pause_events_sku ON pause_events (sku, seq);
