"""Scale-out: 1, 2 and 3 gateway instances on one shared subscription, over ONE private Mosquitto and
ONE private PostgreSQL, side by side in one run.

Each instance is `GatewayService` as `mp169 run` builds it, in a process of its own (this module with
--serve): the PostgreSQL store (`store.url`, a fresh database per run cloned from one seeded with a
simulated estate), `topics.shared_group = "mp169"` so the broker hands each request to one instance,
the outcome recorder writing into the same database, verification off (bench/signing.py measures it).
The load generator, the "devices" sink and the "users" client are bench/gateway_mqtt.py's (the same
forwardable DUIS requests, each producing exactly one command and one I99), in the parent process,
and so is the baseline: its zero-logic relay (one process, republishing each request to the device
topic), through the same broker in the same rounds.

1. Throughput: the generator publishes N requests as fast as the broker acknowledges them (a window
   of in-flight publishes); rate = N / (first publish -> last command at the sink). Median over rounds;
   the headline is median(k instances) / median(1 instance), measured in the same run.
2. Latency: requests paced at half the one-instance median rate, the same offered load for the relay
   and 1, 2 and 3 instances; latency = command at the sink - publish (one clock); the first 10 % is
   warm-up. Added latency = instances' p50 / p99 - the relay's (medians over rounds).

Every run reports the CPU (share of one core, from /proc) of the gateway processes, the broker, the
PostgreSQL server (postmaster and backends) and the driver in its measured window: on a 2-core
machine their sum says whether the machine, not the gateway, is the limit. After each run the
instances stop (flushing their outcome records) and the run counts the outcome rows in the shared
database: every request must be there exactly once, whichever instance decided it.

    python -m bench.cluster            # ~4 min: 4 rounds of 6000 requests, 3 latency rounds of 5 s
    python -m bench.cluster --quick    # ~45 s: 1 round of 2000, 1 latency round of 3 s

Needs mosquitto and PostgreSQL binaries (started privately on free ports). Writes
bench/results/cluster.json and prints Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.gateway_mqtt import (
    GUARD_SECONDS,
    RELAY,
    WARMUP_SHARE,
    WINDOW,
    Child,
    CpuWindow,
    Request,
    Sink,
    Users,
    _median,
    code_under_test,
    commit_summary,
    forwardable,
    nothing,
    percentile,
    rotated,
    topics_of,
    versions,
)
from gateway.config import BrokerSettings, Settings
from gateway.logging import configure_logging
from gateway.metrics import Metrics
from gateway.mqtt import MqttTransport
from gateway.postgres import PostgresStore
from gateway.service import GatewayService
from gateway.view import RoutingView
from simulator.estate import generate_estate
from simulator.mosquitto import Mosquitto
from simulator.postgres import Postgres

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cluster.json"
GROUP = "mp169"
INSTANCES = (1, 2, 3)
SYSTEMS = (0, *INSTANCES)
"""0: the relay baseline."""
TEMPLATE = "estate"
OURS = ("system", "broker", "postgres", "driver")
_TICKS = os.sysconf("SC_CLK_TCK")


# -- one instance (child process) ------------------------------------------------------------------


def instance_settings(broker: str, store: str, root: str, client_id: str) -> Settings:
    topics = topics_of(root)
    return Settings.model_validate(
        {
            "broker": {"url": broker},
            "store": {"url": store},
            "topics": {
                "inbound": topics.inbound,
                "outbound": topics.outbound,
                "devices": topics.devices,
                "deadletter": topics.deadletter,
                "shared_group": GROUP,
            },
            "gateway": {
                "metrics_port": 0,
                "log_level": "warning",
                "client_id": client_id,
                "inflight_window": WINDOW,
                # The sink never answers: every forward stays pending for the whole run.
                "max_forwards": 1_000_000,
                "max_forwards_per_user": 1_000_000,
            },
            "signing": {"verify": False},
        }
    )


async def serve(broker: str, store: str, root: str, client_id: str) -> None:
    """Run one instance until a line arrives on stdin; then stop it (flushing outcomes) and report."""
    configure_logging("warning")
    settings = instance_settings(broker, store, root, client_id)
    transport = MqttTransport(
        settings.broker, client_id=client_id, receive_maximum=settings.gateway.inflight_window
    )
    metrics = Metrics()
    service = await GatewayService.start(settings, transport, metrics=metrics)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await service.stop()
    recorder = service.recorder
    report = {
        "handler_errors": transport.handler_errors,
        "committer": commit_summary(metrics),
        "outcomes": {
            "flushed": recorder.flushed,
            "dropped": recorder.dropped,
            "failures": recorder.write_failures,
        },
    }
    print(json.dumps(report), flush=True)


async def spawn(broker: str, store: str, root: str, client_id: str) -> Child:
    command = [sys.executable, "-m", "bench.cluster", "--serve", broker, store, root, client_id]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    return Child(process)


# -- CPU of a process tree ---------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and its live descendants (PostgreSQL: the postmaster and its backends)."""
    stats = {
        int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))
    }
    total, frontier = 0.0, [root]
    while frontier:
        pid = frontier.pop()
        if pid in stats:
            total += stats[pid][1]
            frontier.extend(child for child, (parent, _) in stats.items() if parent == pid)
    return total


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy so far (/proc/stat), other sessions' included."""
    user, nice, system, _idle, _iowait, *rest = (int(v) for v in Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + sum(rest)) / _TICKS


