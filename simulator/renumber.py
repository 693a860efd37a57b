"""A stream replayed again into the same store: find its stale RequestIDs and give them fresh counters.

The gateway accepts a RequestID only if its counter is above the highest already accepted from its
originator (E16901 otherwise), so a stream replayed a second time against the same store is answered
E16901 almost throughout and reaches no device. `stale_requests` counts the requests that would be;
`renumber` shifts every originator's counters above the store's, keeping their order and any
deliberate repeats, and rewrites only the Header's RequestID of each payload. Pure functions.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, TypeGuard

from gateway.duis import parse_request_id
from simulator.recording import PublishItem

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from rules.domain import Eui, RequestId
    from simulator.recording import StreamItem

# The first RequestID element is the Header's (responses and the Body carry none before it).
_REQUEST_ID = re.compile(rb"(<(?:\w+:)?RequestID>)([^<]*)(</)")


def _request_id(payload: bytes) -> tuple[re.Match[bytes], RequestId] | None:
    match = _REQUEST_ID.search(payload)
    if match is None:
        return None
    request_id = parse_request_id(match.group(2).decode("ascii", "replace"))
    return None if request_id is None else (match, request_id)


def _is_request(item: StreamItem, inbound: str) -> TypeGuard[PublishItem]:
    return isinstance(item, PublishItem) and item.topic.startswith(f"{inbound}/")


def stale_requests(items: Sequence[StreamItem], counters: Mapping[Eui, int], inbound: str = "dsp/in") -> int:
    """Requests whose RequestID counter is not above the one the store holds for their originator."""
    stale = 0
    for item in items:
        found = _request_id(item.payload) if _is_request(item, inbound) else None
        if found is not None and found[1].counter <= counters.get(found[1].originator, 0):
            stale += 1
    return stale


def renumber(
    items: Sequence[StreamItem], counters: Mapping[Eui, int], inbound: str = "dsp/in"
) -> tuple[list[StreamItem], int]:
    """The stream with each originator's counters raised by the store's counter for it, and how
    many requests were rewritten. Originators the store has not seen keep their counters."""
    renumbered: list[StreamItem] = []
    changed = 0
    for item in items:
        found = _request_id(item.payload) if _is_request(item, inbound) else None
        offset = 0 if found is None else counters.get(found[1].originator, 0)
        if found is None or not offset or not isinstance(item, PublishItem):
            renumbered.append(item)
            continue
        match, request_id = found
        fresh = replace(request_id, counter=request_id.counter + offset)
        payload = item.payload[: match.start(2)] + str(fresh).encode() + item.payload[match.end(2) :]
        renumbered.append(replace(item, payload=payload))
        changed += 1
    return renumbered, changed
