"""The README's "Running against Mosquitto" block, run as it stands in bash, against a private
Mosquitto from simulator/mosquitto.py: only its ports are replaced by free ones, and the line that starts
the broker is played by the fixture."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from simulator.server import free_port

if TYPE_CHECKING:
    from simulator.mosquitto import Mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.slow]

README = Path(__file__).resolve().parents[1] / "README.md"
BROKER_PORT = "18830"
METRICS_PORT = "19169"


def mosquitto_block() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Running against Mosquitto\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the section has a sh block"
    return block.group(1).splitlines()


def test_the_block_uses_private_ports_and_starts_its_own_broker() -> None:
    lines = mosquitto_block()
    assert any(line.startswith(f"BROKER=mqtt://127.0.0.1:{BROKER_PORT}") for line in lines)
    assert [line for line in lines if "mosquitto -p" in line] == [
        line for line in lines if line.startswith(f"/usr/sbin/mosquitto -p {BROKER_PORT} &")
    ]
    assert not re.search(r":1883\b", "\n".join(lines)), "never the default port a system broker uses"
    assert all("sudo" not in line for line in lines)


def test_the_readme_mosquitto_section_works_as_written(mosquitto: Mosquitto, tmp_path: Path) -> None:
    metrics = str(free_port())
    script = [
        line.replace(BROKER_PORT, str(mosquitto.port)).replace(METRICS_PORT, metrics)
        for line in mosquitto_block()
        if "mosquitto -p" not in line  # the fixture is this session's private broker
    ]
    (tmp_path / "run.sh").write_text("set -euo pipefail\n" + "\n".join(script) + "\n", encoding="utf-8")
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "run.sh"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "MP169 invariants" in done.stdout
    assert "FAIL" not in done.stdout
    assert "NOTHING CHECKED" not in done.stdout
    assert (tmp_path / "var" / "report.html").stat().st_size > 0
    log = [json.loads(line) for line in (tmp_path / "var" / "gateway.log").read_text().splitlines()]
    events = [line["event"] for line in log]
    assert "daemon-ready" in events
    assert "gateway-stopped" in events, "the gateway drained and stopped on the README's kill"
    assert "Traceback" not in done.stderr
