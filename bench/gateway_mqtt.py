"""End to end through a real Mosquitto (QoS 1): the gateway against a zero-logic relay on the same client.

Both systems under test use gateway.mqtt.MqttTransport (gmqtt), the same private broker, the same
requests and the same in-flight window, in the same run, alternating (relay, gateway, relay, ...):

- relay: subscribes <root>/dsp/in/+ and republishes each payload unchanged to
  <root>/dsp/device/<topic user>/cmd; nothing else.
- gateway: `GatewayService` as `mp169 run` runs it (SQLite store seeded with a simulated estate,
  the packaged rules, the outcome recorder, metrics off the network): it parses, decides, commits
  the RequestID counters, publishes the forwarded command to <root>/dsp/device/<target>/cmd and an
  I99 acknowledgement to <root>/dsp/out/<user>, and only then acknowledges the request.

The requests are real DUIS request shapes (the sample requests rendered by simulator.traffic over a
simulated estate, the traffic mix without flag requests and bad input), filtered to the ones the rules
forward, so each produces exactly one command; its RequestID identifies it at the sink. The "devices"
client subscribes <root>/dsp/device/+/cmd; the "users" client subscribes <root>/dsp/out/+ and checks
that every request got its I99 (the relay sends none).

1. Throughput (maximum rate): N requests are queued at the broker for the system's persistent session
   while it is offline; it then connects and the broker feeds it as fast as its Receive Maximum
   allows. Rate = (N - 1) / (first -> last command arriving at the sink). Median over rounds; the
   headline is median(gateway) / median(relay).
2. Latency at half load: requests paced at half the gateway's median maximum rate, through both
   systems in turn. Latency = command arrival at the sink - publish by the load generator (one clock:
   both are in the parent process); the first 10 % of each run is warm-up. Added latency = gateway
   p50/p99 - relay p50/p99 (medians over rounds).

Every run reports the CPU the system, the broker and the driver used in its measured window, and each
gateway run the durations of its SQLite write transactions (the Committer's, which every forward waits
for, and the outcome recorder's, on the same database file): the tails come from there.

    python -m bench.gateway_mqtt              # ~2 min: 5+5 runs of 20000, 3+3 latency runs of 8 s
    python -m bench.gateway_mqtt --quick      # ~25 s: 1+1 runs of 5000, 1+1 latency runs of 3 s
    python -m bench.gateway_mqtt --profile    # plus cProfiled gateway runs (max rate, half load)
    python -m bench.gateway_mqtt --py-spy     # plus py-spy sampled gateway runs (pip install py-spy)
    python -m bench.gateway_mqtt --floor      # plus the floor: fan-out relay, stubbed parse and decide
    python -m bench.gateway_mqtt --uvloop     # plus the gateway on uvloop (pip install uvloop)

Needs mosquitto (started privately on a free port). Writes bench/results/gateway_mqtt.json and prints
Markdown.
"""

# Process layout. The system under test (relay or gateway) runs alone in a child process (this module
# with --serve); the load generator, the "devices" sink and the "users" client share the parent's event
# loop; Mosquitto is a third process. All in one event loop, the driver's own per-message work (a
# publish, one or two receptions, bookkeeping: about as much as the whole relay) would be added to both
# sides: it would pull the ratio towards 1 and flatter the gateway, and it would cap the relay. For the
# throughput runs the requests are queued at the broker before the system connects, so the generator
# does not even run during the measurement. On a 2-core machine the three processes still share the
# cores: every run reports the CPU each of them used in the measured window, to show which one limited.

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import os
import pickle
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmqtt.mqtt.protocol import BaseMQTTProtocol

from gateway import router, signing
from gateway.budget import STAGES, LatencyBudget
from gateway.config import BrokerSettings, Settings, SigningSettings
from gateway.duis import ParseError, parse_request
from gateway.facts import request_facts
from gateway.logging import configure_logging
from gateway.metrics import Metrics
from gateway.mqtt import MqttTransport
from gateway.pki import PkiLayout, init_pki
from gateway.responses import response_xml
from gateway.service import GatewayService
from gateway.signing import dsp_credentials
from gateway.store import SqliteStore
from gateway.topics import Topics
from gateway.view import RoutingView
from rules.codes import ResponseCode
from rules.decide import Action, Decision, RequestFacts, decide
from rules.domain import DCC_EUI, Eui, RequestId, utc_now
from rules.table import default_table
from simulator.estate import Estate, generate_estate
from simulator.mosquitto import Mosquitto, mosquitto_binary
from simulator.recording import PublishItem
from simulator.replay import Signatures as Signers
from simulator.traffic import TrafficMix, generate_traffic

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gateway.transport import Message

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gateway_mqtt.json"
WINDOW = 1000  # Receive Maximum of every client (the gateway's default inflight_window) and the broker's
GUARD_SECONDS = 120.0
WARMUP_SHARE = 0.1
TARGET_RATIO = 0.7
TARGET_ADDED_P99_MS = 5.0
RELAY, GATEWAY, BASELINE, VERIFIED = "relay", "gateway", "baseline", "verified"
FANOUT, STUBBED, UNSIGNED, UVLOOP = "relay-fanout", "stubbed", "stubbed-unsigned", "uvloop"
PROCESSES, VERIFIED_PROCESSES, COALESCED = "signing-processes", "verified-processes", "coalesced-writes"
GATEWAYS = frozenset(
    {GATEWAY, BASELINE, VERIFIED, STUBBED, UNSIGNED, UVLOOP, PROCESSES, VERIFIED_PROCESSES, COALESCED}
)
"""VERIFIED is this gateway verifying every request's signature (--verify): its workload is signed.
The floor (--floor): FANOUT is the relay publishing what the gateway publishes per request (the
command and an I99 answer to the user); STUBBED is the gateway with parse, facts and decide replaced by
lookups of their results (computed in the parent, handed over in a file); UNSIGNED is STUBBED without
the DSP's signature on the answers. UVLOOP (--uvloop) is the gateway on uvloop's event loop.
PROCESSES and VERIFIED_PROCESSES (--signing-processes N) are GATEWAY and VERIFIED signing (and
verifying) in N worker processes (signing.processes) instead of the thread pool."""
SIGNING_PROCESSES = [0]  # set from --signing-processes
"""COALESCED (--coalesce) is a prototype of publish batching: the gateway with gmqtt's socket writes
of one event-loop iteration (publishes, PUBACKs) joined into one write (`coalesce_writes`)."""
ANSWERED = frozenset({*GATEWAYS, FANOUT})
"""The systems that answer every request on <root>/dsp/out/<user>."""
STUBS: list[Path] = []  # set from --floor: the parse and decide results the stubbed gateways look up
BASELINE_CHECKOUT: list[Path] = []  # set from --baseline
BUDGET = [False]  # set from --budget
PKI: list[Path] = []  # set from --verify: the test PKI the verified gateway trusts
"""BASELINE is the gateway of another checkout (--baseline DIR), e.g. the code before a redesign."""
# Forwardable traffic only: no flag requests (store reads, answered locally), no bad input.
MIX = TrafficMix(
    flag_requests=0,
    change_of_supplier=0,
    change_of_tenancy=0,
    spoofed=0,
    malformed=0,
    invalid=0,
    flagged_focus=0,
)
_TICKS = os.sysconf("SC_CLK_TCK")
_REQUEST_ID = b"RequestID>"


