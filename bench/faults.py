"""Fault campaign: one User's burst or garbage against a quiet User, through `mp169 run` and a private
Mosquitto, with one inbound session and with several (`gateway.inbound_sessions`), side by side.

The gateway is the real daemon (`python -m gateway.cli run`, its own process, the MQTT sessions it
runs in production) on a private Mosquitto started with the shipped deploy/mosquitto.conf limits;
simulated devices (simulator.devices, answering at once) and the Users are MQTT clients of this
process. For each configuration (a fresh broker, store and daemon each):

1. quiet alone: the quiet User sends QUIET requests (4.8.1 to its own meters) paced at QUIET_RATE/s;
   latency = publish -> its first answer (the gateway's I99), one clock (the quiet User's own
   process, `Probe`).
2. burst: the loud User publishes BURST requests (4.8.1 to its meters) as fast as its client can,
   while the quiet User sends the same paced requests again.
3. garbage: the loud User publishes GARBAGE messages that are not XML as fast as it can, while the
   quiet User sends the paced requests again.

The loud and quiet Users are in different sessions when there are several (a quiet User in the loud
one's session is not protected: README, "Fair sessions"). Reported: the quiet User's p50/p99 in each
phase; for every request, whether it got exactly one first answer (I99, or E16921 when over the
forward limit) and exactly one final answer (the device's or E21): lost = none, duplicated = more than
one; every garbage message dead-lettered once; the gateway's peak RSS (VmHWM). Writes
bench/results/faults.json and prints Markdown.

    python -m bench.faults            # ~4 min: 20,000-request burst, 50,000 garbage messages
    python -m bench.faults --quick    # ~1.5 min: 2,000 and 5,000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from gateway.config import BrokerSettings
from gateway.duis import PARSER
from gateway.inbound import shard_of
from gateway.mqtt import MqttTransport
from gateway.shell import MAX_COMMIT_BATCH
from gateway.store import SqliteStore
from rules.codes import ResponseCode
from rules.domain import DeviceType, Eui, RequestId
from simulator.devices import DeviceConfig, DeviceSimulator
from simulator.estate import generate_estate
from simulator.mosquitto import Mosquitto, shipped_limits
from simulator.server import free_port
from simulator.traffic import load_templates, render

if TYPE_CHECKING:
    from gateway.transport import Message
    from rules.domain import DeviceRecord

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "faults.json"
SRV = "4.8.1"
QUIET = 200
SHARDS = 4
# (gateway.inbound_sessions, gateway.inflight_window): one session (as before), several with the
# default window, and several with a smaller window (the bound is proportional to it).
CONFIGS = ((1, 1000), (SHARDS, 1000), (SHARDS, 200))
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
    deadletters: int = 0

    async def __call__(self, message: Message) -> None:
        if message.topic == "dsp/deadletter":
            self.deadletters += 1
            self.changed.set()
            return
        request_id, code = header(message.payload)
        self.codes[request_id].append(code)
        self.first_at.setdefault(request_id, time.perf_counter())
        self.changed.set()

    async def until(self, ids: list[str], *, final: bool) -> None:
        async with asyncio.timeout(GUARD_SECONDS):
            while not all(self.done(i, final=final) for i in ids):
                self.changed.clear()
                await self.changed.wait()

    async def until_deadletters(self, count: int) -> None:
        async with asyncio.timeout(GUARD_SECONDS):
            while self.deadletters < count:
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


def users_apart(devices: tuple[DeviceRecord, ...]) -> tuple[Eui, Eui]:
    """The loud User (most meters) and the quiet one (most meters in another of SHARDS sessions)."""
    suppliers = Counter(d.import_supplier for d in devices if d.device_type is DeviceType.ESME)
    ranked = [supplier for supplier, _ in suppliers.most_common() if supplier is not None]
    loud = ranked[0]
    quiet = next(user for user in ranked[1:] if shard_of(user, SHARDS) != shard_of(loud, SHARDS))
    return loud, quiet


def longest_commit_seconds(metrics_port: int) -> float:
    """The gateway's longest store commit so far (`mp169_store_commit_seconds_max`, scraped from its
    Prometheus endpoint)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("mp169_store_commit_seconds_max "):
            return float(line.split()[1])
    raise RuntimeError("the gateway serves no mp169_store_commit_seconds_max")


def fairness_bound(
    *,
    sessions: int,
    window: int,
    broker_inflight: int,
    messages: int,
    publishes: int,
    seconds: float,
    longest_commit: float,
) -> dict[str, float]:
    """The stated bound (README, "Fair sessions") on a quiet User's wait beside a burst in another
    session, in seconds at the rates the gateway worked at in the same phase: its request gets one of
    the feed's `inflight_window` places within N + 1 releases (round-robin); its answer leaves behind at
    most 2 publishes of each message holding a place (a command and an I99) and the broker's in-flight
    window; and its commit waits for the commits of the messages holding places (at most
    MAX_COMMIT_BATCH a commit) and its own."""
    placing = (sessions + 1) / (messages / seconds)
    publishing = (2 * window + broker_inflight) / (publishes / seconds)
    committing = (math.ceil(window / MAX_COMMIT_BATCH) + 1) * longest_commit
    return {
        "placing_s": round(placing, 3),
        "publishing_s": round(publishing, 3),
        "committing_s": round(committing, 3),
        "bound_ms": round(1000 * (placing + publishing + committing), 1),
    }


