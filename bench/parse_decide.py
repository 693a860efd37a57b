"""Parse + decide against a bare lxml parse of the same bytes: the real samples, both modes, and body size.

On one pinned core. Every figure is a ratio of two measurements taken side by side in one round (the
order alternating between rounds), and the reported ratio is the median of the per-round ratios over
`--rounds` rounds: adjacent measurements share the machine's noise.

- **samples**: the 129 real DUIS sample requests, round-robin. `gateway` is the hot path as the
  router runs it: `gateway.duis.parse_request`, the facts looked up, `rules.decide.decide`. `bare`
  is `lxml.etree.fromstring` of the same bytes with the same hardened `PARSER`. One device (the
  ESME) is flagged, so refusals are in the mix.
- **verified**: XMLDSig verification on. The verifier parses the document into a tree (here: `bare`'s
  parse) and hands the root over: `parse_request_tree` + decide on top of that parse, against the
  bare parse alone.
- **attribution** (samples): the same gateway with decide stubbed out (`parse only`), the Header read
  off the bytes alone (`header regex`), the well-formedness scan alone (`scan`), the route every
  request took before header-only parsing (`tree route`: a tree parse, then the Header read from it),
  a prototype of the Header read with lxml's `XMLPullParser` fed 512-byte chunks up to `</sr:Header>`
  plus the same scan (`pull-parser header + scan`), and the request model built as the frozen slotted
  dataclass it is against a plain slotted one (`model: frozen / plain`, construction alone). On the
  device requests alone (the fast route's share): parse + decide, and a prototype that decides on the
  Header read off the bytes and never checks the Body (`Header decided, Body unchecked`).
- The curve's documents have DUIS Headers and plausible Body shapes, not schema-valid Bodies.
- **curve**: a device request (CommandVariant 4, the 1.1.1 sample's Header) whose Body grows from 1 KB
  to 512 KB, in two shapes: one text element (`text`, like a firmware image or GBCS payload) and
  many small elements (`elements`, like a tariff matrix).

    python bench/parse_decide.py                  # 7 rounds (about four minutes)
    python bench/parse_decide.py --rounds 5 --quick

Writes bench/results/parse_decide.json and prints Markdown tables for the README.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import field, fields, make_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from gateway.duis import (
    PARSER,
    PLAIN_REQUEST,
    SCANNER,
    ParseError,
    needs_body,
    parse_request,
    parse_request_id,
    parse_request_tree,
)
from rules.decide import DeviceFacts, RequestFacts, decide
from rules.domain import DeviceParties, DeviceStatus, DeviceType, Eui, Role, ServiceRequest
from rules.table import default_table

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "rules" / "duis" / "requests"
RESULTS = Path(__file__).parent / "results" / "parse_decide.json"
DCC = Eui("90-B3-D5-1F-30-00-00-02")
FLAGGED = Eui("00-DB-12-34-56-78-90-A0")
TARGET_RATIO = 0.8
TARGET_LARGE_RATIO = 1.0
BODY_KB = (1, 4, 16, 64, 128, 256, 512)
LARGE_BODY_KB = 64
SHAPES = ("text", "elements")
_TYPES = {
    "A0": DeviceType.ESME,
    "A1": DeviceType.GSME,
    "A2": DeviceType.CHF,
    "A3": DeviceType.GPF,
    "A6": DeviceType.HCALCS,
}
_PULL_CHUNK = 512
_HEADER_TAG = "{http://www.dccinterface.co.uk/ServiceUserGateway}Header"

Pass = tuple[str, "Callable[[], None]"]


def view(requests: Sequence[ServiceRequest]) -> tuple[dict[Eui, DeviceFacts], dict[Eui, frozenset[Role]]]:
    """What the gateway's in-memory view would hold for the requests' devices and users."""
    devices: dict[Eui, DeviceFacts] = {}
    users: dict[Eui, frozenset[Role]] = {}
    for request in requests:
        users[request.request_id.originator] = frozenset(Role)
        for eui in (*request.concerned_devices, request.request_id.target):
            if eui != DCC:
                device_type = _TYPES.get(eui[-2:], DeviceType.PPMID)
                # Registered in every role for the sample's originator, so the full decision path runs.
                user = request.request_id.originator
                devices[eui] = DeviceFacts(
                    eui,
                    device_type,
                    2,
                    DeviceStatus.COMMISSIONED,
                    DeviceParties(user, user, user, user, user),
                    eui if eui == FLAGGED else None,
                )
    return devices, users


class Workload:
    """Documents with the view their requests need, and every pass the benchmark times over them."""

    def __init__(self, documents: list[bytes]) -> None:
        parsed = [parse_request(data) for data in documents]
        requests = [request for request in parsed if isinstance(request, ServiceRequest)]
        if len(requests) != len(documents):
            raise SystemExit(
                f"a document does not parse: {next(p for p in parsed if isinstance(p, ParseError))}"
            )
        self.documents = documents
        self.devices, self.users = view(requests)
        self.table = default_table()

    def _decide(self, request: ServiceRequest | ParseError) -> None:
        if isinstance(request, ParseError):
            raise TypeError(request)
        facts = {eui: self.devices[eui] for eui in request.concerned_devices if eui in self.devices}
        roles = self.users.get(request.request_id.originator, frozenset())
        decide(request, RequestFacts(roles, facts, DCC), self.table)

    def bare(self) -> None:
        for data in self.documents:
            etree.fromstring(data, PARSER)

    def gateway(self) -> None:
        for data in self.documents:
            self._decide(parse_request(data))

    def verified(self) -> None:
        for data in self.documents:
            self._decide(parse_request_tree(etree.fromstring(data, PARSER), data))

    def parse_only(self) -> None:
        for data in self.documents:
            parse_request(data)

    def header_regex(self) -> None:
        for data in self.documents:
            PLAIN_REQUEST.match(data)

    def scan(self) -> None:
        for data in self.documents:
            etree.fromstring(data, SCANNER)

    def tree_route(self) -> None:
        for data in self.documents:
            parse_request_tree(etree.fromstring(data, PARSER), data)

    def header_only_unchecked(self) -> None:
        """Prototype: the plain Header read off the bytes and decided on, the Body never checked."""
        for data in self.documents:
            plain = PLAIN_REQUEST.match(data)
            if plain is None:
                raise TypeError(data[:80])
            request_id = parse_request_id(plain["request_id"].decode())
            if request_id is None:
                raise TypeError(plain["request_id"])
            srv = plain["srv"].decode().strip()
            command_variant = int(plain["command_variant"])
            request = ServiceRequest(
                request_id,
                command_variant,
                plain["service_reference"].decode().strip(),
                srv,
                plain["body"].decode(),
                (request_id.target,),
                raw=data,
            )
            self._decide(request)

    def pull_parser_header_and_scan(self) -> None:
        """Prototype: the Header through lxml's pull parser, then the same no-tree scan of the whole."""
        for data in self.documents:
            pull = etree.XMLPullParser(events=("end",), tag=_HEADER_TAG, remove_blank_text=True)
            for start in range(0, len(data), _PULL_CHUNK):
                pull.feed(data[start : start + _PULL_CHUNK])
                if any(True for _ in pull.read_events()):
                    break
            etree.fromstring(data, SCANNER)


