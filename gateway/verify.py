"""`mp169 verify [--certs DIR] FILE...`: check the XML signature of DUIS documents, one JSON line per file.

Each line: `file, valid, signer (the certificate's EUI), serial (decimal, as KeyInfo has it), reason,
detail`. Reasons: `verified`, `signature-missing`, `signature-invalid`, `certificate-unknown`,
`signer-not-originator`, `certificate-not-current`, `unreadable`. The certificate library is `--certs`
(every *.pem in it), else the configuration's `signing.certificates`, else the packaged DCC Boxed test
certificates. Exit status 1 if any file does not verify.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, load_settings
from gateway.signing import CertificateError, CertificateLibrary, Verification, certificate_library, verify

EXIT_FAILED = 1
EXIT_USAGE = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check the XML signatures of DUIS files (one JSON line per file)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="signed DUIS documents")
    add_certs_argument(parser)
    parser.add_argument(
        "--config", type=Path, default=None, help="configuration file (default ./config.toml)"
    )
    parser.set_defaults(handler=run)


def add_certs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--certs",
        type=Path,
        metavar="DIR",
        help="directory of organisation certificates (default: configured)",
    )


def library_from(certs: Path | None, config: Path | None = None) -> CertificateLibrary:
    """`--certs DIR`, else the configured library. Raises CertificateError, ConfigError or OSError."""
    if certs is not None:
        return CertificateLibrary.from_directory(certs)
    return certificate_library(load_settings(config).signing)


def signature_fields(verification: Verification) -> dict[str, Any]:
    return {
        "valid": verification.valid,
        "signer": verification.signer,
        "serial": None if verification.serial is None else str(verification.serial),
        "reason": verification.reason,
        "detail": verification.detail,
    }


def run(args: argparse.Namespace) -> int:
    try:
        library = library_from(args.certs, args.config)
    except (CertificateError, ConfigError, OSError) as exc:
        sys.stderr.write(f"mp169 verify: {exc}\n")
        return EXIT_USAGE
    failed = False
    for path in args.files:
        try:
            verification = verify(path.read_bytes(), library)
        except OSError as exc:
            verification = Verification("unreadable", f"{type(exc).__name__}: {exc.strerror}")
        failed = failed or not verification.valid
        sys.stdout.write(json.dumps({"file": str(path), **signature_fields(verification)}) + "\n")
    return EXIT_FAILED if failed else 0