def duplicate_refusals(log: Path, limit: int = 20) -> dict[str, Any]:
    """The gateway's E16901 refusals in its JSON log: how many, and the first few with the counter each
    was held against (a burst's requests come in counter order, so any is a delivery out of order)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if '"duplicate-request-id"' not in line:
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            found.append({key: entry.get(key) for key in ("timestamp", "request_id", "detail")})
    return {"count": len(found), "first": found[:limit]}


def garbage_for(count: int) -> list[tuple[str, bytes]]:
    return [("", b"<not-xml %d" % n) for n in range(count)]


@dataclass(frozen=True)
class Probe:
    """The quiet User's run, as its own process reports it: latency to the first answer, by RequestID,
    and every answer's code. Its own process: in this one it would wait behind the loud User's answers
    and the device commands this process parses, and the bench would measure itself."""

    latencies: dict[str, float]
    codes: dict[str, list[str]]


def quiet_probe(url: str, user: str, requests: list[tuple[str, bytes]]) -> Probe:
    return asyncio.run(_quiet_probe(url, user, requests))


async def _quiet_probe(url: str, user: str, requests: list[tuple[str, bytes]]) -> Probe:
    answers = Answers()
    client = MqttTransport(BrokerSettings(url=url), "bench-quiet")
    await client.start([f"dsp/out/{user}"], answers)
    try:
        sent = await paced(client, f"dsp/in/{user}", requests)
        await answers.until(list(sent), final=True)
    finally:
        await client.abort()
    return Probe({i: answers.first_at[i] - t for i, t in sent.items()}, dict(answers.codes))


async def campaign(
    config: tuple[int, int], burst: int, garbage: int, workdir: Path, pool: ProcessPoolExecutor
) -> dict[str, Any]:
    sessions, window = config
    limits = shipped_limits()
    broker = Mosquitto(workdir / "mosquitto", limits)
    metrics_port = free_port()
    broker.start()
    estate = generate_estate(1, 300)
    async with SqliteStore(workdir / "gw.sqlite3") as store:
        await store.upsert_devices(estate.devices)
        await store.upsert_users(estate.users)
    config_file = workdir / "config.toml"
    config_file.write_text(
        f'[broker]\nurl = "{broker.url}"\n[store]\npath = "{workdir / "gw.sqlite3"}"\n'
        f'[gateway]\nmetrics_port = {metrics_port}\nlog_level = "info"\ninbound_sessions = {sessions}\n'
        f"inflight_window = {window}\n"
        # The bench's requests are unsigned (verification's cost is bench.gateway_mqtt --verify's).
        "[signing]\nverify = false\n"
    )
    log = workdir / "gateway.log"
    with log.open("wb") as stderr:
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "run", "--config", str(config_file),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    async with asyncio.timeout(GUARD_SECONDS):  # subscribed: requests published now are not dropped
        while b"daemon-ready" not in log.read_bytes():  # noqa: ASYNC110 - another process's log file
            await asyncio.sleep(0.05)
    settings = BrokerSettings(url=broker.url)
    loud, quiet = users_apart(estate.devices)
    answers = Answers()
    watcher = MqttTransport(settings, "bench-watcher")
    await watcher.start([f"dsp/out/{loud}", "dsp/deadletter"], answers)
    device_client = MqttTransport(settings, "bench-devices")
    devices = DeviceSimulator(device_client, DeviceConfig())
    await devices.start()
    loud_client = MqttTransport(settings, "bench-loud")
    await loud_client.start([], answers)
    loop = asyncio.get_running_loop()
    quiet_meters = meters_of(estate.devices, quiet)
    loud_topic = f"dsp/in/{loud}"

    async def probe(first: int) -> Probe:
        requests = requests_for(quiet, quiet_meters, first, QUIET)
        return await loop.run_in_executor(pool, quiet_probe, broker.url, str(quiet), requests)

    try:
        # Warm-up: the daemon is up and routing once one request is answered (and the probe's
        # process is running).
        warm = await loop.run_in_executor(
            pool, quiet_probe, broker.url, str(quiet), requests_for(quiet, quiet_meters, 1, 1)
        )
        assert len(warm.latencies) == 1
        alone = await probe(2)
        loud_requests = requests_for(loud, meters_of(estate.devices, loud), 1, burst)
        started = time.perf_counter()
        _, with_burst = await asyncio.gather(flood(loud_client, loud_topic, loud_requests), probe(2 + QUIET))
        loud_ids = [i for i, _ in loud_requests]
        await answers.until(loud_ids, final=True)
        burst_seconds = time.perf_counter() - started
        started = time.perf_counter()
        _, with_garbage = await asyncio.gather(
            flood(loud_client, loud_topic, garbage_for(garbage)), probe(2 + 2 * QUIET)
        )
        await answers.until_deadletters(garbage)
        garbage_seconds = time.perf_counter() - started
        rss = peak_rss_mb(daemon.pid)
        longest_commit = await asyncio.to_thread(longest_commit_seconds, metrics_port)
    finally:
        daemon.terminate()
        await daemon.wait()
        for transport in (loud_client, device_client, watcher):
            await transport.abort()
        broker.stop()
    quiet_answers = Answers()
    for run in (alone, with_burst, with_garbage):
        quiet_answers.codes.update(run.codes)
    burst_outcome = outcome(answers, loud_ids)
    forwarded = burst_outcome.get(f"code_{ResponseCode.ACKNOWLEDGED.value}", 0) + QUIET
    refused = burst_outcome.get(f"code_{ResponseCode.GATEWAY_BUSY.value}", 0)
    bound = partial(
        fairness_bound,
        sessions=sessions,
        window=window,
        broker_inflight=int(limits["max_inflight_messages"]),
        longest_commit=longest_commit,
    )
    # Burst: each forward is a request and a device answer in, a command, an I99 and the answer out.
    bounds = {
        "quiet_beside_burst": bound(
            messages=2 * forwarded + refused, publishes=3 * forwarded + refused, seconds=burst_seconds
        ),
        "quiet_beside_garbage": bound(
            messages=garbage + 2 * QUIET, publishes=garbage + 3 * QUIET, seconds=garbage_seconds
        ),
    }
    return {
        "inbound_sessions": sessions,
        "inflight_window": window,
        "loud_user": str(loud),
        "quiet_user": str(quiet),
        "burst_seconds": round(burst_seconds, 2),
        "garbage_seconds": round(garbage_seconds, 2),
        "quiet_alone": percentiles(list(alone.latencies.values())),
        "quiet_beside_burst": percentiles(list(with_burst.latencies.values())),
        "quiet_beside_garbage": percentiles(list(with_garbage.latencies.values())),
        "burst_outcome": burst_outcome,
        # The bound holds for a quiet User in a session of its own (inbound_sessions > 1) only.
        "stated_bound": bounds if sessions > 1 else None,
        "longest_commit_s": longest_commit,
        "quiet_outcome": outcome(
            quiet_answers, [*alone.latencies, *with_burst.latencies, *with_garbage.latencies]
        ),
        "garbage_deadlettered": answers.deadletters,
        "gateway_peak_rss_mb": rss,
        "daemon_exit": daemon.returncode,
        "duplicate_request_id_refusals": duplicate_refusals(log),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        (
            f"Quiet User at {QUIET_RATE:g}/s beside one User's burst of {result['burst_requests']:,} "
            f"requests or {result['garbage_messages']:,} garbage messages (p50 / p99, ms):"
        ),
        "",
        (
            "| inbound sessions | window | alone | beside the burst (bound) | beside the garbage (bound) "
            "| burst E16921 | burst lost / dup | garbage dead-lettered | peak RSS |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        burst = run["burst_outcome"]
        bounds = run["stated_bound"] or {}
        cells = [
            f"{run[phase]['p50_ms']} / {run[phase]['p99_ms']}"
            + (f" ({bounds[phase]['bound_ms']})" if phase in bounds else "")
            for phase in ("quiet_alone", "quiet_beside_burst", "quiet_beside_garbage")
        ]
        lines.append(
            f"| {run['inbound_sessions']} | {run['inflight_window']} | {' | '.join(cells)} | "
            f"{burst.get('code_E16921', 0):,} | {burst['lost']} / "
            f"{burst['duplicated_first'] + burst['duplicated_final']} | {run['garbage_deadlettered']:,} | "
            f"{run['gateway_peak_rss_mb']} MB |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2,000-request burst, 5,000 garbage messages")
    args = parser.parse_args()
    burst, garbage = (2_000, 5_000) if args.quick else (20_000, 50_000)
    runs = []
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for config in CONFIGS:
            with tempfile.TemporaryDirectory(prefix="mp169-faults-") as workdir:
                runs.append(asyncio.run(campaign(config, burst, garbage, Path(workdir), pool)))
    result: dict[str, Any] = {"burst_requests": burst, "garbage_messages": garbage, "runs": runs}
    one = runs[0]
    # Each run's quiet p99 beside the burst and beside the garbage, against one session's.
    result["p99_ratios_to_one_session"] = [
        {
            "inbound_sessions": run["inbound_sessions"],
            "inflight_window": run["inflight_window"],
            **{
                phase: round(run[phase]["p99_ms"] / one[phase]["p99_ms"], 3)
                for phase in ("quiet_beside_burst", "quiet_beside_garbage")
            },
        }
        for run in runs[1:]
    ]
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "shared": True}
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    if args.quick:
        print(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
