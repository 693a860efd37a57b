"""The gateway's signature settings: verification on by default, off only loudly (a warning, a metric)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from gateway.config import Settings, SigningSettings
from gateway.daemon import serve
from gateway.metrics import Metrics
from gateway.options import EXIT_USAGE
from gateway.service import GatewayService, Signatures
from gateway.signing import CertificateError, dsp_credentials, verify
from gateway.transport import MemoryBroker, MemoryTransport
from tests.gateway.test_shell import seed
from tests.gateway.test_signing import LIBRARY, SAMPLE, signed_sample

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


async def test_with_processes_documents_are_signed_and_verified_in_worker_processes(tmp_path: Path) -> None:
    signatures = Signatures.from_settings(settings(tmp_path, processes=1))
    assert isinstance(signatures.executor, ProcessPoolExecutor)
    assert signatures.verify is not None
    loop = asyncio.get_running_loop()
    try:
        answer = await loop.run_in_executor(signatures.executor, signatures.sign, SAMPLE.read_bytes())
        good = await loop.run_in_executor(signatures.executor, signatures.verify, signed_sample())
        tampered = signed_sample().replace(b":1002<", b":1003<", 1)
        bad = await loop.run_in_executor(signatures.executor, signatures.verify, tampered)
    finally:
        signatures.executor.shutdown(wait=True)
    # What a worker signed verifies here, by the packaged DSP certificate; the tree stays in the worker.
    _key, dsp = dsp_credentials(SigningSettings())
    assert verify(answer, LIBRARY).serial == dsp.serial
    assert (good.valid, good.root) == (True, None)
    assert (bad.valid, bad.reason) == (False, "signature-invalid")


def test_without_processes_the_pool_is_threads(tmp_path: Path) -> None:
    signatures = Signatures.from_settings(settings(tmp_path))
    signatures.executor.shutdown()
    assert isinstance(signatures.executor, ThreadPoolExecutor)