# -- workload ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    user: str
    payload: bytes
    key: bytes
    """The RequestID text: how the sink maps a command back to its request."""


def request_key(payload: bytes) -> bytes:
    start = payload.find(_REQUEST_ID) + len(_REQUEST_ID)
    return payload[start : payload.find(b"<", start)]


async def seed(estate: Estate, path: Path) -> RoutingView:
    async with SqliteStore(path) as store:
        await store.upsert_devices(estate.devices)
        await store.upsert_users(estate.users)
        return await RoutingView.load(store)


async def seed_baseline(seed_number: int, premises: int, path: Path) -> None:
    """The same estate in a store made by the baseline checkout's own code (its schema version)."""
    script = (
        "import asyncio, sys; from pathlib import Path; from bench.gateway_mqtt import seed; "
        "from simulator.estate import generate_estate; "
        "asyncio.run(seed(generate_estate(int(sys.argv[1]), int(sys.argv[2])), Path(sys.argv[3])))"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(seed_number), str(premises), str(path), cwd=BASELINE_CHECKOUT[0]
    )
    if await process.wait() != 0:
        raise RuntimeError(f"the baseline checkout {BASELINE_CHECKOUT[0]} could not seed its store")


def forwardable(estate: Estate, view: RoutingView, seed_number: int, count: int) -> list[Request]:
    """`count` requests of the traffic mix that the packaged rules forward (decided as the router
    does, in stream order, so RequestID counters rise per originator)."""
    table = default_table()
    found: list[Request] = []
    size = count + count // 10 + 100
    while len(found) < count:
        found.clear()
        for item in generate_traffic(estate, seed_number, size, MIX).items:
            if not isinstance(item, PublishItem):
                continue
            request = parse_request(item.payload)
            if isinstance(request, ParseError):
                continue
            devices = {e: f for e in request.concerned_devices if (f := view.device_facts(e)) is not None}
            facts = RequestFacts(view.roles(request.request_id.originator), devices, DCC_EUI)
            if decide(request, facts, table).action is Action.FORWARD:
                found.append(Request(item.topic.rsplit("/", 1)[1], item.payload, request_key(item.payload)))
                if len(found) == count:
                    break
        size *= 2
    return found


# -- CPU accounting --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass(slots=True)
class CpuWindow:
    pids: dict[str, int]
    started: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self.started = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def end(self) -> None:
        self.ended = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def report(self, seconds: float, messages: int) -> dict[str, dict[str, float]]:
        """Per process: share of one core over the window (%) and CPU µs per request."""
        used = {name: self.ended.get(name, 0.0) - self.started.get(name, 0.0) for name in self.pids}
        return {
            name: {
                "core_percent": round(100 * value / seconds, 1) if seconds > 0 else 0.0,
                "us_per_request": round(1e6 * value / messages, 1) if messages else 0.0,
            }
            for name, value in used.items()
        }


# -- the driver's clients ----------------------------------------------------------------------------


class Sink:
    """Commands on <root>/dsp/device/+/cmd: arrival time per request, first and last arrival."""

    def __init__(self, keys: dict[bytes, int], cpu: CpuWindow | None = None) -> None:
        self.keys = keys
        self.arrived = [0] * len(keys)
        self.unique = 0
        self.duplicates = 0
        self.unknown = 0
        self.first = 0
        self.last = 0
        self.cpu = cpu
        self.complete = asyncio.Event()

    async def __call__(self, message: Message) -> None:
        now = time.perf_counter_ns()
        number = self.keys.get(request_key(message.payload))
        if number is None:
            self.unknown += 1
            return
        if self.arrived[number]:
            self.duplicates += 1
            return
        self.arrived[number] = now
        self.unique += 1
        if self.unique == 1:
            self.first = now
            if self.cpu is not None:
                self.cpu.start()
        if self.unique == len(self.arrived):
            self.last = now
            if self.cpu is not None:
                self.cpu.end()
            self.complete.set()


class Users:
    """Answers on <root>/dsp/out/+: counts them and the I99 acknowledgements among them."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.answers = 0
        self.acknowledged = 0
        self.complete = asyncio.Event()
        if expected == 0:
            self.complete.set()

    async def __call__(self, message: Message) -> None:
        self.answers += 1
        if b">I99<" in message.payload:
            self.acknowledged += 1
        if self.answers >= self.expected:
            self.complete.set()


async def nothing(_message: Message) -> None:
    return


# -- the system under test (child process) ---------------------------------------------------------


def topics_of(root: str) -> Topics:
    return Topics(
        inbound=f"{root}/dsp/in",
        outbound=f"{root}/dsp/out",
        devices=f"{root}/dsp/device",
        deadletter=f"{root}/dsp/deadletter",
    )


def subscriptions(kind: str, root: str) -> list[str]:
    topics = topics_of(root)
    return topics.subscriptions() if kind in GATEWAYS else [f"{topics.inbound}/+"]


def commit_summary(metrics: Metrics) -> dict[str, float]:
    """The gateway's store commits, from its own Prometheus histograms (count, items, mean, p99 bucket)."""
    seconds = {s.name: s.value for m in metrics.commit_seconds.collect() for s in m.samples}
    items = {s.name: s.value for m in metrics.commit_batch_size.collect() for s in m.samples}
    count = seconds.get("mp169_store_commit_seconds_count", 0.0)
    if not count:
        return {}
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for m in metrics.commit_seconds.collect()
        for s in m.samples
        if s.name.endswith("_bucket")
    )
    p99 = next(bound for bound, cumulative in buckets if cumulative >= 0.99 * count)
    return {
        "transactions": int(count),
        "items_per_transaction": round(items.get("mp169_store_commit_batch_size_sum", 0.0) / count, 2),
        "mean_ms": round(seconds["mp169_store_commit_seconds_sum"] / count * 1e3, 3),
        "p99_bucket_ms": round(p99 * 1e3, 3),
    }


def stub_results(view: RoutingView, workloads: Sequence[Sequence[Request]], path: Path) -> None:
    """What parse, facts and decide make of every request, for the stubbed gateways to look up."""
    table = default_table()
    results: dict[bytes, tuple[Any, RequestFacts, Decision]] = {}
    for workload in workloads:
        for request in workload:
            parsed = parse_request(request.payload)
            assert not isinstance(parsed, ParseError)
            facts = request_facts(parsed, view, DCC_EUI)
            results[request.payload] = (parsed, facts, decide(parsed, facts, table))
    path.write_bytes(pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL))


