"""The routing commit on SQLite and on PostgreSQL, side by side in one process.

Each commit is what the shell makes of a batch of decided requests: the RequestID counters of the
batch's originators (one check-and-advance statement), no flag events, for PostgreSQL (a group
of instances) its RequestIDs (one insert), and, as every forward since durable pending forwards, a
pending row per request and the removal of the previous batch's (their device answered). With
`--baseline DIR` (a git checkout of other code, e.g. a worktree of the commit before a change) the
stores of that checkout's gateway/store.py and gateway/postgres.py run too, in the same rounds, on
databases of their own. Per round, in turn: SQLite (WAL, synchronous=NORMAL, a file
in a temporary folder, one instance),
PostgreSQL with one client, PostgreSQL with two clients committing at once (two gateway instances).
PostgreSQL is a private server started here (simulator/postgres.py) with durable settings (fsync on,
synchronous_commit on), so its figure includes the WAL flush of every commit; SQLite's NORMAL does
not flush per commit. Medians of rounds; the machine is shared, so read the ratios, measured in the
same rounds.

    python -m bench.store_commit [--rounds 5] [--commits 300] [--batch 64] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.postgres import PostgresStore
from gateway.store import CommitBatch, FlagStore, SqliteStore
from rules.domain import Eui, ForwardedRequest, RequestId, int_to_eui
from simulator.postgres import Postgres

if TYPE_CHECKING:
    from types import ModuleType

RESULTS = Path(__file__).parent / "results" / "store_commit.json"
_ORIGINATORS = 500
_DEVICE = Eui("00-DB-12-34-56-78-90-A0")


def _batches(commits: int, batch: int, offset: int, *, grouped: bool = True) -> list[CommitBatch]:
    """Counters of `batch` requests per commit from a pool of originators, rising per originator; with
    their RequestIDs when `grouped` (the shell records them only for a group of instances); each
    request forwarded (a pending row), the previous commit's forwards answered."""
    users = [int_to_eui(0x90B3D51F30010000 + n) for n in range(_ORIGINATORS)]
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    counter = offset
    batches = []
    previous: tuple[ForwardedRequest, ...] = ()
    for number in range(commits):
        counters: dict[Eui, int] = {}
        request_ids = []
        forwarded = []
        for slot in range(batch):
            counter += 1
            user = users[(number * batch + slot) % _ORIGINATORS]
            counters[user] = counter
            request_ids.append((user, counter))
            forwarded.append(ForwardedRequest(RequestId(user, _DEVICE, counter), "4.8.1", "4.8", deadline))
        batches.append(
            CommitBatch(
                counters=counters,
                request_ids=request_ids if grouped else (),
                forwarded=tuple(forwarded),
                resolved=tuple(entry.request_id for entry in previous),
            )
        )
        previous = tuple(forwarded)
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
    stores: Stores, commits: int, batch: int, offset: int, *, baseline: bool
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    batches = _batches(commits, batch, offset)
    plain = _batches(commits, batch, offset, grouped=False)
    # Two instances at once, each its own originators' counters further up.
    second = _batches(commits, batch, offset + commits * batch)
    for prefix, sqlite, postgres in (
        ("", stores.sqlite, stores.postgres),
        *((("baseline_", stores.baseline_sqlite, stores.baseline_postgres),) if baseline else ()),
    ):
        started = time.perf_counter()
        seconds = await _commit_all(sqlite, plain)
        out[f"{prefix}sqlite"] = _summary(seconds, time.perf_counter() - started, commits * batch)
        started = time.perf_counter()
        seconds = await _commit_all(postgres[0], batches)
        out[f"{prefix}postgresql_1"] = _summary(seconds, time.perf_counter() - started, commits * batch)
        started = time.perf_counter()
        both = await asyncio.gather(_commit_all(postgres[0], second), _commit_all(postgres[1], batches))
        wall = time.perf_counter() - started
        out[f"{prefix}postgresql_2"] = _summary([s for run in both for s in run], wall, 2 * commits * batch)
    return out


@dataclass
class Stores:
    sqlite: FlagStore
    postgres: list[FlagStore]
    baseline_sqlite: FlagStore | None = None
    baseline_postgres: list[FlagStore] = field(default_factory=list)


def _baseline_modules(checkout: Path) -> tuple[ModuleType, ModuleType]:
    """The checkout's gateway/store.py and gateway/postgres.py, loaded beside this tree's (their
    imports of the rest of the gateway resolve to this tree: only the stores are compared)."""
    modules = []
    for name in ("store", "postgres"):
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", checkout / "gateway" / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


async def _open(
    stack: contextlib.AsyncExitStack, folder: Path, server: Postgres, baseline: Path | None
) -> Stores:
    """This tree's stores, and the baseline checkout's on databases of their own."""
    stores = Stores(
        await stack.enter_async_context(SqliteStore(folder / "bench.sqlite3")),
        [await stack.enter_async_context(PostgresStore(server.url("bench"))) for _ in range(2)],
    )
    if baseline is not None:
        old_store, old_postgres = _baseline_modules(baseline)
        server.create_database("baseline")
        stores.baseline_sqlite = await stack.enter_async_context(
            old_store.SqliteStore(folder / "baseline.sqlite3")
        )
        stores.baseline_postgres = [
            await stack.enter_async_context(old_postgres.PostgresStore(server.url("baseline")))
            for _ in range(2)
        ]
    return stores


async def main(rounds: int, commits: int, batch: int, baseline: Path | None) -> dict[str, object]:
    # Durable, as in production: every commit waits for its WAL flush.
    server = Postgres({"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"})
    server.start()
    try:
        server.create_database("bench")
        with tempfile.TemporaryDirectory() as folder:
            async with contextlib.AsyncExitStack() as stack:
                stores = await _open(stack, Path(folder), server, baseline)
                runs = [
                    await _round(
                        stores, commits, batch, 10 * n * commits * batch, baseline=baseline is not None
                    )
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
        **(
            {
                "baseline": str(baseline),
                "vs_baseline": {  # throughput, this tree's stores over the baseline's
                    system: round(
                        statistics.median(
                            run[system]["requests_per_second"]
                            / run[f"baseline_{system}"]["requests_per_second"]
                            for run in runs
                        ),
                        3,
                    )
                    for system in ("sqlite", "postgresql_1", "postgresql_2")
                },
            }
            if baseline is not None
            else {}
        ),
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
    parser.add_argument("--baseline", type=Path, default=None, help="also run this checkout's stores")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args()
    baseline = options.baseline.resolve() if options.baseline is not None else None
    result = asyncio.run(main(options.rounds, options.commits, options.batch, baseline))
    options.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["median"], indent=2))
    print(json.dumps(result["ratio_to_sqlite"], indent=2))
    print(json.dumps(result.get("vs_baseline"), indent=2))
