"""Every DUIS document on the wire is valid: the simulator's requests, and all the gateway publishes to users.

Validated as a DCC user's adapter would: against DUIS V5.4, or its MP169 extension where the document
uses an MP169 addition (gateway/schema.py).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from gateway.schema import DuisSchema, validate
from simulator.demo import DemoOptions, run_demo
from simulator.estate import generate_estate
from simulator.invariants import MALFORMED_SCENARIO, EventKind
from simulator.recording import PublishItem
from simulator.traffic import TrafficMix, generate_traffic

if TYPE_CHECKING:
    from pathlib import Path


def test_every_generated_request_but_the_malformed_ones_is_valid_duis() -> None:
    items = generate_traffic(generate_estate(3, 60), 3, 1500, TrafficMix()).items
    schemas: Counter[DuisSchema] = Counter()
    malformed = 0
    for item in items:
        if not isinstance(item, PublishItem):
            continue
        verdict = validate(item.payload)
        if item.scenario.startswith(MALFORMED_SCENARIO):
            malformed += 1
            continue
        assert verdict.valid, (item.scenario, verdict.errors)
        schemas[verdict.schema] += 1
    # Both kinds were there: DCC's own SRVs and the MP169 flag requests.
    assert schemas[DuisSchema.V54] > 0
    assert schemas[DuisSchema.MP169] > 0
    assert malformed > 0


async def test_every_document_a_demo_run_publishes_to_users_is_valid(tmp_path: Path) -> None:
    result = await run_demo(DemoOptions(premises=80, requests=800, workdir=tmp_path / "demo"))
    assert result.replay.passed
    schemas: Counter[DuisSchema] = Counter()
    codes: Counter[str] = Counter()
    for event in result.replay.events:
        if event.kind is not EventKind.ANSWER:
            continue
        verdict = validate(event.payload)
        assert verdict.valid, (event.topic, verdict.errors, event.payload[:400])
        schemas[verdict.schema] += 1
        codes[event.payload.split(b"<sr:ResponseCode>", 1)[1].split(b"<", 1)[0].decode()] += 1
    assert schemas[DuisSchema.V54] > 0
    assert schemas[DuisSchema.MP169] > 0
    # Not a vacuous pass: consumer-choice and flag refusals, signature refusals (the spoofed requests,
    # signed by their sender, not the originator), acknowledgements.
    for code in ("E169", "E081504", "E16913", "I99"):
        assert codes[code] > 0, code