def stub_routing(path: Path) -> None:
    """Replace the router's parse, facts and decide by lookups of their results (the floor)."""
    results = pickle.loads(path.read_bytes())
    by_id = {parsed.request_id: (facts, decision) for parsed, facts, decision in results.values()}
    router.parse_request = lambda payload, max_bytes: results[payload][0]  # noqa: ARG005
    router.request_facts = lambda request, _view, _dcc: by_id[request.request_id][0]
    router.decide = lambda request, _facts, _table: by_id[request.request_id][1]


def coalesce_writes() -> None:
    """Join gmqtt's packet writes of one event-loop iteration into one socket write (a prototype:
    a DISCONNECT written just before the transport closes would be lost, which the bench ignores)."""
    write = BaseMQTTProtocol.write_data
    pending: dict[int, list[bytes]] = {}

    def flush(protocol: BaseMQTTProtocol) -> None:
        write(protocol, b"".join(pending.pop(id(protocol))))

    def write_data(protocol: BaseMQTTProtocol, data: bytes) -> None:
        chunks = pending.get(id(protocol))
        if chunks is None:
            chunks = pending[id(protocol)] = []
            asyncio.get_running_loop().call_soon(flush, protocol)
        chunks.append(data)

    BaseMQTTProtocol.write_data = write_data


def signed_answer() -> bytes:
    """An I99 acknowledgement as the gateway sends it (signed by the packaged DSP key), for the
    fan-out relay to publish beside each command."""
    key, certificate = dsp_credentials(SigningSettings())
    unsigned = response_xml(
        request_id=RequestId(Eui("90-B3-D5-1F-30-01-00-00"), Eui("00-DB-12-34-56-78-90-A0"), 1),
        code=ResponseCode.ACKNOWLEDGED,
        service_reference=None,
        srv="4.1.1",
        at=utc_now(),
    )
    return signing.sign(unsigned, key=key, certificate=certificate)


async def serve(
    kind: str,
    url: str,
    root: str,
    *,
    client_id: str,
    store: Path,
    profile: Path | None,
    budget_on: bool,
) -> None:
    """Run the relay or the gateway until a line arrives on stdin; then report on stdout."""
    configure_logging("warning")
    metrics = Metrics()
    budget = LatencyBudget() if budget_on else None
    topics = topics_of(root)
    profiler = cProfile.Profile() if profile else None
    service: GatewayService | None = None
    if kind in {GATEWAY, VERIFIED, STUBBED, UNSIGNED}:
        signing: dict[str, object] = {"verify": False}
        if kind == VERIFIED:
            pki = PkiLayout(PKI[0])
            signing = {
                "verify": True,
                "certificates": str(pki.certificates),
                "dsp_key": str(pki.key(DCC_EUI)),
                "dsp_certificate": str(pki.certificate(DCC_EUI)),
            }
        signing["processes"] = SIGNING_PROCESSES[0]
        settings = Settings.model_validate(
            {
                "broker": {"url": url},
                "store": {"path": str(store)},
                "topics": {
                    "inbound": topics.inbound,
                    "outbound": topics.outbound,
                    "devices": topics.devices,
                    "deadletter": topics.deadletter,
                },
                "gateway": {
                    "metrics_port": 0,
                    "log_level": "warning",
                    "client_id": client_id,
                    "inflight_window": WINDOW,
                },
                # "gateway": the estate's requests are unsigned, verification off (routing and the DSP's
                # signature on every answer); "verified": the same requests signed, every one verified.
                "signing": signing,
            }
        )
        # As gateway.daemon.serve builds it.
        transport = MqttTransport(
            settings.broker,
            client_id=settings.gateway.client_id,
            receive_maximum=settings.gateway.inflight_window,
        )
        service = await GatewayService.start(settings, transport, metrics=metrics, budget=budget)
        if kind == UNSIGNED:
            service.shell._sign = None  # noqa: SLF001 - the floor without the DSP's signatures
    else:
        transport = MqttTransport(BrokerSettings(url=url), client_id, receive_maximum=WINDOW)
        inbound = f"{topics.inbound}/"
        devices = f"{topics.devices}/"
        outbound = f"{topics.outbound}/"
        answer = signed_answer() if kind == FANOUT else None

        async def relay(message: Message) -> None:
            user = message.topic[len(inbound) :]
            await transport.publish(f"{devices}{user}/cmd", message.payload)
            if answer is not None:
                await transport.publish(f"{outbound}{user}", answer)

        await transport.start(subscriptions(kind, root), relay)
    if profiler:
        # After the start: loading the estate into the routing view is not per-request work.
        profiler.enable()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    if profiler and profile:
        profiler.disable()
        profiler.dump_stats(profile)
    report = {
        "handler_errors": transport.handler_errors,
        "sqlite": {"committer": commit_summary(metrics)},
        "budget": budget.table() if budget is not None else {},
    }
    if service is not None:
        await service.stop()
    else:
        await transport.stop()
    print(json.dumps(report), flush=True)


class Child:
    """The system under test in a child process (see the process layout above)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def spawn(
        cls,
        kind: str,
        url: str,
        root: str,
        *,
        client_id: str,
        store: Path,
        profile: Path | None = None,
        budget: bool = False,
    ) -> Child:
        """Start the child; `ready` waits until it is connected (its pid is known before that)."""
        serves = {
            BASELINE: GATEWAY,
            UVLOOP: GATEWAY,
            PROCESSES: GATEWAY,
            COALESCED: GATEWAY,
            VERIFIED_PROCESSES: VERIFIED,
        }.get(kind, kind)
        command = [sys.executable, "-m", "bench.gateway_mqtt", "--serve", serves, "--url", url]
        if serves == VERIFIED:
            command += ["--pki", str(PKI[0])]
        if kind in {PROCESSES, VERIFIED_PROCESSES}:
            command += ["--signing-processes", str(SIGNING_PROCESSES[0])]
        if kind in {STUBBED, UNSIGNED}:
            command += ["--stubs", str(STUBS[0])]
        if kind == UVLOOP:
            command += ["--uvloop"]
        if kind == COALESCED:
            command += ["--coalesce"]
        command += ["--root", root, "--client-id", client_id, "--store", str(store)]
        if profile is not None:
            command += ["--profile-to", str(profile)]
        if budget:
            command += ["--budget-child"]
        # The baseline runs its own checkout's code (python -m puts the working directory first).
        checkout = BASELINE_CHECKOUT[0] if kind == BASELINE else ROOT
        process = await asyncio.create_subprocess_exec(
            *command, cwd=checkout, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        return cls(process)

    async def ready(self) -> None:
        line = await self.readline()
        if line != "ready":
            raise RuntimeError(f"the system under test did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.process.pid

    async def readline(self) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(GUARD_SECONDS):
            return (await self.process.stdout.readline()).decode().strip()

    async def stop(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(b"stop\n")
        await self.process.stdin.drain()
        report = await self.readline()
        await self.process.wait()
        return json.loads(report) if report else {"exit": self.process.returncode}

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


# -- runs ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThroughputRun:
    system: str
    round: int
    requests: int
    seconds: float
    requests_per_second: float
    lost: int
    duplicates: int
    acknowledged: int
    handler_errors: int
    cpu: dict[str, dict[str, float]]
    sqlite: dict[str, dict[str, float]]


@dataclass(frozen=True, slots=True)
class LatencyRun:
    system: str
    round: int
    requests: int
    offered_per_second: float
    achieved_per_second: float
    samples: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    lost: int
    duplicates: int
    acknowledged: int
    handler_errors: int
    cpu: dict[str, dict[str, float]]
    sqlite: dict[str, dict[str, float]]
    budget: dict[str, dict[str, float]] = field(default_factory=dict)


def percentile(ordered: Sequence[int], share: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in ms."""
    index = min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))
    return ordered[index] / 1e6