class Window:
    """CPU of named process groups over a window: the instances, the broker, PostgreSQL, the driver;
    and of the whole machine, so the share other work on it took is known."""

    def __init__(self, groups: dict[str, list[int]], trees: frozenset[str]) -> None:
        self.groups = groups
        self.trees = trees
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        def cpu(name: str, pid: int) -> float:
            if name in self.trees:
                return tree_cpu_seconds(pid)
            stat = _stat(pid)
            return 0.0 if stat is None else stat[1]

        used = {name: sum(cpu(name, pid) for pid in pids) for name, pids in self.groups.items()}
        return {**used, "machine": machine_busy_seconds()}

    def start(self) -> None:
        self.started = self._now()

    def end(self) -> None:
        self.ended = self._now()

    def report(self, seconds: float, messages: int) -> dict[str, dict[str, float]]:
        window = CpuWindow(dict.fromkeys(self.started, 0), self.started, self.ended)
        report = window.report(seconds, messages)
        ours = sum(figures["core_percent"] for name, figures in report.items() if name != "machine")
        report["others"] = {"core_percent": round(max(0.0, report["machine"]["core_percent"] - ours), 1)}
        return report


# -- runs --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    kind: str  # throughput | latency
    instances: int
    round: int
    requests: int
    seconds: float
    requests_per_second: float
    offered_per_second: float | None
    p50_ms: float | None
    p99_ms: float | None
    lost: int
    duplicates: int
    acknowledged: int
    outcome_rows: int
    handler_errors: int
    outcomes_dropped: int
    cpu: dict[str, dict[str, float]]
    committer: list[dict[str, float]]
    """Each instance's store commits (count, requests per transaction, mean and p99 ms)."""


