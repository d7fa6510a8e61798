-- Selling channels (src/channel): each its own bearer tokens, limits and SKU list. Kept
-- column-for-column identical to migrations/postgres/0006_channels.sql.
--
-- `config_json` holds the channel's settings as `PUT /v1/channels/{channel}` accepted them.
-- Every gateway sharing the ledger reads these tables every `channel_refresh_ms`.
CREATE TABLE channels (
    channel       TEXT   NOT NULL PRIMARY KEY,
    config_json   TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
) WITHOUT ROWID;

-- A channel's bearer tokens, by digest: the token itself is shown once, when it is made, and
-- never stored. Revoked tokens stay, for the audit trail, and no longer authenticate.
CREATE TABLE channel_tokens (
    token_id      TEXT   NOT NULL PRIMARY KEY,
    channel       TEXT   NOT NULL REFERENCES channels (channel),
    digest        TEXT   NOT NULL UNIQUE,
    label         TEXT,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
) WITHOUT ROWID;
CREATE INDEX channel_tokens_channel ON channel_tokens (channel);

-- Every change of a channel (settings, tokens), in the order recorded: its audit trail.
CREATE TABLE channel_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    channel     TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    detail_json TEXT    NOT NULL,
    actor       TEXT    NOT NULL,
    at_ms       BIGINT  NOT NULL
);
CREATE INDEX channel_events_channel ON channel_events (channel, seq);