class Bench:
    def __init__(self, broker: Mosquitto, folder: Path, store_template: Path) -> None:
        self.broker = broker
        self.folder = folder
        self.store_template = store_template
        self.settings = BrokerSettings(url=broker.url)
        # The driver's clients keep no session once disconnected.
        self.driver_settings = BrokerSettings(url=broker.url, session_expiry_seconds=0)
        self.runs = 0

    def _next(self, system: str) -> tuple[str, str, Path]:
        self.runs += 1
        root = f"b{self.runs}"
        store = self.folder / f"{root}.sqlite3"
        if system in GATEWAYS:
            # A fresh store (RequestID counters from zero), made by the code that will open it.
            template = (
                self.store_template.with_suffix(".baseline") if system == BASELINE else self.store_template
            )
            shutil.copyfile(template, store)
        return root, f"{root}-{system}", store

    async def _clients(self, root: str, sink: Sink, users: Users) -> tuple[MqttTransport, MqttTransport]:
        devices = MqttTransport(self.driver_settings, f"{root}-devices", receive_maximum=WINDOW)
        await devices.start([f"{root}/dsp/device/+/cmd"], sink)
        answers = MqttTransport(self.driver_settings, f"{root}-users", receive_maximum=WINDOW)
        await answers.start([f"{root}/dsp/out/+"], users)
        return devices, answers

    def _pids(self, child: Child) -> dict[str, int]:
        assert self.broker._process is not None  # noqa: SLF001 - the broker's pid, for its CPU time
        return {"system": child.pid, "broker": self.broker._process.pid, "driver": os.getpid()}  # noqa: SLF001

    async def throughput(
        self,
        system: str,
        round_number: int,
        workload: list[Request],
        *,
        profile: Path | None = None,
        spy: Path | None = None,
    ) -> ThroughputRun:
        root, client_id, store = self._next(system)
        # The system's persistent session, created while it is away: the broker queues the backlog.
        session = MqttTransport(self.settings, client_id, receive_maximum=WINDOW)
        await session.start(subscriptions(system, root), nothing)
        await session.stop()
        producer = MqttTransport(self.driver_settings, f"{root}-load")
        await producer.start([], nothing)
        for request in workload:
            await producer.publish(f"{root}/dsp/in/{request.user}", request.payload)
        await producer.stop()  # returns once the broker acknowledged (queued) every request
        cpu = CpuWindow({})
        sink = Sink({request.key: number for number, request in enumerate(workload)}, cpu)
        users = Users(len(workload) if system in ANSWERED else 0)
        devices, answers = await self._clients(root, sink, users)
        child: Child | None = None
        try:
            child = await Child.spawn(
                system, self.broker.url, root, client_id=client_id, store=store, profile=profile
            )
            # Known before the backlog can reach the sink: its first arrival starts the CPU window.
            cpu.pids = self._pids(child)
            await child.ready()
            # After the start (loading the estate is not per-request work): the first few ms are missed.
            sampler = await PySpy.attach(child.pid, spy) if spy is not None else None
            async with asyncio.timeout(GUARD_SECONDS):
                await sink.complete.wait()
                await users.complete.wait()
            if sampler is not None:
                await sampler.stop()
            report = await child.stop()
        finally:
            if child is not None:
                child.kill()
            await devices.stop()
            await answers.stop()
        seconds = (sink.last - sink.first) / 1e9
        return ThroughputRun(
            system=system,
            round=round_number,
            requests=len(workload),
            seconds=round(seconds, 4),
            requests_per_second=round((len(workload) - 1) / seconds),
            lost=len(workload) - sink.unique,
            duplicates=sink.duplicates,
            acknowledged=users.acknowledged,
            handler_errors=int(report.get("handler_errors", -1)),
            cpu=cpu.report(seconds, len(workload)),
            sqlite=report.get("sqlite") or {},
        )

    async def latency(
        self,
        system: str,
        round_number: int,
        workload: list[Request],
        rate: float,
        *,
        profile: Path | None = None,
        spy: Path | None = None,
    ) -> LatencyRun:
        root, client_id, store = self._next(system)
        sink = Sink({request.key: number for number, request in enumerate(workload)})
        users = Users(len(workload) if system in ANSWERED else 0)
        devices, answers = await self._clients(root, sink, users)
        producer = MqttTransport(self.driver_settings, f"{root}-load")
        await producer.start([], nothing)
        child: Child | None = None
        sent = [0] * len(workload)
        cpu = CpuWindow({})
        try:
            child = await Child.spawn(
                system,
                self.broker.url,
                root,
                client_id=client_id,
                store=store,
                profile=profile,
                budget=BUDGET[0] and system == GATEWAY,
            )
            await child.ready()
            cpu.pids = self._pids(child)
            sampler = await PySpy.attach(child.pid, spy) if spy is not None else None
            await asyncio.sleep(0.2)  # let the child settle after its start
            interval = 1e9 / rate
            cpu.start()
            begin = time.perf_counter_ns() + 1_000_000
            for number, request in enumerate(workload):
                due = begin + int(number * interval)
                now = time.perf_counter_ns()
                if due > now:
                    # asyncio sleeps in whole milliseconds: requests due meanwhile go out together.
                    await asyncio.sleep((due - now) / 1e9)
                sent[number] = time.perf_counter_ns()
                await producer.publish(f"{root}/dsp/in/{request.user}", request.payload)
            finished = time.perf_counter_ns()
            async with asyncio.timeout(GUARD_SECONDS):
                await sink.complete.wait()
                await users.complete.wait()
            cpu.end()
            if sampler is not None:
                await sampler.stop()
            report = await child.stop()
        finally:
            if child is not None:
                child.kill()
            await producer.stop()
            await devices.stop()
            await answers.stop()
        skip = int(len(workload) * WARMUP_SHARE)
        latencies = sorted(
            sink.arrived[number] - sent[number]
            for number in range(skip, len(workload))
            if sink.arrived[number]
        )
        seconds = (finished - begin) / 1e9
        return LatencyRun(
            system=system,
            round=round_number,
            requests=len(workload),
            offered_per_second=round(rate),
            achieved_per_second=round(len(workload) / seconds),
            samples=len(latencies),
            p50_ms=round(percentile(latencies, 0.50), 3),
            p90_ms=round(percentile(latencies, 0.90), 3),
            p99_ms=round(percentile(latencies, 0.99), 3),
            max_ms=round(latencies[-1] / 1e6, 3),
            lost=len(workload) - sink.unique,
            duplicates=sink.duplicates,
            acknowledged=users.acknowledged,
            handler_errors=int(report.get("handler_errors", -1)),
            cpu=cpu.report((sink.last - begin) / 1e9, len(workload)),
            sqlite=report.get("sqlite") or {},
            budget=report.get("budget") or {},
        )


