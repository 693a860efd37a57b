"""The gateway's signature settings: verification on by default, off only loudly (a warning, a metric)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from gateway.config import Settings
from gateway.daemon import serve
from gateway.metrics import Metrics
from gateway.options import EXIT_USAGE
from gateway.service import GatewayService, Signatures
from gateway.signing import CertificateError
from gateway.transport import MemoryBroker, MemoryTransport
from tests.gateway.test_shell import seed

if TYPE_CHECKING:
    from pathlib import Path


def settings(tmp_path: Path, **signing: object) -> Settings:
    return Settings.model_validate(
        {"store": {"path": str(tmp_path / "gw.sqlite3")}, "gateway": {"metrics_port": 0}, "signing": signing}
    )


@pytest.mark.parametrize(("verify", "enabled"), [(True, 1.0), (False, 0.0)])
async def test_verification_is_on_unless_turned_off_and_the_metric_says_which(
    tmp_path: Path, verify: bool, enabled: float
) -> None:
    await seed(tmp_path / "gw.sqlite3")
    metrics = Metrics()
    with capture_logs() as logs:
        service = await GatewayService.start(
            settings(tmp_path, verify=verify), MemoryTransport(MemoryBroker(), "gateway"), metrics=metrics
        )
        await service.stop()
    assert metrics.signature_verification._value.get() == enabled
    assert (service.signatures.verify is not None) is verify
    warnings = [line for line in logs if line["event"] == "signature-verification-off"]
    assert [line["log_level"] for line in warnings] == ([] if verify else ["warning"])


def test_a_bad_certificate_directory_stops_the_start_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "broken.pem").write_text("not a certificate")
    with pytest.raises(CertificateError, match=r"signing\.certificates: .*broken\.pem"):
        Signatures.from_settings(settings(tmp_path, certificates=str(tmp_path / "certs")))


async def test_mp169_run_refuses_a_missing_dsp_key_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(tmp_path / "gw.sqlite3")
    missing = tmp_path / "no-such.key"
    assert await serve(settings(tmp_path, dsp_key=str(missing)), sd_notify=lambda _: None) == EXIT_USAGE
    assert f"signing.dsp_key: {missing}" in capsys.readouterr().err
