"""deploy/: the compose file, the Grafana dashboard and the systemd unit, checked structurally.

Docker cannot run on the machines the tests run on, so compose.yaml is not started here: its
structure, the commands it runs (parsed by mp169's own parser) and the files it names are checked.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from gateway.cli import build_parser
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from prometheus_client import Metric

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def compose() -> dict[str, object]:
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def mp169_commands(service: dict[str, object]) -> list[list[str]]:
    """The mp169 command lines a service runs (its command, or the mp169 calls in its sh -c)."""
    command = service.get("command")
    assert isinstance(command, list)
    if service.get("entrypoint") == ["sh", "-c"]:
        script = " ".join(command)
        parts = re.split(r"&&|\|\||\(|\)", script)
        return [shlex.split(part)[1:] for part in parts if part.strip().startswith("mp169 ")]
    return [command]


def test_compose_starts_mosquitto_the_gateway_and_the_devices_in_order() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    assert {"mosquitto", "estate", "gateway", "devices", "traffic"} <= set(services)
    gateway, devices = services["gateway"], services["devices"]
    assert gateway["depends_on"]["estate"]["condition"] == "service_completed_successfully"
    assert gateway["healthcheck"]["test"] == ["CMD", "mp169", "ready"]
    assert devices["depends_on"]["gateway"]["condition"] == "service_healthy"
    for name in ("estate", "gateway", "devices", "traffic"):
        assert services[name]["environment"]["MP169_BROKER__URL"] == "mqtt://mosquitto:1883"
        assert "state:/var/lib/mp169" in services[name]["volumes"]
    config = services["mosquitto"]["volumes"][0].split(":")[0]
    assert (DEPLOY / config).is_file()
    build = services["gateway"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file()


def test_every_command_compose_runs_is_one_mp169_accepts() -> None:
    parser = build_parser()
    services = compose()["services"]
    commands = [
        line for service in services.values() if "build" in service for line in mp169_commands(service)
    ]
    assert len(commands) >= 6
    for argv in commands:
        parser.parse_args(argv)  # SystemExit (a failure) on an unknown command or option


def test_the_dockerfile_copies_every_package_and_installs_the_project() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    for package in ("gateway", "rules", "simulator"):
        assert f"COPY {package} {package}" in text
    assert "pip install --no-cache-dir ." in text
    assert 'ENTRYPOINT ["mp169"]' in text


def metric_series() -> set[str]:
    """The series names the gateway's registry exposes (counters as _total, histograms as _bucket...)."""
    families: list[Metric] = list(Metrics().registry.collect())
    names: set[str] = set()
    for family in families:
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_the_grafana_dashboard_queries_only_metrics_the_gateway_exposes() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))
    series = metric_series()
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used.update(re.findall(r"\bmp169_\w+", target["expr"]))
    assert used
    assert used <= series, used - series
    # Every metric family has a panel.
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in series}
    assert {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used} == families
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_systemd_unit_waits_for_readiness_and_does_not_restart_a_taken_over_gateway() -> None:
    unit = (DEPLOY / "mp169-gateway.service").read_text(encoding="utf-8")
    lines = set(unit.splitlines())
    assert {"Type=notify", "NotifyAccess=main", "RestartPreventExitStatus=3 5"} <= lines