# ServiceRequest's fields in a class without frozen=True: what a mutable model would cost to build.
_PlainRequest = make_dataclass(
    "PlainRequest",
    [
        (f.name, f.type, field(default=f.default, default_factory=f.default_factory, compare=f.compare))
        for f in fields(ServiceRequest)
    ],
    slots=True,
)


def model_passes(requests: Sequence[ServiceRequest]) -> tuple[Pass, Pass]:
    fields_ = [
        (r.request_id, r.command_variant, r.service_reference, r.srv, r.body_element, r.concerned_devices)
        for r in requests
    ]

    def frozen() -> None:
        for values in fields_:
            ServiceRequest(*values)

    def plain() -> None:
        for values in fields_:
            _PlainRequest(*values)

    return ("model: frozen", frozen), ("model: plain", plain)


def timed(run: Callable[[], None], passes: int) -> float:
    """Seconds per pass."""
    gc.collect()
    start = time.perf_counter()
    for _ in range(passes):
        run()
    return (time.perf_counter() - start) / passes


def side_by_side(passes: Sequence[Pass], rounds: int, repeat: int) -> dict[str, list[float]]:
    """Seconds per pass of each, every round measuring all of them, in alternating order."""
    seconds: dict[str, list[float]] = {name: [] for name, _ in passes}
    for _, run in passes:
        run()  # warm-up: caches, the rules table
    for round_number in range(rounds):
        ordered = passes if round_number % 2 == 0 else list(reversed(passes))
        for name, run in ordered:
            seconds[name].append(timed(run, repeat))
    return seconds


