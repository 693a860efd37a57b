"""`mp169 check`: decide DUIS Service Request files offline, as the gateway would, one JSON line per file.

Every device a request concerns is taken as known, SMETS2 and Commissioned, flagged iff `--flagged`, and
of the device type `--device-type` (default: one the SRV addresses, so E11 is checked only when given);
the requester's roles are checked only when `--roles` is given, and it is taken as registered for the
device in each of them unless `--unregistered` (then E4 for every SRV that needs a device relationship).
The decision is the one for a verified signature; `signature` says whether it is (against `--certs DIR`,
else the configured certificate library, as `mp169 verify`), and `signature_code` what the gateway would
answer if not.
A file that cannot be read or parsed is a `reject` with the reason; the exit status is 1 if any file
was rejected, else 0. `-` reads one document from standard input (reported as file "-").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import ConfigError
from gateway.duis import DEFAULT_MAX_BYTES, ParseError, parse_request
from gateway.options import eui_argument
from gateway.signing import CertificateError, verify
from gateway.verify import add_certs_argument, library_from, signature_fields
from rules.codes import ResponseCode
from rules.decide import Action, DeviceFacts, RequestFacts, decide
from rules.domain import DCC_EUI, NO_PARTIES, DeviceParties, DeviceStatus, DeviceType, Eui, Role
from rules.table import default_table

if TYPE_CHECKING:
    from gateway.signing import CertificateLibrary
    from rules.domain import ServiceRequest
    from rules.table import RulesTable

EXIT_REJECTED = 1
EXIT_USAGE = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "check",
        help="decide DUIS request files offline (one JSON line per file)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="DUIS request files; - reads one from stdin"
    )
    parser.add_argument(
        "--flagged", action="store_true", help="decide as if every device concerned has the MP169 flag"
    )
    parser.add_argument(
        "--roles",
        type=parse_roles,
        default=None,
        help="the requester's User Roles, e.g. 'IS GS' or IS,GS (default: roles not checked)",
    )
    add_certs_argument(parser)
    parser.add_argument(
        "--device-type",
        type=DeviceType,
        choices=list(DeviceType),
        default=None,
        help="the concerned devices' type (default: a type the SRV addresses)",
    )
    parser.add_argument(
        "--unregistered",
        action="store_true",
        help="the requester is registered for no device (E4 where a device relationship is needed)",
    )
    parser.add_argument(
        "--dcc-eui",
        type=eui_argument,
        default=DCC_EUI,
        help=f"target EUI of non-device requests (default {DCC_EUI})",
    )
    parser.set_defaults(handler=run)


def parse_roles(text: str) -> frozenset[Role]:
    """User Roles separated by spaces or commas; empty means a user with no role."""
    try:
        return frozenset(Role(role) for role in text.replace(",", " ").split())
    except ValueError as exc:
        known = " ".join(role.value for role in Role)
        raise argparse.ArgumentTypeError(f"{exc} (roles: {known})") from exc


def run(args: argparse.Namespace) -> int:
    try:
        library = library_from(args.certs)
    except (CertificateError, ConfigError, OSError) as exc:
        sys.stderr.write(f"mp169 check: {exc}\n")
        return EXIT_USAGE
    table = default_table()
    rejected = False
    for path in args.files:
        try:
            data = _read(path)
        except OSError as exc:
            outcome = _rejected(str(path), ParseError("unreadable", f"{type(exc).__name__}: {exc.strerror}"))
        else:
            outcome = check(
                str(path),
                data,
                table=table,
                flagged=args.flagged,
                roles=args.roles,
                dcc_eui=args.dcc_eui,
                library=library,
                device_type=args.device_type,
                registered=not args.unregistered,
            )
        rejected = rejected or outcome["decision"] == Action.REJECT.value
        sys.stdout.write(json.dumps(outcome) + "\n")
    return EXIT_REJECTED if rejected else 0


STDIN = Path("-")


def _read(path: Path) -> bytes:
    if path == STDIN:
        # One byte over the limit is enough for the parser to reject an oversized document.
        return sys.stdin.buffer.read(DEFAULT_MAX_BYTES + 1)
    return path.read_bytes()


def check(  # noqa: PLR0913 - keyword-only: the assumptions the offline decision is made under
    name: str,
    data: bytes,
    *,
    table: RulesTable,
    flagged: bool,
    roles: frozenset[Role] | None,
    dcc_eui: Eui,
    library: CertificateLibrary,
    device_type: DeviceType | None = None,
    registered: bool = True,
) -> dict[str, object]:
    """The decision for one request document, as a JSON-ready mapping (pure but for the clock)."""
    request = parse_request(data)
    if isinstance(request, ParseError):
        return _rejected(name, request)
    verification = verify(data, library)
    # The device type does not change a routing decision (the flag handler, not decide, checks it).
    user = request.request_id.originator
    parties = DeviceParties(user, user, user, user, user) if registered else NO_PARTIES
    devices = {
        eui: DeviceFacts(
            device_id=eui,
            device_type=device_type or _addressable_type(request, table),
            smets=2,
            status=DeviceStatus.COMMISSIONED,
            parties=parties,
            flagged_meter=eui if flagged else None,
        )
        for eui in request.concerned_devices
    }
    decision = decide(request, RequestFacts(requester_roles=roles, devices=devices, dcc_eui=dcc_eui), table)
    request_id = request.request_id
    return {
        "file": name,
        "request_id": str(request_id),
        "srv": request.srv,
        "command_variant": request.command_variant,
        "originator": request_id.originator,
        "target": request_id.target,
        "concerned_devices": list(request.concerned_devices),
        "scheduled_srv": request.scheduled_srv,
        "decision": decision.action.value,
        "response_code": decision.response_code.value,
        "reason": decision.reason,
        "detail": decision.detail,
        "signature": signature_fields(verification),
        "signature_code": None if verification.code is None else verification.code.value,
    }


def _addressable_type(request: ServiceRequest, table: RulesTable) -> DeviceType:
    """A device type the request's SRV (a 5.1's scheduled SRV) addresses; ESME where it may."""
    srv = request.scheduled_srv or request.srv
    rule = table.srvs.get(srv)
    types = rule.device_types if rule is not None else frozenset()
    return DeviceType.ESME if DeviceType.ESME in types or not types else min(types)


def _rejected(name: str, error: ParseError) -> dict[str, object]:
    request_id = error.request_id
    return {
        "file": name,
        "request_id": None if request_id is None else str(request_id),
        "srv": None,
        "command_variant": None,
        "originator": None if request_id is None else request_id.originator,
        "target": None if request_id is None else request_id.target,
        "concerned_devices": [],
        "scheduled_srv": None,
        "decision": Action.REJECT.value,
        "response_code": ResponseCode.INVALID_REQUEST.value,
        "reason": error.reason,
        "detail": error.detail,
        "signature": None,
        "signature_code": None,
    }