# -- profile ---------------------------------------------------------------------------------------

_AREAS = (
    ("gmqtt", "gmqtt (MQTT client)"),
    ("asyncio", "asyncio"),
    ("aiosqlite", "aiosqlite / sqlite3"),
    ("sqlite3", "aiosqlite / sqlite3"),
    ("prometheus_client", "prometheus_client (metrics)"),
    ("structlog", "structlog"),
    ("gateway/duis", "gateway.duis (parse)"),
    ("gateway/responses", "gateway.responses (I99 XML)"),
    ("gateway/outcomes", "gateway.outcomes (recorder)"),
    ("gateway/router", "gateway.router"),
    ("gateway/shell", "gateway.shell"),
    ("gateway/mqtt", "gateway.mqtt"),
    ("gateway/view", "gateway.view"),
    ("gateway/model", "gateway.model"),
    ("rules/", "rules (decide)"),
)


def _area(filename: str, name: str) -> str:
    for fragment, area in _AREAS:
        if f"/{fragment}" in filename:
            return area
    if filename == "~":
        builtin = name.strip("<>").removeprefix("built-in method ").removeprefix("method '")
        if "lxml" in builtin or "etree" in builtin:
            return "lxml (C)"
        return "builtins: " + builtin.split(" ")[0].rstrip("'")
    return Path(filename).name


def summarise_profile(path: Path, requests: int, top: int = 25) -> dict[str, Any]:
    """Own time (tottime) by area and the top functions, in µs per request. cProfile's own overhead
    inflates small Python calls; the shares are what matters, not the absolute figures."""
    stats: Any = pstats.Stats(str(path))
    rows = []
    areas: dict[str, float] = {}
    total = 0.0
    idle = 0.0
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        if name == "<method 'poll' of 'select.epoll' objects>":
            idle += tottime  # the event loop waiting for work: not time spent on requests
            continue
        total += tottime
        area = _area(filename, name)
        areas[area] = areas.get(area, 0.0) + tottime
        label = f"{Path(filename).parent.name}/{Path(filename).name}:{line}({name})" if line else name
        rows.append((tottime, cumtime, calls, label))
    rows.sort(reverse=True)
    return {
        "profiled_us_per_request": round(1e6 * total / requests, 1),
        "idle_us_per_request": round(1e6 * idle / requests, 1),
        "by_area_us_per_request": {
            area: round(1e6 * seconds / requests, 1)
            for area, seconds in sorted(areas.items(), key=lambda item: -item[1])
            if seconds / total >= 0.005
        },
        "top_functions": [
            {
                "function": label,
                "calls_per_request": round(calls / requests, 2),
                "own_us_per_request": round(1e6 * tottime / requests, 2),
                "cumulative_us_per_request": round(1e6 * cumtime / requests, 2),
            }
            for tottime, cumtime, calls, label in rows[:top]
        ],
    }


class PySpy:
    """py-spy sampling a running child (every thread, idle samples left out) into a raw stack file."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def attach(cls, pid: int, path: Path) -> PySpy:
        binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        command = [binary, "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
        process = await asyncio.create_subprocess_exec(
            *command, "--nonblocking", "--output", str(path), stdout=asyncio.subprocess.DEVNULL
        )
        return cls(process)

    async def stop(self) -> None:
        """Stop sampling; py-spy writes its file on SIGINT."""
        self.process.send_signal(signal.SIGINT)
        async with asyncio.timeout(GUARD_SECONDS):
            await self.process.wait()


def _frame(frame: str) -> str:
    """py-spy's `function (path/file.py:line)` as `function (package/file.py)`: lines merged."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    return f"{name} ({'/'.join(Path(path).parts[-2:])})"


def summarise_py_spy(path: Path, top: int = 25) -> dict[str, Any]:
    """Own share (the sampled frame) and cumulative share (anywhere on the stack) per function, and
    own share by area, in % of every non-idle sample of every thread."""
    own: dict[str, int] = {}
    cumulative: dict[str, int] = {}
    areas: dict[str, int] = {}
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            cumulative[frame] = cumulative.get(frame, 0) + count
        name, _, where = stack.rsplit(";", 1)[-1].partition(" (")
        area = _area("/" + where.rstrip(")").rpartition(":")[0], name)
        areas[area] = areas.get(area, 0) + count

    def share(value: int) -> float:
        return round(100 * value / total, 1) if total else 0.0

    return {
        "samples": total,
        "own_percent_by_area": {
            area: share(value) for area, value in sorted(areas.items(), key=lambda item: -item[1])[:15]
        },
        "top_own": [
            {"function": name, "own_percent": share(value), "cumulative_percent": share(cumulative[name])}
            for name, value in sorted(own.items(), key=lambda item: -item[1])[:top]
        ],
        "top_cumulative": [
            {"function": name, "cumulative_percent": share(value), "own_percent": share(own.get(name, 0))}
            for name, value in sorted(cumulative.items(), key=lambda item: -item[1])[:top]
        ],
    }


# -- the whole benchmark ---------------------------------------------------------------------------


def versions() -> dict[str, str]:
    mosquitto = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True, check=False).stdout
    return {
        "python": platform.python_version(),
        "gmqtt": metadata.version("gmqtt"),
        "lxml": metadata.version("lxml"),
        "mosquitto": mosquitto.splitlines()[0] if mosquitto else "unknown",
    }


def code_under_test() -> dict[str, Any]:
    """The git HEAD, files of gateway/ and rules/ modified in the working tree, and a digest of their
    content: other work may edit the tree while the benchmark runs (each run starts a fresh child)."""
    digest = hashlib.sha256()
    for path in sorted(
        [*ROOT.glob("gateway/**/*.py"), *ROOT.glob("rules/**/*.py"), *ROOT.glob("rules/*.toml")]
    ):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "modified": git("status", "--porcelain", "--", "gateway", "rules").splitlines(),
        "digest": digest.hexdigest()[:16],
    }


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def signed_workload(workload: Sequence[Request], signers: Signers) -> list[Request]:
    """The same requests, each signed by its user (as a DCC user's adapter sends them)."""
    return [
        replace(request, payload=signers.sign(f"dsp/in/{request.user}", request.payload))
        for request in workload
    ]


