-- An order's events are found through sorted runs of (order_id, seq) built behind the
-- ledger's commits (src/ledger/sqlite/order_runs.rs), not through `events_order`: order ids
-- are the clients', random, so once that index outgrew a commit every event recorded
-- dirtied a leaf of its own, written whole to the WAL and again by the checkpoint, two
-- thirds of recording a claim event on a long sale (BENCHMARKS.md). A run is written in
-- order, a page holding a hundred entries; runs are merged a few at a time as they pile up.
-- Events the runs do not cover yet (`seq` above the live runs' `last_seq`) are read by
-- `seq`: on SQLite `seq` is the commit order, so nothing can commit below a covered one.
-- PostgreSQL keeps `events_order`: there a sequence value is not the commit order.
DROP INDEX events_order;

-- The runs: `live` ones are read; a run being merged into is `building` until it replaces
-- its inputs in one transaction, which then are `dead` until their entries are deleted.
-- Live runs cover every event with `seq` up to the largest `last_seq` among them.
CREATE TABLE order_run_list (
    run      INTEGER PRIMARY KEY AUTOINCREMENT,
    level    INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    state    TEXT    NOT NULL CHECK (state IN ('building', 'live', 'dead'))
);

CREATE TABLE order_runs (
    run      INTEGER NOT NULL,
    order_id TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    PRIMARY KEY (run, order_id, seq)
) WITHOUT ROWID;
