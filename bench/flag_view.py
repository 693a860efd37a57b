"""Inventory import and the routing view at scale: 1,000,000 devices, 50,000 of them flagged.

1. An inventory CSV of a simulated estate (simulator.estate, cut to the device count) is written
   to a temporary folder; `parse_inventory` validates it and `SqliteStore.upsert_devices` imports
   it into a fresh SQLite file: the work of `mp169 inventory import`.
2. 50,000 meters are flagged with one committed batch of accepted flag events.
3. In a fresh Python process (so the import's heap does not hide the view's memory):
   `RoutingView.load(store)` is timed, resident memory (VmRSS) is read before and after, and
   `device_facts` is timed on random known EUIs against a plain dict lookup in the same process.

    python bench/flag_view.py                      # 1,000,000 devices, 50,000 flagged
    python bench/flag_view.py --devices 100000 --flagged 5000

Writes bench/results/flag_view.json and prints Markdown lines for the README.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.inventory import inventory_row, parse_inventory
from gateway.store import CommitBatch, SqliteStore
from gateway.view import RoutingView
from rules.domain import DeviceType, Eui, FlagEvent
from simulator.estate import INVENTORY_COLUMNS, generate_estate

RESULTS = Path(__file__).parent / "results" / "flag_view.json"
DEVICES_PER_PREMISE = 3.4  # simulator.estate's mix: hub, ESME, 60 % gas (GSME + GPF), 25 % PPMID
TARGET_IMPORT_S = 60.0
TARGET_VIEW_MB = 100.0
TARGET_LOOKUP_NS = 1000.0
LOOKUP_SAMPLE = 1000
LOOKUP_ROUNDS = 301
AT = datetime(2025, 1, 1, tzinfo=UTC)


def write_inventory(path: Path, devices: int, seed: int) -> list[tuple[Eui, DeviceType]]:
    estate = generate_estate(seed, int(devices / DEVICES_PER_PREMISE) + 100)
    rows = estate.devices[:devices]
    if len(rows) < devices:
        raise SystemExit(f"the estate has only {len(rows)} devices")
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=INVENTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(inventory_row(row) for row in rows)
    return [(row.device_id, row.device_type) for row in rows]


async def import_and_flag(
    csv_path: Path, db_path: Path, meters: list[Eui], flagged: int, seed: int
) -> dict[str, float]:
    started = time.perf_counter()
    with csv_path.open(encoding="utf-8", newline="") as lines:
        records = parse_inventory(lines)
    parsed = time.perf_counter()
    async with SqliteStore(db_path) as store:
        counts = await store.upsert_devices(records)
        imported = time.perf_counter()
        del records
        chosen = random.Random(seed).sample(meters, flagged)
        supplier = Eui("90-B3-D5-1F-30-01-00-01")
        events = [
            FlagEvent(
                device_id=eui,
                set=True,
                requester=supplier,
                request_id=f"{supplier}:90-B3-D5-1F-30-00-00-02:{n}",
                declaration=True,
                consumer_reference=None,
                outcome="accepted",
                at=AT,
            )
            for n, eui in enumerate(chosen, start=1)
        ]
        flag_started = time.perf_counter()
        await store.commit(CommitBatch(flag_events=events))
        flag_done = time.perf_counter()
    if counts.inserted != counts.received:
        raise SystemExit(f"expected a fresh import, got {counts}")
    return {
        "parse_s": round(parsed - started, 2),
        "upsert_s": round(imported - parsed, 2),
        "import_s": round(imported - started, 2),
        "flag_commit_s": round(flag_done - flag_started, 2),
    }


# -- the view, in its own process ---------------------------------------------------------------------


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def per_call_ns(call: Any, keys: list[Eui]) -> float:
    """Median over rounds of the mean time of one call, each round a loop over all `keys`."""
    timings = []
    for _ in range(LOOKUP_ROUNDS):
        started = time.perf_counter_ns()
        for key in keys:
            call(key)
        timings.append((time.perf_counter_ns() - started) / len(keys))
    return statistics.median(timings)


async def measure_view(db_path: Path, seed: int) -> dict[str, Any]:
    async with SqliteStore(db_path) as store:
        gc.collect()
        before = rss_mb()
        started = time.perf_counter()
        view = await RoutingView.load(store)
        loaded = time.perf_counter()
        gc.collect()
        after = rss_mb()
        known = [record.device_id async for batch in store.load_devices() for record in batch]
        sample = random.Random(seed).sample(known, LOOKUP_SAMPLE)
    # Fresh strings, as a parsed request would bring them.
    keys = [Eui("".join(eui)) for eui in sample]
    facts = {key: view.device_facts(key) for key in keys}
    assert all(value is not None for value in facts.values())
    baseline = dict(facts)
    return {
        "view_devices": len(view),
        "view_flagged": len(view.flagged),
        "view_profiles": view.profile_count,
        "view_load_s": round(loaded - started, 2),
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "view_rss_mb": round(after - before, 1),
        "device_facts_median_ns": round(per_call_ns(view.device_facts, keys)),
        "is_flagged_median_ns": round(per_call_ns(view.is_flagged, keys)),
        "dict_lookup_median_ns": round(per_call_ns(baseline.get, keys)),
    }


# -- driver -------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--flagged", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=169)
    parser.add_argument("--measure-view", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_view is not None:
        sys.stdout.write(json.dumps(asyncio.run(measure_view(args.measure_view, args.seed))))
        return 0

    with tempfile.TemporaryDirectory(prefix="mp169-bench-") as folder:
        csv_path = Path(folder) / "inventory.csv"
        db_path = Path(folder) / "mp169.sqlite3"
        devices = write_inventory(csv_path, args.devices, args.seed)
        meters = [eui for eui, kind in devices if kind in {DeviceType.ESME, DeviceType.GSME}]
        results: dict[str, Any] = {
            "devices": args.devices,
            "flagged": args.flagged,
            "csv_mb": round(csv_path.stat().st_size / 2**20, 1),
        }
        results |= asyncio.run(import_and_flag(csv_path, db_path, meters, args.flagged, args.seed))
        results["db_mb"] = round(db_path.stat().st_size / 2**20, 1)
        measured = subprocess.run(
            [sys.executable, __file__, "--measure-view", str(db_path), "--seed", str(args.seed)],
            check=True,
            capture_output=True,
            text=True,
        )
        results |= json.loads(measured.stdout)
    results["lookup_ratio_to_dict"] = round(
        results["device_facts_median_ns"] / results["dict_lookup_median_ns"], 1
    )
    results["python"] = platform.python_version()
    results["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}, {platform.system()}"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    rate = results["devices"] / results["import_s"]
    print(
        f"- Inventory import, {results['devices']:,} devices ({results['csv_mb']} MB CSV): "
        f"{results['import_s']} s ({results['parse_s']} s parse and validate, {results['upsert_s']} s "
        f"SQLite upsert; {rate:,.0f} rows/s; target < {TARGET_IMPORT_S:.0f} s)"
    )
    print(
        f"- Flagging {results['flagged']:,} meters in one commit: {results['flag_commit_s']} s; "
        f"database {results['db_mb']} MB"
    )
    print(
        f"- Routing view load: {results['view_load_s']} s; resident memory "
        f"+{results['view_rss_mb']} MB for {results['view_devices']:,} devices, "
        f"{results['view_flagged']:,} flagged, {results['view_profiles']:,} shared profiles "
        f"(target < {TARGET_VIEW_MB:.0f} MB)"
    )
    print(
        f"- `device_facts` lookup median: {results['device_facts_median_ns']} ns "
        f"(`is_flagged` {results['is_flagged_median_ns']} ns; plain dict lookup "
        f"{results['dict_lookup_median_ns']} ns, ratio {results['lookup_ratio_to_dict']}x; "
        f"target < {TARGET_LOOKUP_NS:.0f} ns)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