def rotated(systems: Sequence[str], round_number: int) -> tuple[str, ...]:
    """Each round starts with the next system, so none is always first (or always after the same one)."""
    shift = (round_number - 1) % len(systems)
    return (*systems[shift:], *systems[:shift])


async def profiles(  # noqa: PLR0917 - the runs' inputs
    args: argparse.Namespace,
    bench: Bench,
    folder: Path,
    workload: list[Request],
    latency_workload: list[Request],
    rate: float,
) -> dict[str, Any] | None:
    """The profiled gateway runs (--profile: cProfile; --py-spy: py-spy), at max rate and half load."""
    profile: dict[str, Any] | None = None
    if args.profile:
        stats = folder / "max-rate.prof"
        run = await bench.throughput(GATEWAY, 0, workload, profile=stats)
        profile = {"max_rate": summarise_profile(stats, len(workload))}
        profile["max_rate"]["requests_per_second_under_profiler"] = run.requests_per_second
        stats = folder / "half-load.prof"
        await bench.latency(GATEWAY, 0, latency_workload, rate, profile=stats)
        profile["half_load"] = summarise_profile(stats, len(latency_workload))
        profile["half_load"]["offered_per_second"] = round(rate)
    if args.py_spy:
        spy = profile or {}
        samples = folder / "max-rate.py-spy"
        run = await bench.throughput(GATEWAY, 0, workload, spy=samples)
        spy["py_spy_max_rate"] = summarise_py_spy(samples)
        spy["py_spy_max_rate"]["requests_per_second_under_profiler"] = run.requests_per_second
        samples = folder / "half-load.py-spy"
        await bench.latency(GATEWAY, 0, latency_workload, rate, spy=samples)
        spy["py_spy_half_load"] = summarise_py_spy(samples)
        spy["py_spy_half_load"]["offered_per_second"] = round(rate)
        profile = spy
    return profile


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging("warning")
    started = time.perf_counter()
    code = code_under_test()
    throughput_runs: list[ThroughputRun] = []
    latency_runs: list[LatencyRun] = []
    profile: dict[str, Any] | None = None
    systems = (
        RELAY,
        *((FANOUT,) if args.floor else ()),
        GATEWAY,
        *((STUBBED, UNSIGNED) if args.floor else ()),
        *((BASELINE,) if BASELINE_CHECKOUT else ()),
        *((UVLOOP,) if args.uvloop else ()),
        *((PROCESSES,) if args.signing_processes else ()),
        *((COALESCED,) if args.coalesce else ()),
        *((VERIFIED,) if args.verify else ()),
        *((VERIFIED_PROCESSES,) if args.verify and args.signing_processes else ()),
    )
    with tempfile.TemporaryDirectory(prefix="mp169-bench-") as name:
        folder = Path(name)
        estate = generate_estate(args.seed, args.premises)
        template = folder / "estate.sqlite3"
        view = await seed(estate, template)
        if BASELINE_CHECKOUT:
            await seed_baseline(args.seed, args.premises, template.with_suffix(".baseline"))
        workload = forwardable(estate, view, args.seed, args.requests)
        if args.floor:
            STUBS.append(folder / "stubs.pickle")
            stub_results(view, [workload], STUBS[0])
        signers = None
        if args.verify:
            PKI.append(folder / "pki")
            signers = Signers.from_pki(init_pki(PKI[0], [user.user_id for user in estate.users]))
        signed = {VERIFIED: signed_workload(workload, signers)} if signers is not None else {}
        signed.update({VERIFIED_PROCESSES: signed[VERIFIED]} if VERIFIED in signed else {})
        broker = Mosquitto(folder / "broker", {"max_inflight_messages": str(WINDOW)})
        broker.start()
        try:
            bench = Bench(broker, folder, template)
            for round_number in range(1, args.rounds + 1):
                order = rotated(systems, round_number)
                for system in order:
                    run = await bench.throughput(system, round_number, signed.get(system, workload))
                    throughput_runs.append(run)
                    print(
                        f"throughput round {round_number} {system}: {run.requests_per_second} req/s, "
                        f"lost {run.lost}, cpu {run.cpu}",
                        flush=True,
                    )
            gateway_max = _median([r.requests_per_second for r in throughput_runs if r.system == GATEWAY])
            rate = args.latency_rate or gateway_max / 2
            latency_workload = forwardable(
                estate, view, args.seed + 1, max(100, round(rate * args.latency_seconds))
            )
            if signers is not None:
                signed[VERIFIED] = signed[VERIFIED_PROCESSES] = signed_workload(latency_workload, signers)
            if args.floor:
                stub_results(view, [workload, latency_workload], STUBS[0])
            for round_number in range(1, args.latency_rounds + 1):
                order = rotated(systems, round_number)
                for system in order:
                    lrun = await bench.latency(
                        system, round_number, signed.get(system, latency_workload), rate
                    )
                    latency_runs.append(lrun)
                    print(
                        f"latency round {round_number} {system} at {lrun.offered_per_second}/s: "
                        f"p50 {lrun.p50_ms} ms, p99 {lrun.p99_ms} ms, max {lrun.max_ms} ms, lost {lrun.lost}",
                        flush=True,
                    )
            profile = await profiles(args, bench, folder, workload, latency_workload, rate)
        finally:
            broker.stop()
    code["changed_during_run"] = code_under_test()["digest"] != code["digest"]
    return summary(
        args,
        workload,
        code=code,
        throughput_runs=throughput_runs,
        latency_runs=latency_runs,
        profile=profile,
        seconds=time.perf_counter() - started,
    )


