#!/usr/bin/env python3
"""What recording one claim event costs SQLite as the ledger grows, index by index.

    python3 benches/ledger_events.py [filled events ...]

A fresh SQLite file gets the ledger's own migrations (migrations/sqlite, in order, up to
0014, the last with the `events_order` index) and the settings of the ledger's commit
connection (WAL, synchronous = FULL), then claim events
through the commit thread's statement (one row an execution, `ON CONFLICT (event_id) DO
NOTHING`) in transactions of PER events, as group commits carry them. After FILL events
(each size given), MEASURE more are timed: CPU and wall time per event, and bytes written
to storage per event (`write_bytes` of /proc/self/io: the WAL and its checkpoints).

Variants, each on a file of its own:
  as-is              the schema as migrated to 0014; order ids random (clients choose them)
  no-order-index     without `events_order` (order_id, seq)
  ordered-order-ids  as-is, order ids rising with the events (the index grows at its end)
  big-cache          as-is with a 256 MiB page cache (`cache_size`), so the index's leaves
                     stay in SQLite's cache: whether reading them is what costs
  fts5               `events_order` replaced by a contentless FTS5 index of the order ids
                     (one token an id), filled by a trigger: FTS5 keeps an LSM of segments
                     written sorted at each commit and merged as they accumulate
  runs               `events_order` replaced by sorted runs (order_id, seq) in a table of
                     their own, written RUN events behind the commits (the tail read by
                     seq) and merged FAN_IN at a time: the cost of indexing and merging
                     counted with the commits'

VARIANTS (space-separated) runs only those named.

The figures are relative: Python's own overhead is in every variant alike.
"""
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

PER = 150  # events a group commit carried in an engine-mode run of claims
# The last migration with the `events_order` B-tree (0015 replaced it with runs on SQLite):
# every variant starts from it, and `runs` is this script's model of what replaced it.
BTREE_SCHEMA = 14
MEASURE = 60_000
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations" / "sqlite"
INSERT = (
    "INSERT INTO events (event_id, sku, kind, at_ms, key_local_ids, order_id, user_id, "
    "redeemer, reason, late, fields_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (event_id) DO NOTHING"
)

FTS5 = """
CREATE VIRTUAL TABLE events_order_terms USING fts5(
    order_id, content = '', detail = none, tokenize = "unicode61 tokenchars '._:@-/'");
CREATE TRIGGER events_order_terms AFTER INSERT ON events WHEN new.order_id IS NOT NULL
BEGIN
    INSERT INTO events_order_terms (rowid, order_id) VALUES (new.seq, new.order_id);
END;
"""

RUN = 20_000
FAN_IN = 8


class Runs:
    """Sorted runs of (order_id, seq), tiered: FAN_IN runs of one level merge into one of the
    next."""

    def __init__(self, db):
        self.db = db
        db.executescript(
            "CREATE TABLE order_runs (run INTEGER, order_id TEXT, seq INTEGER, "
            "PRIMARY KEY (run, order_id, seq)) WITHOUT ROWID;"
            "CREATE TABLE runs (run INTEGER PRIMARY KEY, level INTEGER, last_seq INTEGER);")
        self.next = 1

    def catch_up(self):
        db = self.db
        w = db.execute("SELECT coalesce(max(last_seq), 0) FROM runs").fetchone()[0]
        (top,) = db.execute("SELECT max(seq) FROM events").fetchone()
        if top - w < RUN:
            return
        rows = db.execute("SELECT order_id, seq FROM events WHERE seq > ? AND "
                          "order_id IS NOT NULL ORDER BY seq", (w,)).fetchall()
        rows.sort()
        db.execute("BEGIN IMMEDIATE")
        run = self.next
        self.next += 1
        db.executemany("INSERT INTO order_runs VALUES (?, ?, ?)",
                       ((run, o, q) for o, q in rows))
        db.execute("INSERT INTO runs VALUES (?, 0, ?)", (run, top))
        db.execute("COMMIT")
        level = 0
        while True:
            same = [r for (r,) in db.execute(
                "SELECT run FROM runs WHERE level = ? ORDER BY run", (level,))]
            if len(same) < FAN_IN:
                break
            self.merge(same, level + 1)
            level += 1

    def merge(self, old, level):
        db = self.db
        import heapq
        cursors = [db.execute("SELECT order_id, seq FROM order_runs WHERE run = ? "
                              "ORDER BY order_id, seq", (r,)).fetchall() for r in old]
        run = self.next
        self.next += 1
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO order_runs VALUES (?, ?, ?)",
                       ((run, o, q) for o, q in heapq.merge(*cursors)))
        last = db.execute("SELECT max(last_seq) FROM runs WHERE run IN (%s)"
                          % ",".join("?" * len(old)), old).fetchone()[0]
        db.execute("INSERT INTO runs VALUES (?, ?, ?)", (run, level, last))
        for r in old:
            db.execute("DELETE FROM order_runs WHERE run = ?", (r,))
            db.execute("DELETE FROM runs WHERE run = ?", (r,))
        db.execute("COMMIT")


def written():
    with open("/proc/self/io") as io:
        for line in io:
            if line.startswith("write_bytes"):
                return int(line.split()[1])
    return 0


def run(variant, fill, work):
    path = Path(work) / f"{variant}-{fill}.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    for migration in sorted(MIGRATIONS.glob("*.sql")):
        if int(migration.name.split("_")[0]) <= BTREE_SCHEMA:
            db.executescript(migration.read_text())
    if variant == "big-cache":
        db.execute("PRAGMA cache_size = -262144")
    if variant in ("no-order-index", "fts5", "runs"):
        db.execute("DROP INDEX events_order")
    if variant == "fts5":
        db.executescript(FTS5)
    runs = Runs(db) if variant == "runs" else None
    rnd = random.Random(1)
    fields = json.dumps({"t": "claim", "ids": "17", "state": "claimed", "user": "u-1"})

    def order_id(i):
        if variant == "ordered-order-ids":
            return f"o-{i:016d}"
        return "o-%016x" % rnd.getrandbits(64)

    def commit(start):
        db.execute("BEGIN IMMEDIATE")
        for i in range(start, start + PER):
            at = 1_700_000_000_000 + i // 10
            db.execute(INSERT, (f"sbs/{at}-{i % 10}", "sbs", "claim", at, str(i % 1000),
                                order_id(i), "u-1", None, None, 0, fields))
        db.execute("COMMIT")
        if runs:
            runs.catch_up()

    n = 0
    while n < fill:
        commit(n)
        n += PER
    cpu, wall, disk = time.process_time(), time.time(), written()
    end = n + MEASURE
    while n < end:
        commit(n)
        n += PER
    cpu = (time.process_time() - cpu) * 1e6 / MEASURE
    wall = (time.time() - wall) * 1e6 / MEASURE
    disk = (written() - disk) / MEASURE / 1024
    db.close()
    return cpu, wall, disk


def main():
    fills = [int(a) for a in sys.argv[1:]] or [0, 300_000]
    variants = os.environ.get(
        "VARIANTS", "as-is no-order-index ordered-order-ids big-cache fts5 runs").split()
    print(f"{'variant':<18} {'filled':>9} {'us CPU/event':>13} {'us wall/event':>14} "
          f"{'KiB written/event':>18}")
    with tempfile.TemporaryDirectory() as work:
        for fill in fills:
            for variant in variants:
                cpu, wall, disk = run(variant, fill, work)
                print(f"{variant:<18} {fill:>9} {cpu:>13.1f} {wall:>14.1f} {disk:>18.2f}")


if __name__ == "__main__":
    main()
