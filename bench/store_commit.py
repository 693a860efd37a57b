"""The routing commit on SQLite and on PostgreSQL, side by side in one process.

Each commit is what the shell makes of a batch of decided requests: the RequestID counters of the
batch's originators (one check-and-advance statement), no flag events, and for PostgreSQL (a group
of instances) its RequestIDs (one insert). Per round, in turn: SQLite (WAL, synchronous=NORMAL, a file
in a temporary folder, one instance),
PostgreSQL with one client, PostgreSQL with two clients committing at once (two gateway instances).
PostgreSQL is a private server started here (simulator/postgres.py) with durable settings (fsync on,
synchronous_commit on), so its figure includes the WAL flush of every commit; SQLite's NORMAL does
not flush per commit. Medians of rounds; the machine is shared, so read the ratios, measured in the
same rounds.

    python -m bench.store_commit [--rounds 5] [--commits 300] [--batch 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.postgres import PostgresStore
from gateway.store import CommitBatch, FlagStore, SqliteStore
from rules.domain import Eui, int_to_eui
from simulator.postgres import Postgres

RESULTS = Path(__file__).parent / "results" / "store_commit.json"
_ORIGINATORS = 500


def _batches(commits: int, batch: int, offset: int, *, grouped: bool = True) -> list[CommitBatch]:
    """Counters of `batch` requests per commit from a pool of originators, rising per originator; with
    their RequestIDs when `grouped` (the shell records them only for a group of instances)."""
    users = [int_to_eui(0x90B3D51F30010000 + n) for n in range(_ORIGINATORS)]
    counter = offset
    batches = []
    for number in range(commits):
        counters: dict[Eui, int] = {}
        request_ids = []
        for slot in range(batch):
            counter += 1
            user = users[(number * batch + slot) % _ORIGINATORS]
            counters[user] = counter
            request_ids.append((user, counter))
        batches.append(CommitBatch(counters=counters, request_ids=request_ids if grouped else ()))
    return batches


async def _commit_all(store: FlagStore, batches: list[CommitBatch]) -> list[float]:
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        await store.commit(batch)
        seconds.append(time.perf_counter() - started)
    return seconds


def _summary(seconds: list[float], wall: float, requests: int) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "commit_p50_ms": round(1000 * statistics.median(ordered), 3),
        "commit_p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 3),
        "requests_per_second": round(requests / wall),
    }


async def _round(
    sqlite: SqliteStore, postgres: list[PostgresStore], commits: int, batch: int, offset: int
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    batches = _batches(commits, batch, offset)
    started = time.perf_counter()
    seconds = await _commit_all(sqlite, _batches(commits, batch, offset, grouped=False))
    out["sqlite"] = _summary(seconds, time.perf_counter() - started, commits * batch)
    started = time.perf_counter()
    seconds = await _commit_all(postgres[0], batches)
    out["postgresql_1"] = _summary(seconds, time.perf_counter() - started, commits * batch)
    # Two instances at once, each its own originators' counters further up.
    second = _batches(commits, batch, offset + commits * batch)
    started = time.perf_counter()
    both = await asyncio.gather(_commit_all(postgres[0], second), _commit_all(postgres[1], batches))
    wall = time.perf_counter() - started
    out["postgresql_2"] = _summary([s for run in both for s in run], wall, 2 * commits * batch)
    return out


async def main(rounds: int, commits: int, batch: int) -> dict[str, object]:
    # Durable, as in production: every commit waits for its WAL flush.
    server = Postgres({"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"})
    server.start()
    try:
        server.create_database("bench")
        with tempfile.TemporaryDirectory() as folder:
            async with (
                SqliteStore(Path(folder) / "bench.sqlite3") as sqlite,
                PostgresStore(server.url("bench")) as first,
                PostgresStore(server.url("bench")) as second,
            ):
                runs = [
                    await _round(sqlite, [first, second], commits, batch, 10 * n * commits * batch)
                    for n in range(rounds)
                ]
    finally:
        server.remove()
    medians = {
        system: {key: statistics.median(run[system][key] for run in runs) for key in runs[0][system]}
        for system in runs[0]
    }
    sqlite_rate = medians["sqlite"]["requests_per_second"]
    return {
        "rounds": rounds,
        "commits_per_run": commits,
        "requests_per_commit": batch,
        "originators": _ORIGINATORS,
        "median": medians,
        "ratio_to_sqlite": {
            system: round(figures["requests_per_second"] / sqlite_rate, 3)
            for system, figures in medians.items()
        },
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "note": "shared 2-core machine; PostgreSQL with fsync and synchronous_commit on, SQLite WAL NORMAL",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--commits", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    options = parser.parse_args()
    result = asyncio.run(main(options.rounds, options.commits, options.batch))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["median"], indent=2))
    print(json.dumps(result["ratio_to_sqlite"], indent=2))