def ratio(seconds: Mapping[str, list[float]], baseline: str, name: str) -> dict[str, float | list[float]]:
    """Throughput of `name` over `baseline`: the median of the per-round ratios, and their range."""
    ratios = [base / other for base, other in zip(seconds[baseline], seconds[name], strict=True)]
    return {
        "ratio": round(statistics.median(ratios), 3),
        "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
    }


def micros(seconds: Sequence[float], documents: int) -> float:
    return round(statistics.median(seconds) * 1e6 / documents, 2)


def body_document(header_source: bytes, shape: str, kilobytes: int) -> bytes:
    """A CommandVariant 4 request with the sample's Header and a Body of about `kilobytes` KB."""
    head = header_source.split(b"<sr:Body>", 1)[0]
    tail = b"</sr:Body>\n</sr:Request>\n"
    size = kilobytes * 1024
    if shape == "text":
        text = b"QUJD" * (size // 4)  # base64, like a firmware image or a GBCS payload
        body = b"<sr:SignedPreCommand><sr:GBCSPayload>" + text + b"</sr:GBCSPayload></sr:SignedPreCommand>"
    else:
        block = b"<sr:PriceElement><sr:Index>1</sr:Index><sr:Price>123456</sr:Price></sr:PriceElement>"
        body = b"<sr:UpdateImportTariffPrimaryElement>" + block * (size // len(block))
        body += b"</sr:UpdateImportTariffPrimaryElement>"
    return head + b"<sr:Body>" + body + tail


def repeat_for(documents: Sequence[bytes], budget_seconds: float = 0.05) -> int:
    """Passes per measurement so that one takes about `budget_seconds`."""
    start = time.perf_counter()
    for data in documents:
        etree.fromstring(data, PARSER)
    return max(1, round(budget_seconds / max(time.perf_counter() - start, 1e-9)))


def pin_to_one_core() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def run_samples(rounds: int, repeat: int) -> dict[str, Any]:
    samples = [path.read_bytes() for path in sorted(SAMPLES.glob("*.XML"))]
    work = Workload(samples)
    requests = [r for r in map(parse_request, samples) if isinstance(r, ServiceRequest)]
    # The prototype reads device requests only (no Body), so it runs on those samples, against the bare
    # parse and the gateway on the same ones.
    fast = Workload([r.raw for r in requests if not needs_body(str(r.command_variant), r.srv)])
    frozen, plain = model_passes(requests)
    passes: list[Pass] = [
        ("bare", work.bare),
        ("gateway", work.gateway),
        ("verified", work.verified),
        ("parse only", work.parse_only),
        ("header regex", work.header_regex),
        ("scan", work.scan),
        ("tree route", work.tree_route),
        ("pull-parser header + scan", work.pull_parser_header_and_scan),
        ("device requests: bare", fast.bare),
        ("device requests: parse + decide", fast.gateway),
        ("device requests: prototype, Header decided, Body unchecked", fast.header_only_unchecked),
        frozen,
        plain,
    ]
    seconds = side_by_side(passes, rounds, repeat)
    plain_route = sum(PLAIN_REQUEST.match(data) is not None for data in samples)
    return {
        "samples": len(samples),
        "mean_sample_bytes": round(sum(map(len, samples)) / len(samples)),
        "samples_matching_plain_request": plain_route,
        "requests_per_measurement": repeat * len(samples),
        "microseconds_per_request": {
            name: micros(s, len(fast.documents if name.startswith("device requests") else samples))
            for name, s in seconds.items()
        },
        "gateway": ratio(seconds, "bare", "gateway"),
        "verified": ratio(seconds, "bare", "verified"),
        "attribution": {
            name: ratio(seconds, "bare", name)
            for name in (
                "parse only",
                "header regex",
                "scan",
                "tree route",
                "pull-parser header + scan",
            )
        },
        "device_requests": {
            name: ratio(seconds, "device requests: bare", f"device requests: {name}")
            for name in ("parse + decide", "prototype, Header decided, Body unchecked")
        },
        "fast_route_documents": len(fast.documents),
        "model_frozen_over_plain": round(
            statistics.median(
                f / p for f, p in zip(seconds["model: frozen"], seconds["model: plain"], strict=True)
            ),
            3,
        ),
    }


def run_curve(rounds: int, sizes: Sequence[int]) -> list[dict[str, Any]]:
    header_source = next(SAMPLES.glob("ECS01a_1.1.1_*.XML")).read_bytes()
    rows: list[dict[str, Any]] = []
    for shape in SHAPES:
        for kilobytes in sizes:
            document = body_document(header_source, shape, kilobytes)
            work = Workload([document])
            repeat = repeat_for(work.documents)
            seconds = side_by_side(
                [("bare", work.bare), ("gateway", work.gateway), ("verified", work.verified)], rounds, repeat
            )
            rows.append(
                {
                    "shape": shape,
                    "body_kb": kilobytes,
                    "bytes": len(document),
                    "bare_us": micros(seconds["bare"], 1),
                    "gateway_us": micros(seconds["gateway"], 1),
                    "gateway": ratio(seconds, "bare", "gateway"),
                    "verified": ratio(seconds, "bare", "verified"),
                }
            )
    return rows


def markdown(samples: Mapping[str, Any], curve: Sequence[Mapping[str, Any]]) -> str:
    us = samples["microseconds_per_request"]
    rows = [
        ("bare lxml parse", us["bare"], 1),
        ("parse + decide", us["gateway"], samples["gateway"]["ratio"]),
        ("verified: tree parse, parse_request_tree, decide", us["verified"], samples["verified"]["ratio"]),
        *((name, us[name], value["ratio"]) for name, value in samples["attribution"].items()),
        *(
            (f"device requests only: {name}", us[f"device requests: {name}"], value["ratio"])
            for name, value in samples["device_requests"].items()
        ),
        (
            "ServiceRequest built (frozen dataclass; a plain slotted one in the last column)",
            us["model: frozen"],
            f"{us['model: plain']} µs",
        ),
    ]
    lines = ["| Pass over the 129 samples | µs per request | x bare parse |", "|---|---|---|"]
    lines += [f"| {name} | {micro} | {value} |" for name, micro, value in rows]
    lines += [
        "",
        "| Body | KB | bare µs | parse + decide µs | x bare | verified x bare |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['shape']} | {row['body_kb']} | {row['bare_us']} | {row['gateway_us']} | "
        f"{row['gateway']['ratio']} | {row['verified']['ratio']} |"
        for row in curve
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--passes", type=int, default=10, help="passes over the samples per measurement")
    parser.add_argument("--quick", action="store_true", help="the curve at 1, 16 and 256 KB only")
    args = parser.parse_args()

    core = pin_to_one_core()
    samples = run_samples(args.rounds, args.passes)
    curve = run_curve(args.rounds, (1, 16, 256) if args.quick else BODY_KB)
    large = [row for row in curve if row["body_kb"] >= LARGE_BODY_KB]
    result = {
        "samples": samples,
        "curve": curve,
        "rounds": args.rounds,
        "targets": {"samples_ratio": TARGET_RATIO, "large_body_ratio": f"> {TARGET_LARGE_RATIO}"},
        "meets_samples_target": samples["gateway"]["ratio"] >= TARGET_RATIO,
        "meets_large_body_target": {
            shape: all(row["gateway"]["ratio"] > TARGET_LARGE_RATIO for row in large if row["shape"] == shape)
            for shape in SHAPES
        },
        "pinned_core": core,
        "machine_note": "shared 2-core machine, other sessions running",
        "python": platform.python_version(),
        "lxml": ".".join(map(str, etree.LXML_VERSION)),
        "libxml2": ".".join(map(str, etree.LIBXML_VERSION)),
        "machine": platform.machine(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(samples, curve))


if __name__ == "__main__":
    main()