class Cluster:
    def __init__(self, broker: Mosquitto, postgres: Postgres) -> None:
        self.broker = broker
        self.postgres = postgres
        self.driver_settings = BrokerSettings(url=broker.url, session_expiry_seconds=0)
        self.runs = 0

    async def _database(self, name: str, *, drop: bool = False) -> None:
        admin = await asyncpg.connect(self.postgres.url())
        try:
            if drop:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            else:
                await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        finally:
            await admin.close()

    async def run(
        self, instances: int, round_number: int, workload: list[Request], rate: float | None
    ) -> Run:
        """Throughput (rate None: flat out) or latency (paced at `rate`) through `instances` instances
        (0: the relay)."""
        self.runs += 1
        root, name = f"c{self.runs}", f"run{self.runs}"
        await self._database(name)
        store = self.postgres.url(name)
        sink = Sink({request.key: number for number, request in enumerate(workload)})
        users = Users(len(workload) if instances else 0)
        devices = MqttTransport(self.driver_settings, f"{root}-devices", receive_maximum=WINDOW)
        await devices.start([f"{root}/dsp/device/+/cmd"], sink)
        answers = MqttTransport(self.driver_settings, f"{root}-users", receive_maximum=WINDOW)
        await answers.start([f"{root}/dsp/out/+"], users)
        producer = MqttTransport(self.driver_settings, f"{root}-load", receive_maximum=WINDOW)
        await producer.start([], nothing)
        children: list[Child] = []
        reports: list[dict[str, Any]] = []
        sent = [0] * len(workload)
        try:
            if instances:
                children = [
                    await spawn(self.broker.url, store, root, f"{root}-gw{n}") for n in range(instances)
                ]
            else:
                relay = f"{root}-relay"
                children = [
                    await Child.spawn(RELAY, self.broker.url, root, client_id=relay, store=Path(relay))
                ]
            for child in children:
                await child.ready()
            assert self.broker._process is not None  # noqa: SLF001 - the broker's pid, for its CPU time
            assert self.postgres._process is not None  # noqa: SLF001
            cpu = Window(
                {
                    "system": [child.pid for child in children],
                    "broker": [self.broker._process.pid],  # noqa: SLF001
                    "postgres": [self.postgres._process.pid],  # noqa: SLF001
                    "driver": [os.getpid()],
                },
                trees=frozenset({"postgres"}),
            )
            await asyncio.sleep(0.2)  # let the instances settle after their start
            cpu.start()
            begin = time.perf_counter_ns()
            await publish(producer, root, workload, sent, rate, begin)
            async with asyncio.timeout(GUARD_SECONDS):
                await sink.complete.wait()
                await users.complete.wait()
            cpu.end()
            reports = [await child.stop() for child in children]
        finally:
            for child in children:
                child.kill()
            await producer.stop()
            await devices.stop()
            await answers.stop()
        outcome_rows = await count_outcomes(store)
        await self._database(name, drop=True)
        seconds = (sink.last - begin) / 1e9
        latencies = sorted(
            sink.arrived[n] - sent[n]
            for n in range(int(len(workload) * WARMUP_SHARE), len(workload))
            if sink.arrived[n]
        )
        return Run(
            kind="throughput" if rate is None else "latency",
            instances=instances,
            round=round_number,
            requests=len(workload),
            seconds=round(seconds, 3),
            requests_per_second=round(len(workload) / seconds),
            offered_per_second=None if rate is None else round(rate),
            p50_ms=None if rate is None else round(percentile(latencies, 0.50), 3),
            p99_ms=None if rate is None else round(percentile(latencies, 0.99), 3),
            lost=len(workload) - sink.unique,
            duplicates=sink.duplicates,
            acknowledged=users.acknowledged,
            outcome_rows=outcome_rows,
            handler_errors=sum(int(r.get("handler_errors", -1)) for r in reports),
            outcomes_dropped=sum(int(r.get("outcomes", {}).get("dropped", 0)) for r in reports),
            cpu=cpu.report(seconds, len(workload)),
            committer=[r.get("committer", {}) for r in reports],
        )


async def publish(  # noqa: PLR0917 - one run's state
    producer: MqttTransport,
    root: str,
    workload: list[Request],
    sent: list[int],
    rate: float | None,
    begin: int,
) -> None:
    """Flat out (a window of in-flight publishes), or paced at `rate` per second."""
    pending: set[asyncio.Task[None]] = set()
    interval = 0.0 if rate is None else 1e9 / rate
    for number, request in enumerate(workload):
        if rate is not None:
            due = begin + int(number * interval)
            now = time.perf_counter_ns()
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
        elif len(pending) >= WINDOW:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        sent[number] = time.perf_counter_ns()
        task = asyncio.create_task(producer.publish(f"{root}/dsp/in/{request.user}", request.payload))
        pending.add(task)
    if pending:
        await asyncio.gather(*pending)


