"""Parse + decide throughput on the 129 real DUIS sample requests, against bare lxml parsing.

Round-robin over the samples, on one core. Each round times the gateway's hot path (gateway.duis
parse_request, then rules.decide.decide with facts looked up as the pipeline does) and, right next to
it, a bare `lxml.etree.fromstring` of the same bytes with the same hardened parser. Rounds alternate
which goes first; the figures are medians over rounds, and the ratio is the median of the per-round
ratios (adjacent measurements share the machine's noise). One device in the samples (the ESME) is
flagged, so refusals are part of the mix.

    python bench/parse_decide.py                  # 21 rounds of 20 passes over the samples
    python bench/parse_decide.py --rounds 5 --passes 5

Writes bench/results/parse_decide.json and prints a Markdown line for the README.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from lxml import etree

from gateway.duis import PARSER, ParseError, parse_request
from rules.decide import DeviceFacts, RequestFacts, decide
from rules.domain import DeviceStatus, DeviceType, Eui, Role, ServiceRequest
from rules.table import default_table

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "rules" / "duis" / "requests"
RESULTS = Path(__file__).parent / "results" / "parse_decide.json"
DCC = Eui("90-B3-D5-1F-30-00-00-02")
FLAGGED = Eui("00-DB-12-34-56-78-90-A0")
TARGET_RATIO = 0.8
TARGET_RPS = 50_000
_TYPES = {"A0": DeviceType.ESME, "A1": DeviceType.GSME, "A2": DeviceType.CHF, "A3": DeviceType.GPF}


def view(requests: list[ServiceRequest]) -> tuple[dict[Eui, DeviceFacts], dict[Eui, frozenset[Role]]]:
    """What the gateway's in-memory view would hold for the samples' devices and users."""
    devices: dict[Eui, DeviceFacts] = {}
    users: dict[Eui, frozenset[Role]] = {}
    for request in requests:
        users[request.request_id.originator] = frozenset(Role)
        for eui in (*request.concerned_devices, request.request_id.target):
            if eui != DCC:
                device_type = _TYPES.get(eui[-2:], DeviceType.PPMID)
                devices[eui] = DeviceFacts(
                    eui, device_type, 2, DeviceStatus.COMMISSIONED, flagged=eui == FLAGGED
                )
    return devices, users


def gateway_pass(
    samples: list[bytes], devices: Mapping[Eui, DeviceFacts], users: Mapping[Eui, frozenset[Role]]
) -> Callable[[], None]:
    table = default_table()

    def run() -> None:
        for data in samples:
            request = parse_request(data)
            if isinstance(request, ParseError):
                raise TypeError(request)
            facts = {eui: devices[eui] for eui in request.concerned_devices if eui in devices}
            decide(
                request,
                RequestFacts(users.get(request.request_id.originator, frozenset()), facts, DCC),
                table,
            )

    return run


def bare_pass(samples: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        for data in samples:
            etree.fromstring(data, PARSER)

    return run


def timed(run: Callable[[], None], passes: int, requests: int) -> float:
    """Requests per second over `passes` runs."""
    gc.collect()
    start = time.perf_counter()
    for _ in range(passes):
        run()
    return passes * requests / (time.perf_counter() - start)


def pin_to_one_core() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--passes", type=int, default=20, help="passes over the samples per measurement")
    args = parser.parse_args()

    core = pin_to_one_core()
    samples = [path.read_bytes() for path in sorted(SAMPLES.glob("*.XML"))]
    requests = [parse_request(data) for data in samples]
    parsed = [request for request in requests if isinstance(request, ServiceRequest)]
    if len(parsed) != len(samples):
        raise SystemExit("a sample does not parse: run the tests first")
    devices, users = view(parsed)
    gateway, bare = gateway_pass(samples, devices, users), bare_pass(samples)
    gateway()  # warm-up: caches, the rules table
    bare()

    gateway_rates, bare_rates, ratios = [], [], []
    for round_number in range(args.rounds):
        if round_number % 2:
            bare_rate = timed(bare, args.passes, len(samples))
            gateway_rate = timed(gateway, args.passes, len(samples))
        else:
            gateway_rate = timed(gateway, args.passes, len(samples))
            bare_rate = timed(bare, args.passes, len(samples))
        gateway_rates.append(gateway_rate)
        bare_rates.append(bare_rate)
        ratios.append(gateway_rate / bare_rate)

    rps = statistics.median(gateway_rates)
    ratio = statistics.median(ratios)
    result = {
        "samples": len(samples),
        "mean_sample_bytes": round(sum(map(len, samples)) / len(samples)),
        "rounds": args.rounds,
        "requests_per_measurement": args.passes * len(samples),
        "parse_decide_rps": round(rps),
        "bare_parse_rps": round(statistics.median(bare_rates)),
        "ratio": round(ratio, 3),
        "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
        "parse_decide_us": round(1e6 / rps, 2),
        "bare_parse_us": round(1e6 / statistics.median(bare_rates), 2),
        "targets": {"ratio": TARGET_RATIO, "rps": TARGET_RPS},
        "meets_targets": ratio >= TARGET_RATIO and rps >= TARGET_RPS,
        "pinned_core": core,
        "python": platform.python_version(),
        "lxml": ".".join(map(str, etree.LXML_VERSION)),
        "libxml2": ".".join(map(str, etree.LIBXML_VERSION)),
        "machine": platform.machine(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"| parse + decide, 129 real DUIS samples, one core | {rps:,.0f} requests/s "
        f"({result['parse_decide_us']} µs each) | {ratio:.2f} x bare lxml parse "
        f"({result['bare_parse_rps']:,} /s) | targets ≥ {TARGET_RPS:,}/s and ≥ {TARGET_RATIO} |"
    )


if __name__ == "__main__":
    main()