def summary(
    args: argparse.Namespace,
    workload: list[Request],
    *,
    throughput_runs: list[ThroughputRun],
    latency_runs: list[LatencyRun],
    profile: dict[str, Any] | None,
    seconds: float,
    code: dict[str, Any],
) -> dict[str, Any]:
    def rates(system: str) -> list[float]:
        return [r.requests_per_second for r in throughput_runs if r.system == system]

    relay, gateway = _median(rates(RELAY)), _median(rates(GATEWAY))
    ratio = gateway / relay if relay else 0.0
    by_round = {
        r.round: {run.system: run.requests_per_second for run in throughput_runs if run.round == r.round}
        for r in throughput_runs
    }
    round_ratios = [
        pair[GATEWAY] / pair[RELAY] for pair in by_round.values() if RELAY in pair and GATEWAY in pair
    ]
    baseline_ratios = [pair[GATEWAY] / pair[BASELINE] for pair in by_round.values() if BASELINE in pair]
    verified_ratios = [pair[VERIFIED] / pair[GATEWAY] for pair in by_round.values() if VERIFIED in pair]

    def latency(system: str, key: str) -> float:
        return round(_median([getattr(r, key) for r in latency_runs if r.system == system]), 3)

    raw = {
        system: {key: latency(system, key) for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms")}
        for system in (RELAY, GATEWAY, BASELINE, VERIFIED)
        if any(r.system == system for r in latency_runs)
    }
    added = {key: round(raw[GATEWAY][key] - raw[RELAY][key], 3) for key in ("p50_ms", "p99_ms")}
    systems = per_system(throughput_runs, latency_runs)
    every: list[ThroughputRun | LatencyRun] = [*throughput_runs, *latency_runs]
    no_loss = all(r.lost == 0 and r.duplicates == 0 and r.handler_errors == 0 for r in every)
    acknowledged = all(r.acknowledged == r.requests for r in every if r.system == GATEWAY)
    return {
        "requests_per_run": len(workload),
        "throughput_rounds": args.rounds,
        "latency_rounds": args.latency_rounds,
        "latency_seconds": args.latency_seconds,
        "window": WINDOW,
        "estate": {"premises": args.premises, "seed": args.seed},
        "workload": {
            "srvs": len({request_srv(request.payload) for request in workload}),
            "mean_bytes": round(sum(len(request.payload) for request in workload) / len(workload)),
        },
        "layout": "system under test alone in a child process; load generator, sink and users client "
        "in the parent's event loop; private Mosquitto; throughput from a backlog queued at the broker",
        "throughput": {
            "relay_requests_per_second": round(relay),
            "gateway_requests_per_second": round(gateway),
            "ratio": round(ratio, 3),
            "ratio_per_round": [round(value, 3) for value in round_ratios],
            **(
                {
                    "baseline": str(BASELINE_CHECKOUT[0]),
                    "baseline_requests_per_second": round(_median(rates(BASELINE))),
                    "gateway_vs_baseline_per_round": [round(value, 3) for value in baseline_ratios],
                    "gateway_vs_baseline": round(_median(baseline_ratios), 3),
                }
                if baseline_ratios
                else {}
            ),
            **(
                {
                    "verified_requests_per_second": round(_median(rates(VERIFIED))),
                    "verified_vs_gateway_per_round": [round(value, 3) for value in verified_ratios],
                    "verified_vs_gateway": round(_median(verified_ratios), 3),
                }
                if verified_ratios
                else {}
            ),
        },
        "systems": systems,
        "latency_at_half_load": {
            "offered_per_second": latency_runs[0].offered_per_second if latency_runs else 0,
            **raw,
            "added": added,
        },
        "latency_budget": latency_budget(latency_runs),
        "targets": {"ratio": TARGET_RATIO, "added_p99_ms": TARGET_ADDED_P99_MS},
        "meets": {"ratio": ratio >= TARGET_RATIO, "added_p99": added["p99_ms"] < TARGET_ADDED_P99_MS},
        "no_loss": no_loss,
        "every_request_acknowledged_i99": acknowledged,
        "profile": profile,
        "versions": versions(),
        "code_under_test": code,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "bench_seconds": round(seconds, 1),
        "throughput_runs": [asdict(run) for run in throughput_runs],
        "latency_runs": [asdict(run) for run in latency_runs],
    }


def per_system(
    throughput_runs: Sequence[ThroughputRun], latency_runs: Sequence[LatencyRun]
) -> dict[str, dict[str, Any]]:
    """Every system against the relay and the gateway of the same round (throughput ratios, and
    latency added to the relay's), then the median over rounds."""
    rates = {(r.system, r.round): r.requests_per_second for r in throughput_runs}
    latencies = {(r.system, r.round): r for r in latency_runs}
    result: dict[str, dict[str, Any]] = {}
    for system in dict.fromkeys(r.system for r in throughput_runs):
        rounds = sorted(n for s, n in rates if s == system)

        def ratios(other: str, rounds: list[int] = rounds, system: str = system) -> list[float]:
            return [rates[system, n] / rates[other, n] for n in rounds if (other, n) in rates]

        def added(key: str, system: str = system) -> list[float]:
            return [
                getattr(run, key) - getattr(latencies[RELAY, n], key)
                for (s, n), run in latencies.items()
                if s == system and (RELAY, n) in latencies
            ]

        runs = [run for (s, _), run in latencies.items() if s == system]
        result[system] = {
            "requests_per_second": round(_median([rates[system, n] for n in rounds])),
            "vs_relay": round(_median(ratios(RELAY)), 3),
            "vs_relay_per_round": [round(value, 3) for value in ratios(RELAY)],
            "vs_gateway": round(_median(ratios(GATEWAY)), 3),
            "vs_gateway_per_round": [round(value, 3) for value in ratios(GATEWAY)],
            "p50_ms": round(_median([run.p50_ms for run in runs]), 3),
            "p99_ms": round(_median([run.p99_ms for run in runs]), 3),
            "added_p50_ms": round(_median(added("p50_ms")), 3),
            "added_p99_ms": round(_median(added("p99_ms")), 3),
            "added_p99_ms_per_round": [round(value, 3) for value in added("p99_ms")],
            "cpu_system_core_percent": round(
                _median([r.cpu["system"]["core_percent"] for r in throughput_runs if r.system == system]), 1
            ),
            # CPU the system's own process spent per request at its maximum rate: less sensitive than
            # the rates to other work on a shared machine (it excludes the time spent waiting for a core).
            "cpu_us_per_request": round(
                _median([r.cpu["system"]["us_per_request"] for r in throughput_runs if r.system == system]), 1
            ),
        }
    return result


def latency_budget(runs: Sequence[LatencyRun]) -> dict[str, dict[str, float]]:
    """Per stage, the median over the gateway's half-load runs of each run's p50 and p99."""
    budgets = [run.budget for run in runs if run.system == GATEWAY and run.budget]
    return {
        stage: {
            "p50_ms": round(_median([b[stage]["p50_ms"] for b in budgets]), 4),
            "p99_ms": round(_median([b[stage]["p99_ms"] for b in budgets]), 4),
        }
        for stage in STAGES
        if budgets and all(stage in b for b in budgets)
    }


def request_srv(payload: bytes) -> bytes:
    start = payload.find(b"ServiceReferenceVariant>") + len(b"ServiceReferenceVariant>")
    return payload[start : payload.find(b"<", start)]


def markdown(result: dict[str, Any]) -> str:
    t = result["throughput"]
    lat = result["latency_at_half_load"]
    yes = {True: "yes", False: "NO"}
    heading = (
        f"QoS 1 through Mosquitto, {result['requests_per_run']} real requests per run "
        f"({result['workload']['srvs']} SRVs, {result['workload']['mean_bytes']} B mean), window "
        f"{result['window']}, {result['throughput_rounds']} + {result['latency_rounds']} alternating rounds, "
        f"no loss: {yes[result['no_loss']]}"
    )
    ratio_row = (
        f"| max throughput (req/s, median) | {t['relay_requests_per_second']} | "
        f"{t['gateway_requests_per_second']} | ratio {t['ratio']} (rounds {t['ratio_per_round']}) | "
        f">= {TARGET_RATIO} | {yes[result['meets']['ratio']]} |"
    )
    p50_row = (
        f"| p50 at {lat['offered_per_second']} req/s (ms) | {lat['relay']['p50_ms']} | "
        f"{lat['gateway']['p50_ms']} | +{lat['added']['p50_ms']} | | |"
    )
    p99_row = (
        f"| p99 at {lat['offered_per_second']} req/s (ms) | {lat['relay']['p99_ms']} | "
        f"{lat['gateway']['p99_ms']} | +{lat['added']['p99_ms']} | < {TARGET_ADDED_P99_MS} added | "
        f"{yes[result['meets']['added_p99']]} |"
    )
    lines = [
        heading,
        "",
        "| | relay | gateway | gateway vs relay | target | met |",
        "|---|---:|---:|---:|---:|---|",
        ratio_row,
        p50_row,
        p99_row,
    ]
    if "gateway_vs_baseline" in t:
        base = lat.get(BASELINE, {})
        lines += [
            "",
            (
                f"Side by side with the baseline gateway ({t['baseline']}): throughput "
                f"{t['gateway_requests_per_second']} vs {t['baseline_requests_per_second']} req/s, "
                f"ratio {t['gateway_vs_baseline']} (rounds {t['gateway_vs_baseline_per_round']})"
            ),
            (
                f"p50 / p99 at half load: {lat['gateway']['p50_ms']} / {lat['gateway']['p99_ms']} ms vs "
                f"{base.get('p50_ms')} / {base.get('p99_ms')} ms."
            ),
        ]
    if "verified_vs_gateway" in t:
        ver = lat.get(VERIFIED, {})
        lines += [
            "",
            (
                f"Verifying every request's signature: {t['verified_requests_per_second']} req/s against "
                f"{t['gateway_requests_per_second']} with verification off, ratio {t['verified_vs_gateway']} "
                f"(rounds {t['verified_vs_gateway_per_round']})"
            ),
            (
                f"p50 / p99 at half load: {ver.get('p50_ms')} / {ver.get('p99_ms')} ms against "
                f"{lat['gateway']['p50_ms']} / {lat['gateway']['p99_ms']} ms."
            ),
        ]
    lines += [
        "",
        "| system | req/s | vs relay | vs gateway | p50 ms | p99 ms | added p99 ms | core % | CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {v['requests_per_second']} | {v['vs_relay']} {v['vs_relay_per_round']} | "
        f"{v['vs_gateway']} | {v['p50_ms']} | {v['p99_ms']} | {v['added_p99_ms']} | "
        f"{v['cpu_system_core_percent']} | {v['cpu_us_per_request']} |"
        for name, v in result["systems"].items()
    ]
    budget = result.get("latency_budget") or {}
    if budget:
        lines += ["", "Latency budget of the gateway at half load (gateway/budget.py), ms:", ""]
        lines += ["| stage | p50 | p99 |", "|---|---:|---:|"]
        lines += [f"| {stage} | {v['p50_ms']} | {v['p99_ms']} |" for stage, v in budget.items()]
    for regime, profile in (result.get("profile") or {}).items():
        if "top_own" in profile:
            lines += ["", f"{regime} ({profile['samples']} samples), own / cumulative % of samples:", ""]
            lines += ["| function | own % | cumulative % |", "|---|---:|---:|"]
            lines += [
                f"| `{row['function']}` | {row['own_percent']} | {row['cumulative_percent']} |"
                for row in profile["top_own"][:15]
            ]
            continue
        title = (
            f"gateway profile at {regime} (cProfile own time, µs per request; "
            f"{profile['profiled_us_per_request']} busy, {profile['idle_us_per_request']} idle):"
        )
        lines += ["", title]
        lines += [f"- {area}: {value}" for area, value in profile["by_area_us_per_request"].items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1+1 runs of 5000, 1+1 latency runs of 3 s")
    parser.add_argument("--requests", type=int, default=None, help="requests per throughput run (20000)")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds (5)")
    parser.add_argument("--latency-rounds", type=int, default=None, help="latency rounds (3)")
    parser.add_argument("--latency-seconds", type=float, default=None, help="paced seconds per run (8)")
    parser.add_argument(
        "--latency-rate", type=float, default=None, help="offered req/s (default: half the gateway's max)"
    )
    parser.add_argument("--premises", type=int, default=4000, help="premises in the simulated estate")
    parser.add_argument("--seed", type=int, default=169)
    parser.add_argument(
        "--profile", action="store_true", help="add two cProfiled gateway runs: at max rate and at half load"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="also run the gateway of this checkout (e.g. a git worktree of the code before a change), "
        "side by side in every round",
    )
    parser.add_argument(
        "--serve", choices=(RELAY, FANOUT, GATEWAY, STUBBED, UNSIGNED, VERIFIED), help=argparse.SUPPRESS
    )
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also run the gateway verifying every request's signature (the workload signed), side by side",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run the end-to-end floor side by side: the relay publishing the gateway's fan-out "
        "(command and I99), and the gateway with parse and decide stubbed out, signed and unsigned",
    )
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="also run the gateway on uvloop's event loop, side by side (needs uvloop installed)",
    )
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="add two gateway runs sampled by py-spy (max rate, half load): own and cumulative shares",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help="where to write the results (bench/results/gateway_mqtt.json)",
    )
    parser.add_argument(
        "--signing-processes",
        type=int,
        default=0,
        metavar="N",
        help="also run the gateway (and with --verify the verified one) signing in N worker processes",
    )
    parser.add_argument(
        "--coalesce",
        action="store_true",
        help="also run the gateway writing its socket once per loop iteration (a publish batching prototype)",
    )
    parser.add_argument("--stubs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--client-id", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--budget",
        action="store_true",
        help="record the gateway's latency budget per stage in its half-load runs (gateway/budget.py)",
    )
    args = parser.parse_args()
    if args.pki is not None:  # the verified child: the PKI its parent made
        PKI.append(args.pki)
    SIGNING_PROCESSES[0] = args.signing_processes
    if args.serve:
        child = serve(
            args.serve,
            args.url,
            args.root,
            client_id=args.client_id,
            store=args.store,
            profile=args.profile_to,
            budget_on=args.budget_child,
        )
        if args.stubs is not None:
            stub_routing(args.stubs)
        if args.coalesce:
            coalesce_writes()
        if args.uvloop:
            import uvloop  # noqa: PLC0415 - optional: only the uvloop system needs it

            uvloop.run(child)
        else:
            asyncio.run(child)
        return 0
    if args.baseline is not None:
        BASELINE_CHECKOUT.append(args.baseline.resolve())
    BUDGET[0] = args.budget
    quick = args.quick
    args.requests = args.requests or (5000 if quick else 20_000)
    args.rounds = args.rounds or (1 if quick else 5)
    args.latency_rounds = args.latency_rounds or (1 if quick else 3)
    args.latency_seconds = args.latency_seconds or (3.0 if quick else 8.0)
    result = asyncio.run(benchmark(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("throughput", "latency_at_half_load", "meets")}, indent=2))
    print(markdown(result))
    return 0 if result["no_loss"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
