"""Same-process comparison of a zero-logic QoS 1 relay: gmqtt (the gateway's MqttTransport) vs aiomqtt 2.x.

A relay subscribes dsp/in/+ and republishes each message to dsp/out/<same user>. A producer publishes
N messages (the 129 sample DUIS requests, round-robin, each tagged with a sequence number); a consumer
on dsp/out/# counts arrivals. Throughput is N / (first publish -> last arrival). Every run checks that
every sequence number arrived. Runs of the relays are interleaved; the median of the rounds is reported.

    python -m bench.transport_compare [--messages 20000] [--rounds 3]

Needs mosquitto (started privately on a free port) and the bench extra (aiomqtt).
Writes bench/results/transport_compare.json and prints Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import BrokerSettings
from gateway.mqtt import MqttTransport
from simulator.mosquitto import Mosquitto, mosquitto_binary

if TYPE_CHECKING:
    from gateway.transport import Message

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = ROOT / "rules" / "duis" / "requests"
RESULTS = ROOT / "bench" / "results" / "transport_compare.json"
WINDOW = 1000  # Receive Maximum of every client, and the broker's max_inflight_messages
GUARD_SECONDS = 300
_ORIGINATOR = re.compile(rb"<(?:\w+:)?RequestID>([0-9A-Fa-f-]{23}):")
_TAG = b"\n<!--seq:"
STOP = "stop"  # published to <root>/dsp/in/stop when a run is over: relays end cleanly


@dataclass(frozen=True, slots=True)
class Run:
    relay: str
    round: int
    seconds: float
    messages_per_second: float
    lost: int
    duplicates: int


def samples() -> list[tuple[str, bytes]]:
    """(user EUI, payload) for each sample request; the user is the RequestID originator."""
    found = []
    for path in sorted(REQUESTS.glob("*.XML")):
        payload = path.read_bytes()
        match = _ORIGINATOR.search(payload)
        found.append((match.group(1).decode() if match else "90-B3-D5-1F-30-01-00-00", payload))
    return found


class Consumer:
    def __init__(self, count: int) -> None:
        self.seen = bytearray(count)
        self.unique = 0
        self.duplicates = 0
        self.last_arrival = 0.0
        self.complete = asyncio.Event()

    async def __call__(self, message: Message) -> None:
        number = int(message.payload.rpartition(_TAG)[2][:-3])
        if self.seen[number]:
            self.duplicates += 1
            return
        self.seen[number] = 1
        self.unique += 1
        self.last_arrival = time.perf_counter()
        if self.unique == len(self.seen):
            self.complete.set()


Relay = Callable[[str, int, str, asyncio.Event], Awaitable[None]]


async def gmqtt_relay(url: str, _port: int, root: str, ready: asyncio.Event) -> None:
    transport = MqttTransport(BrokerSettings(url=url), f"relay-gmqtt-{root}", receive_maximum=WINDOW)
    inbound = f"{root}/dsp/in/"
    outbound = f"{root}/dsp/out/"
    finished = asyncio.Event()

    async def forward(message: Message) -> None:
        if message.topic == inbound + STOP:
            finished.set()
            return
        await transport.publish(outbound + message.topic[len(inbound) :], message.payload)

    await transport.start([f"{root}/dsp/in/+"], forward)
    ready.set()
    await finished.wait()
    await transport.stop()


def aiomqtt_relay(*, concurrent: bool) -> Relay:
    async def relay(_url: str, port: int, root: str, ready: asyncio.Event) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.ReceiveMaximum = WINDOW
        inbound = f"{root}/dsp/in/"
        outbound = f"{root}/dsp/out/"
        async with (
            aiomqtt.Client(
                "127.0.0.1",
                port,
                identifier=f"relay-aiomqtt-{root}",
                protocol=aiomqtt.ProtocolVersion.V5,
                max_inflight_messages=WINDOW,
                properties=properties,
            ) as client,
            asyncio.TaskGroup() as tasks,
        ):
            client.pending_calls_threshold = WINDOW  # concurrent publishes are the point here
            await client.subscribe(f"{root}/dsp/in/+", qos=1)
            ready.set()
            window = asyncio.Semaphore(WINDOW)

            async def publish(topic: str, payload: bytes) -> None:
                try:
                    await client.publish(topic, payload, qos=1)
                finally:
                    window.release()

            async for message in client.messages:
                if str(message.topic) == inbound + STOP:
                    break
                topic = outbound + str(message.topic)[len(inbound) :]
                payload = message.payload
                assert isinstance(payload, bytes)
                if concurrent:
                    await window.acquire()
                    tasks.create_task(publish(topic, payload))
                else:
                    await client.publish(topic, payload, qos=1)

    return relay


RELAYS: dict[str, Relay] = {
    "gmqtt (MqttTransport)": gmqtt_relay,
    "aiomqtt (await each publish)": aiomqtt_relay(concurrent=False),
    "aiomqtt (publishes in tasks)": aiomqtt_relay(concurrent=True),
}


async def one_run(broker: Mosquitto, name: str, relay: Relay, count: int, round_number: int) -> Run:
    root = f"r{round_number}-{list(RELAYS).index(name)}"
    settings = BrokerSettings(url=broker.url)
    consumer = Consumer(count)
    sink = MqttTransport(settings, f"consumer-{root}", receive_maximum=WINDOW)
    await sink.start([f"{root}/dsp/out/#"], consumer)
    producer = MqttTransport(settings, f"producer-{root}")

    async def nothing(_message: Message) -> None:
        return

    await producer.start([], nothing)
    ready = asyncio.Event()
    relaying = asyncio.create_task(relay(broker.url, broker.port, root, ready))
    await ready.wait()
    corpus = samples()
    started = time.perf_counter()
    for number in range(count):
        user, payload = corpus[number % len(corpus)]
        await producer.publish(f"{root}/dsp/in/{user}", payload + _TAG + b"%d-->" % number)
    async with asyncio.timeout(GUARD_SECONDS):
        await consumer.complete.wait()
    seconds = consumer.last_arrival - started
    await producer.publish(f"{root}/dsp/in/{STOP}", b"")
    await relaying
    await producer.stop()
    await sink.stop()
    lost = count - consumer.unique
    return Run(name, round_number, round(seconds, 4), round(count / seconds), lost, consumer.duplicates)


def versions() -> dict[str, str]:
    mosquitto = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True, check=False).stdout
    return {
        "python": platform.python_version(),
        "gmqtt": metadata.version("gmqtt"),
        "aiomqtt": metadata.version("aiomqtt"),
        "paho-mqtt": metadata.version("paho-mqtt"),
        "mosquitto": mosquitto.splitlines()[0] if mosquitto else "unknown",
    }


async def compare(count: int, rounds: int) -> dict[str, object]:
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="mp169-bench-") as folder:
        broker = Mosquitto(Path(folder), {"max_inflight_messages": str(WINDOW)})
        broker.start()
        try:
            for round_number in range(1, rounds + 1):
                for name, relay in RELAYS.items():
                    run = await one_run(broker, name, relay, count, round_number)
                    runs.append(run)
                    print(f"round {round_number} {name}: {run.messages_per_second} msg/s, lost {run.lost}")
        finally:
            broker.stop()
    median = {
        name: statistics.median(run.messages_per_second for run in runs if run.relay == name)
        for name in RELAYS
    }
    return {
        "messages_per_run": count,
        "rounds": rounds,
        "sample_payloads": len(samples()),
        "window": WINDOW,
        "versions": versions(),
        "median_messages_per_second": median,
        "no_loss": all(run.lost == 0 for run in runs),
        "runs": [asdict(run) for run in runs],
    }


def markdown(result: dict[str, object]) -> str:
    median = result["median_messages_per_second"]
    assert isinstance(median, dict)
    runs = result["runs"]
    assert isinstance(runs, list)
    heading = (
        f"QoS 1 relay, {result['messages_per_run']} messages per run, {result['rounds']} interleaved rounds, "
        f"window {result['window']}, no loss: {'yes' if result['no_loss'] else 'NO'}"
    )
    lines = [
        heading,
        "",
        "| relay | median msg/s | runs (msg/s) | lost | duplicates |",
        "|---|---:|---|---:|---:|",
    ]
    for name, value in median.items():
        mine = [run for run in runs if run["relay"] == name]
        figures = ", ".join(str(run["messages_per_second"]) for run in mine)
        lost = sum(run["lost"] for run in mine)
        duplicates = sum(run["duplicates"] for run in mine)
        lines.append(f"| {name} | {value:.0f} | {figures} | {lost} | {duplicates} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(compare(args.messages, args.rounds))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))
    return 0 if result["no_loss"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