async def count_outcomes(url: str) -> int:
    db = await asyncpg.connect(url)
    try:
        return int(await db.fetchval("SELECT count(*) FROM outcomes"))
    finally:
        await db.close()


async def seed_template(postgres: Postgres, seed: int, premises: int) -> RoutingView:
    """The estate in the template database every run's database is cloned from (schema and rows)."""
    postgres.create_database(TEMPLATE)
    async with PostgresStore(postgres.url(TEMPLATE)) as store:
        estate = generate_estate(seed, premises)
        await store.upsert_devices(estate.devices)
        await store.upsert_users(estate.users)
        view = await RoutingView.load(store)
    # The outcome tables too: a run's instances then start on a migrated database, as in production.
    from gateway.outcomes.database import PostgresOutcomes  # noqa: PLC0415 - only here

    await PostgresOutcomes(postgres.url(TEMPLATE)).migrate()
    return view


# -- the whole run -------------------------------------------------------------------------------------


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging("warning")
    started = time.perf_counter()
    code = code_under_test()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="mp169-bench-cluster-") as name:
        folder = Path(name)
        postgres = Postgres()
        broker = Mosquitto(folder / "broker", {"max_inflight_messages": str(WINDOW)})
        try:
            postgres.start()
            broker.start()
            view = await seed_template(postgres, args.seed, args.premises)
            estate = generate_estate(args.seed, args.premises)
            workload = forwardable(estate, view, args.seed, args.requests)
            cluster = Cluster(broker, postgres)
            for round_number in range(1, args.rounds + 1):
                for instances in rotated(SYSTEMS, round_number):
                    run = await cluster.run(int(instances), round_number, workload, None)
                    runs.append(run)
                    print(
                        f"throughput round {round_number}, {label(instances)}: "
                        f"{run.requests_per_second} req/s, lost {run.lost}, outcome rows {run.outcome_rows}, "
                        f"cpu {run.cpu}",
                        flush=True,
                    )
            one = _median([r.requests_per_second for r in runs if r.instances == 1])
            rate = one / 2
            paced = forwardable(estate, view, args.seed + 1, max(200, round(rate * args.latency_seconds)))
            for round_number in range(1, args.latency_rounds + 1):
                for instances in rotated(SYSTEMS, round_number):
                    run = await cluster.run(int(instances), round_number, paced, rate)
                    runs.append(run)
                    print(
                        f"latency round {round_number}, {label(instances)} at "
                        f"{run.offered_per_second}/s: p50 {run.p50_ms} ms, p99 {run.p99_ms} ms, "
                        f"lost {run.lost}",
                        flush=True,
                    )
        finally:
            broker.stop()
            postgres.remove()
    code["changed_during_run"] = code_under_test()["digest"] != code["digest"]
    return summary(args, runs, code, time.perf_counter() - started)


def label(instances: int) -> str:
    return "relay (no logic)" if instances == 0 else f"{instances} instance{'s' if instances > 1 else ''}"


def _cpu_medians(runs: list[Run]) -> dict[str, float]:
    return {name: _median([r.cpu[name]["core_percent"] for r in runs]) for name in runs[0].cpu}


