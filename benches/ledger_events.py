#!/usr/bin/env python3
"""What recording one claim event costs SQLite as the ledger grows, index by index.

    python3 benches/ledger_events.py [filled events ...]

A fresh SQLite file gets the ledger's own migrations (migrations/sqlite, in order) and the
settings of the ledger's commit connection (WAL, synchronous = FULL), then claim events
through the commit thread's statement (one row an execution, `ON CONFLICT (event_id) DO
NOTHING`) in transactions of PER events, as group commits carry them. After FILL events
(each size given), MEASURE more are timed: CPU and wall time per event, and bytes written
to storage per event (`write_bytes` of /proc/self/io: the WAL and its checkpoints).

Variants, each on a file of its own:
  as-is              the schema as migrated; order ids random (clients choose them)
  no-order-index     without `events_order` (order_id, seq)
  ordered-order-ids  as-is, order ids rising with the events (the index grows at its end)
  big-cache          as-is with a 256 MiB page cache (`cache_size`), so the index's leaves
                     stay in SQLite's cache: whether reading them is what costs

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
MEASURE = 60_000
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations" / "sqlite"
INSERT = (
    "INSERT INTO events (event_id, sku, kind, at_ms, key_local_ids, order_id, user_id, "
    "redeemer, reason, late, fields_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (event_id) DO NOTHING"
)


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
        db.executescript(migration.read_text())
    if variant == "big-cache":
        db.execute("PRAGMA cache_size = -262144")
    if variant == "no-order-index":
        db.execute("DROP INDEX events_order")
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
    print(f"{'variant':<18} {'filled':>9} {'us CPU/event':>13} {'us wall/event':>14} "
          f"{'KiB written/event':>18}")
    with tempfile.TemporaryDirectory() as work:
        for fill in fills:
            for variant in ("as-is", "no-order-index", "ordered-order-ids", "big-cache"):
                cpu, wall, disk = run(variant, fill, work)
                print(f"{variant:<18} {fill:>9} {cpu:>13.1f} {wall:>14.1f} {disk:>18.2f}")


if __name__ == "__main__":
    main()
