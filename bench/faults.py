"""Fault campaign: one User's burst against a quiet User, through `mp169 run` and a private Mosquitto.

The gateway is the real daemon (`python -m gateway.cli run`, its own process, the two MQTT sessions
it runs in production) on a private Mosquitto started with the shipped deploy/mosquitto.conf
limits; simulated devices (simulator.devices, answering at once) and the two Users are MQTT clients
of this process. In one run, side by side:

1. quiet alone: the quiet User sends QUIET requests (4.8.1 to its own meters) paced at QUIET_RATE/s;
   latency = publish -> its first answer (the gateway's I99), one clock (this process).
2. burst: the burst User publishes BURST requests (4.8.1 to its meters) as fast as its client can,
   while the quiet User sends the same paced requests again.

Reported: the quiet User's p50/p99 in both phases and their ratio; for every request, whether it
got exactly one first answer (I99, or E16921 when over the forward limit) and exactly one final
answer (the device's or E21): lost = none, duplicated = more than one; the gateway's peak RSS
(VmHWM). Writes bench/results/faults.json and prints Markdown.

    python -m bench.faults            # ~1 min: 20,000-request burst
    python -m bench.faults --quick    # ~15 s: 2,000-request burst
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from gateway.config import BrokerSettings
from gateway.duis import PARSER
from gateway.mqtt import MqttTransport
from gateway.store import SqliteStore
from rules.codes import ResponseCode
from rules.domain import DeviceType, Eui, RequestId
from simulator.devices import DeviceConfig, DeviceSimulator
from simulator.estate import generate_estate
from simulator.mosquitto import Mosquitto, shipped_limits
from simulator.traffic import load_templates, render

if TYPE_CHECKING:
    from gateway.transport import Message
    from rules.domain import DeviceRecord

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "faults.json"
SRV = "4.8.1"
QUIET = 200
QUIET_RATE = 20.0
GUARD_SECONDS = 300.0
SR = "{http://www.dccinterface.co.uk/ServiceUserGateway}"
FIRST = frozenset({ResponseCode.ACKNOWLEDGED.value, ResponseCode.GATEWAY_BUSY.value})


def header(payload: bytes) -> tuple[str, str]:
    root = etree.fromstring(payload, PARSER)
    return root.findtext(f"{SR}Header/{SR}RequestID") or "", root.findtext(
        f"{SR}Header/{SR}ResponseCode"
    ) or ""


@dataclass
class Answers:
    """Every answer on dsp/out/+, by RequestID, with the arrival time of the first."""

    codes: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    first_at: dict[str, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, message: Message) -> None:
        request_id, code = header(message.payload)
        self.codes[request_id].append(code)
        self.first_at.setdefault(request_id, time.perf_counter())
        self.changed.set()

    async def until(self, ids: list[str], *, final: bool) -> None:
        async with asyncio.timeout(GUARD_SECONDS):
            while not all(self.done(i, final=final) for i in ids):
                self.changed.clear()
                await self.changed.wait()

    def done(self, request_id: str, *, final: bool) -> bool:
        codes = self.codes.get(request_id, [])
        if ResponseCode.GATEWAY_BUSY.value in codes:
            return True
        return any(c not in FIRST for c in codes) if final else bool(codes)


def meters_of(devices: tuple[DeviceRecord, ...], supplier: Eui) -> list[Eui]:
    return [
        d.device_id for d in devices if d.device_type is DeviceType.ESME and d.import_supplier == supplier
    ]


def requests_for(user: Eui, meters: list[Eui], start: int, count: int) -> list[tuple[str, bytes]]:
    template = load_templates()[SRV]
    return [
        (str(rid), render(template, rid))
        for n in range(count)
        for rid in (RequestId(user, meters[n % len(meters)], start + n),)
    ]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(1e3 * statistics.median(ordered), 1),
        "p99_ms": round(1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    }


async def paced(user: MqttTransport, topic: str, requests: list[tuple[str, bytes]]) -> dict[str, float]:
    sent: dict[str, float] = {}
    start = time.perf_counter()
    for number, (request_id, payload) in enumerate(requests):
        await asyncio.sleep(max(0.0, start + number / QUIET_RATE - time.perf_counter()))
        sent[request_id] = time.perf_counter()
        await user.publish(topic, payload)
    return sent


async def flood(user: MqttTransport, topic: str, requests: list[tuple[str, bytes]]) -> None:
    for _, payload in requests:
        await user.publish(topic, payload)


def outcome(answers: Answers, ids: list[str]) -> dict[str, int]:
    """Per request: first answers (I99/E16921) and final answers (anything else) counted."""
    first = Counter(sum(1 for c in answers.codes.get(i, []) if c in FIRST) for i in ids)
    final = Counter(
        sum(1 for c in answers.codes.get(i, []) if c not in FIRST)
        for i in ids
        if ResponseCode.GATEWAY_BUSY.value not in answers.codes.get(i, [])
    )
    codes = Counter(c for i in ids for c in answers.codes.get(i, []))
    return {
        "requests": len(ids),
        "lost": first[0] + final[0],
        "duplicated_first": sum(n for k, n in first.items() if k > 1),
        "duplicated_final": sum(n for k, n in final.items() if k > 1),
        **{f"code_{code}": count for code, count in sorted(codes.items())},
    }


async def campaign(burst: int, workdir: Path) -> dict[str, Any]:
    broker = Mosquitto(workdir / "mosquitto", shipped_limits())
    broker.start()
    estate = generate_estate(1, 300)
    async with SqliteStore(workdir / "gw.sqlite3") as store:
        await store.upsert_devices(estate.devices)
        await store.upsert_users(estate.users)
    suppliers = Counter(d.import_supplier for d in estate.devices if d.device_type is DeviceType.ESME)
    (loud, _), (quiet, _) = suppliers.most_common(2)
    assert loud is not None
    assert quiet is not None
    config = workdir / "config.toml"
    config.write_text(
        f'[broker]\nurl = "{broker.url}"\n[store]\npath = "{workdir / "gw.sqlite3"}"\n'
        '[gateway]\nmetrics_port = 0\nlog_level = "info"\n'
    )
    log = workdir / "gateway.log"
    with log.open("wb") as stderr:
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "run", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    async with asyncio.timeout(GUARD_SECONDS):  # subscribed: requests published now are not dropped
        while b"daemon-ready" not in log.read_bytes():  # noqa: ASYNC110 - another process's log file
            await asyncio.sleep(0.05)
    settings = BrokerSettings(url=broker.url)
    answers = Answers()
    users = MqttTransport(settings, "bench-users")
    await users.start(["dsp/out/+"], answers)
    devices = DeviceSimulator(MqttTransport(settings, "bench-devices"), DeviceConfig())
    await devices.start()
    loud_client = MqttTransport(settings, "bench-loud")
    await loud_client.start([], answers)
    try:
        # Warm-up: the daemon is up and routing once one request is answered.
        warm = requests_for(quiet, meters_of(estate.devices, quiet), 1, 1)
        await flood(users, f"dsp/in/{quiet}", warm)
        await answers.until([warm[0][0]], final=True)
        alone = requests_for(quiet, meters_of(estate.devices, quiet), 2, QUIET)
        sent_alone = await paced(users, f"dsp/in/{quiet}", alone)
        await answers.until(list(sent_alone), final=True)
        loud_requests = requests_for(loud, meters_of(estate.devices, loud), 1, burst)
        beside = requests_for(quiet, meters_of(estate.devices, quiet), 2 + QUIET, QUIET)
        started = time.perf_counter()
        _, sent_beside = await asyncio.gather(
            flood(loud_client, f"dsp/in/{loud}", loud_requests), paced(users, f"dsp/in/{quiet}", beside)
        )
        loud_ids = [i for i, _ in loud_requests]
        await answers.until(loud_ids + list(sent_beside), final=True)
        burst_seconds = time.perf_counter() - started
        rss = peak_rss_mb(daemon.pid)
    finally:
        daemon.terminate()
        await daemon.wait()
        for transport in (loud_client, devices.transport, users):
            await transport.abort()
        broker.stop()
    quiet_alone = percentiles([answers.first_at[i] - t for i, t in sent_alone.items()])
    quiet_beside = percentiles([answers.first_at[i] - t for i, t in sent_beside.items()])
    return {
        "burst_requests": burst,
        "burst_seconds": round(burst_seconds, 2),
        "quiet_alone": quiet_alone,
        "quiet_beside_burst": quiet_beside,
        "quiet_p50_ratio": round(quiet_beside["p50_ms"] / quiet_alone["p50_ms"], 2),
        "quiet_p99_ratio": round(quiet_beside["p99_ms"] / quiet_alone["p99_ms"], 2),
        "burst_outcome": outcome(answers, loud_ids),
        "quiet_outcome": outcome(answers, list(sent_alone) + list(sent_beside)),
        "gateway_peak_rss_mb": rss,
        "daemon_exit": daemon.returncode,
    }


def markdown(result: dict[str, Any]) -> str:
    alone, beside = result["quiet_alone"], result["quiet_beside_burst"]
    burst, quiet = result["burst_outcome"], result["quiet_outcome"]
    return "\n".join(
        [
            (
                f"Burst of {result['burst_requests']:,} from one User ({result['burst_seconds']} s), "
                f"quiet User at {QUIET_RATE:g}/s:"
            ),
            "",
            "| | quiet p50 | quiet p99 |",
            "|---|---|---|",
            f"| alone | {alone['p50_ms']} ms | {alone['p99_ms']} ms |",
            f"| beside the burst | {beside['p50_ms']} ms | {beside['p99_ms']} ms |",
            "",
            (
                f"Burst: lost {burst['lost']}, duplicated {burst['duplicated_first']} + "
                f"{burst['duplicated_final']}, E16921 {burst.get('code_E16921', 0)}; quiet: lost "
                f"{quiet['lost']}, duplicated {quiet['duplicated_first']} + {quiet['duplicated_final']}; "
                f"gateway peak RSS {result['gateway_peak_rss_mb']} MB."
            ),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2,000-request burst")
    args = parser.parse_args()
    burst = 2_000 if args.quick else 20_000
    with tempfile.TemporaryDirectory(prefix="mp169-faults-") as workdir:
        result = asyncio.run(campaign(burst, Path(workdir)))
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "shared": True}
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