def summary(
    args: argparse.Namespace, runs: list[Run], code: dict[str, Any], seconds: float
) -> dict[str, Any]:
    throughput = {n: [r for r in runs if r.kind == "throughput" and r.instances == n] for n in SYSTEMS}
    latency = {n: [r for r in runs if r.kind == "latency" and r.instances == n] for n in SYSTEMS}
    one = _median([r.requests_per_second for r in throughput[1]])
    p50_relay = _median([r.p50_ms or 0.0 for r in latency[0]])
    p99_relay = _median([r.p99_ms or 0.0 for r in latency[0]])
    per_instances: dict[str, Any] = {}
    for n in SYSTEMS:
        rate = _median([r.requests_per_second for r in throughput[n]])
        cpu = _cpu_medians(throughput[n])
        p50 = _median([r.p50_ms or 0.0 for r in latency[n]])
        p99 = _median([r.p99_ms or 0.0 for r in latency[n]])
        per_instances["relay" if n == 0 else str(n)] = {
            "requests_per_second": rate,
            "ratio_to_one": round(rate / one, 3) if one else None,
            "ratio_to_one_per_round": [
                round(run.requests_per_second / base.requests_per_second, 3)
                for run, base in zip(throughput[n], throughput[1], strict=True)
            ],
            "cpu_core_percent": cpu,
            "cpu_total_percent": round(sum(cpu[name] for name in OURS), 1),
            "system_cpu_us_per_request": _median([r.cpu["system"]["us_per_request"] for r in throughput[n]]),
            "postgres_cpu_us_per_request": _median(
                [r.cpu["postgres"]["us_per_request"] for r in throughput[n]]
            ),
            "broker_cpu_us_per_request": _median([r.cpu["broker"]["us_per_request"] for r in throughput[n]]),
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
            "added_p50_ms": round(p50 - p50_relay, 3),
            "added_p99_ms": round(p99 - p99_relay, 3),
        }
    complete = all(
        r.lost == 0
        and r.duplicates == 0
        and (r.instances == 0 or (r.acknowledged == r.requests and r.outcome_rows == r.requests))
        for r in runs
    )
    return {
        "benchmark": "cluster",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "code": code,
        "config": {
            "quick": args.quick,
            "premises": args.premises,
            "requests": args.requests,
            "rounds": args.rounds,
            "latency_rounds": args.latency_rounds,
            "latency_seconds": args.latency_seconds,
            "latency_offered_per_second": round(one / 2),
            "window": WINDOW,
            "shared_group": GROUP,
        },
        "every_request_forwarded_acknowledged_and_recorded_once": complete,
        "by_instances": per_instances,
        "runs": [asdict(r) for r in runs],
    }


def markdown(result: dict[str, Any]) -> str:
    rate = result["config"]["latency_offered_per_second"]
    header = (
        "| System | Requests/s (median) | Ratio to 1 instance | CPU, % of one core: system / broker / "
        f"PostgreSQL / driver = ours; whole machine (of 200) | p50 / p99 ms at {rate}/s"
        " | added p50 / p99 ms |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for n, figures in result["by_instances"].items():
        cpu = figures["cpu_core_percent"]
        parts = " / ".join(f"{cpu[name]:.0f}" for name in OURS)
        latency = f"{figures['latency_p50_ms']:.1f} / {figures['latency_p99_ms']:.1f}"
        added = "-" if n == "relay" else f"{figures['added_p50_ms']:+.1f} / {figures['added_p99_ms']:+.1f}"
        name = label(0 if n == "relay" else int(n))
        lines.append(
            f"| {name} | {figures['requests_per_second']:,.0f} | {figures['ratio_to_one']:.2f} | {parts}"
            f" = {figures['cpu_total_percent']:.0f}; {cpu['machine']:.0f} | {latency} | {added} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--serve", nargs=4, metavar=("BROKER", "STORE", "ROOT", "CLIENT_ID"), help=argparse.SUPPRESS
    )
    parser.add_argument("--quick", action="store_true", help="one short round of each (under 2 minutes)")
    parser.add_argument("--seed", type=int, default=169)
    parser.add_argument("--premises", type=int, default=500)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--latency-rounds", type=int, default=None)
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(*args.serve))
        return 0
    quick = {"requests": 2000, "rounds": 1, "latency_rounds": 1, "latency_seconds": 3.0}
    full = {"requests": 6000, "rounds": 4, "latency_rounds": 3, "latency_seconds": 5.0}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    result = asyncio.run(benchmark(args))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))
    return 0 if result["every_request_forwarded_acknowledged_and_recorded_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
