"""Replay of a large generated stream through the real gateway over a private Mosquitto (issue 5).

Runs what `mp169 demo --broker URL --requests N` runs (gateway, simulated devices and the replay in
this process, the broker in its own) and writes the figures to bench/results/replay_mosquitto.json:
wall time, replay duration, answers, invariants, peak resident memory.

    python -m bench.replay_mosquitto              # 100,000 requests over 5,000 premises (about 2 min)
    python -m bench.replay_mosquitto --quick      # 10,000 requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.logging import configure_logging
from simulator.demo import DemoOptions, run_demo
from simulator.mosquitto import Mosquitto

RESULTS = Path(__file__).parent / "results" / "replay_mosquitto.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--premises", type=int, default=5_000)
    parser.add_argument("--quick", action="store_true", help="10,000 requests over 1,000 premises")
    args = parser.parse_args()
    requests, premises = (10_000, 1_000) if args.quick else (args.requests, args.premises)
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="mp169-replay-") as folder:
        broker = Mosquitto(Path(folder) / "broker")
        broker.start()
        try:
            options = DemoOptions(
                requests=requests, premises=premises, broker=broker.url, workdir=Path(folder) / "demo"
            )
            started = time.perf_counter()
            result = asyncio.run(run_demo(options, progress=True))
            wall = time.perf_counter() - started
        finally:
            broker.stop()
    summary = result.replay.summary
    figures = {
        "requests": requests,
        "premises": premises,
        "wall_seconds": round(wall, 1),
        "replay_seconds": round(summary.duration_seconds, 1),
        "requests_per_second": round(requests / summary.duration_seconds),
        "answered": summary.answered,
        "missing": summary.missing,
        "duplicate_request_id_answers": summary.first_codes.get("E11", 0),
        "invariants": {r.name: {"passed": r.passed, "checked": r.checked} for r in result.replay.invariants},
        "all_invariants_hold": result.replay.passed,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "python": platform.python_version(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
