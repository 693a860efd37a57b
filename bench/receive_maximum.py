"""Does the broker hold a client's Receive Maximum? A burst through a private Mosquitto (the shipped
deploy/mosquitto.conf limits) to one subscriber that connects with Receive Maximum w and holds each
message unacknowledged until a ticker lets a batch go (as the gateway's commits do), counting the
most QoS 1 messages its handler held at once (each is acknowledged only after its handler returned, so
that is a lower bound on what the broker had out unacknowledged).

MQTT 5 says the server sends at most w unacknowledged QoS 1 PUBLISHes; the gateway's sessions use it
as their window (README, "Fair sessions"), so the figure here says whether that window holds.

    python -m bench.receive_maximum            # 20,000 messages, w = 200 and 40
    python -m bench.receive_maximum --quick    # 5,000

Writes bench/results/receive_maximum.json and prints one line per window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.gateway_mqtt import versions
from gateway.config import BrokerSettings
from gateway.mqtt import MqttTransport
from simulator.mosquitto import Mosquitto, shipped_limits

if TYPE_CHECKING:
    from gateway.transport import Message

RESULTS = Path(__file__).resolve().parent / "results" / "receive_maximum.json"
WINDOWS = (200, 40)
RELEASE_SECONDS = 0.03
GUARD_SECONDS = 120.0


async def burst(window: int, count: int, workdir: Path) -> dict[str, Any]:
    broker = Mosquitto(workdir / f"mosquitto-{window}", shipped_limits())
    broker.start()
    held: list[asyncio.Future[None]] = []
    received = 0
    most_unacknowledged = 0
    try:

        async def hold(_message: Message) -> None:
            # Acknowledged only after this returns: the messages held here are a lower bound on the
            # broker's unacknowledged ones.
            nonlocal received, most_unacknowledged
            received += 1
            done = asyncio.get_running_loop().create_future()
            held.append(done)
            most_unacknowledged = max(most_unacknowledged, len(held))
            await done

        async def let_go() -> None:
            while True:
                await asyncio.sleep(RELEASE_SECONDS * 2 * random.random())
                batch = held[:]
                del held[:]
                for done in batch:
                    done.set_result(None)

        settings = BrokerSettings(url=broker.url)
        subscriber = MqttTransport(settings, "bench-rm-subscriber", receive_maximum=window)
        await subscriber.start(["bench/rm"], hold)
        publisher = MqttTransport(settings, "bench-rm-publisher")
        await publisher.start([], hold)
        releaser = asyncio.create_task(let_go())
        for n in range(count):
            await publisher.publish("bench/rm", b"%d" % n)
        async with asyncio.timeout(GUARD_SECONDS):
            while received < count:  # noqa: ASYNC110 - counted by the handler
                await asyncio.sleep(0.05)
        releaser.cancel()
        for done in held:
            done.set_result(None)
        await publisher.stop()
        await subscriber.stop()
    finally:
        broker.stop()
    return {"receive_maximum": window, "messages": count, "most_unacknowledged": most_unacknowledged}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 messages")
    args = parser.parse_args()
    count = 5_000 if args.quick else 20_000
    with tempfile.TemporaryDirectory(prefix="mp169-rm-") as workdir:
        runs = [asyncio.run(burst(window, count, Path(workdir))) for window in WINDOWS]
    result = {"versions": versions(), "limits": shipped_limits(), "runs": runs}
    for run in runs:
        print(
            f"Receive Maximum {run['receive_maximum']}: at most {run['most_unacknowledged']:,} of "
            f"{run['messages']:,} messages received and not yet acknowledged"
        )
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
