"""`mp169 record` against a real broker, in a terminal: each message printed as it comes (like
`mosquitto_sub -v`), the recording written, Ctrl-C ending it cleanly."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from gateway.mqtt import MqttTransport
from simulator.recording import read_recording
from tests.gateway.test_mqtt import Inbox, settings_for
from tests.terminal import Terminal

if TYPE_CHECKING:
    from pathlib import Path

    from simulator.mosquitto import Mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.slow]

REQUEST = "dsp/in/90-B3-D5-1F-30-01-00-00"


def test_record_prints_each_message_and_writes_the_recording(mosquitto: Mosquitto, tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    terminal = Terminal.mp169("record", str(path), "--broker", mosquitto.url, cwd=tmp_path)
    try:
        terminal.read_until("broker-connected")

        async def publish() -> None:
            user = MqttTransport(settings_for(mosquitto.url), "test-user")
            await user.start([], Inbox())
            await user.publish(REQUEST, b"<sr:Request>\n  short\n</sr:Request>")
            await user.publish("dsp/deadletter", b"x" * 5000)
            await user.stop()

        asyncio.run(publish())
        shown = terminal.read_until("(5,000 bytes)")
        terminal.press_ctrl_c()
        status = terminal.wait()
    finally:
        terminal.close()
    assert status == 0, terminal.text
    assert f"{REQUEST} <sr:Request> short </sr:Request>\n" in shown
    assert f"dsp/deadletter {'x' * 200}... (5,000 bytes)\n" in shown
    assert "recorded 2 messages" in terminal.text
    assert "Traceback" not in terminal.text
    items = read_recording(path).items
    assert [(item.topic, len(item.payload)) for item in items] == [(REQUEST, 34), ("dsp/deadletter", 5000)]
