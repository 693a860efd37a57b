"""The recording format: round trips, line-numbered errors, and live capture."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import replace
from datetime import UTC, datetime
from itertools import count

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.transport import MemoryBroker, MemoryTransport
from simulator.recording import (
    FORMAT,
    InventoryChange,
    PublishItem,
    RecordingError,
    read_recording,
    record,
    write_stream,
)

ITEMS = (
    PublishItem(0.0, "dsp/in/90-B3-D5-1F-30-01-00-01", b"<sr:Request/>", "daily-read"),
    PublishItem(0.25, "dsp/in/90-B3-D5-1F-30-01-00-02", bytes(range(256))),
    InventoryChange(
        1.5,
        ({"device_id": "00-DB-12-00-00-00-01-A0", "import_supplier": "90-B3-D5-1F-30-01-00-02"},),
        "change-of-supplier",
    ),
    PublishItem(1.5, "dsp/in/90-B3-D5-1F-30-01-00-02", b"", "malformed/random-bytes"),
)


def _write_lines(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _header():
    return {"format": FORMAT, "version": 1, "created": "2025-01-01T00:00:00+00:00", "source": "generated"}


def _publish(t=0.0, **changes):
    line = {"t": t, "kind": "publish", "topic": "dsp/in/x", "payload": base64.b64encode(b"x").decode()}
    line.update(changes)
    return line


def test_write_then_read_gives_the_same_items(tmp_path):
    path = tmp_path / "stream.jsonl"
    created = datetime(2025, 1, 31, 22, 0, tzinfo=UTC)
    assert write_stream(ITEMS, path, meta={"seed": 5}, created=created) == len(ITEMS)
    recording = read_recording(path)
    assert recording.items == ITEMS
    assert recording.header.source == "generated"
    assert recording.header.created == created.isoformat()
    assert recording.header.meta == {"seed": 5}
    first = json.loads(path.read_text().splitlines()[0])
    assert first["format"] == "mp169-recording"
    assert first["version"] == 1


_TOPICS = st.lists(st.text("abcxyz019-", min_size=1, max_size=8), min_size=1, max_size=4).map("/".join)
_ITEMS = st.one_of(
    st.builds(PublishItem, st.just(0.0), _TOPICS, st.binary(max_size=64), st.sampled_from(["", "spoofed"])),
    st.builds(
        InventoryChange,
        st.just(0.0),
        st.lists(
            st.dictionaries(st.sampled_from(["device_id", "tariff"]), st.text(max_size=8)),
            min_size=1,
            max_size=3,
        ).map(tuple),
        st.just("change-of-supplier"),
    ),
)


@settings(max_examples=50)
@given(items=st.lists(_ITEMS, max_size=10), gaps=st.lists(st.floats(0, 1e6), min_size=10, max_size=10))
def test_any_stream_round_trips(tmp_path_factory, items, gaps):
    timed, t = [], 0.0
    for item, gap in zip(items, gaps, strict=False):
        t = round(t + gap, 6)
        timed.append(replace(item, t=t))
    path = tmp_path_factory.mktemp("rt") / "stream.jsonl"
    write_stream(timed, path)
    assert read_recording(path).items == tuple(timed)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (_publish(payload="not base64!"), "payload"),
        (_publish(kind="teleport"), "kind"),
        (_publish(t=-1.0), "t"),
        (_publish(topic="dsp/in/+"), "topic"),
        (_publish(extra=1), "extra"),
        ({"t": 1.0, "kind": "inventory", "rows": []}, "rows"),
    ],
)
def test_a_bad_line_is_reported_with_its_number(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    _write_lines(path, [_header(), _publish(), line])
    with pytest.raises(RecordingError, match=rf"bad.jsonl:3: .*{message}"):
        read_recording(path)


def test_not_json_time_going_back_and_a_bad_header_are_reported(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_header()) + "\n{oops\n")
    with pytest.raises(RecordingError, match=r"r.jsonl:2: not JSON"):
        read_recording(path)
    _write_lines(path, [_header(), _publish(2.0), _publish(1.0)])
    with pytest.raises(RecordingError, match=r"r.jsonl:3: t 1.0 is before"):
        read_recording(path)
    _write_lines(path, [{**_header(), "format": "pcap"}, _publish()])
    with pytest.raises(RecordingError, match=r"r.jsonl:1: not a mp169-recording v1 header"):
        read_recording(path)
    path.write_text("")
    with pytest.raises(RecordingError, match=r"r.jsonl:1: empty file"):
        read_recording(path)


async def test_record_captures_live_traffic_with_offsets(tmp_path):
    broker = MemoryBroker()
    publisher = MemoryTransport(broker, "publisher")
    await publisher.start([], _ignore)
    stop = asyncio.Event()
    ticks = count(start=100.0, step=0.5)
    path = tmp_path / "live.jsonl"
    wall = datetime(2025, 2, 1, 3, 0, tzinfo=UTC)
    task = asyncio.create_task(
        record(
            MemoryTransport(broker, "recorder"),
            path,
            ["dsp/#"],
            stop=stop,
            monotonic=lambda: next(ticks),
            wall=lambda: wall,
        )
    )
    while not path.exists():  # noqa: ASYNC110 - the file is written once the recorder is subscribed
        await asyncio.sleep(0)
    await publisher.publish("dsp/in/90-B3-D5-1F-30-01-00-01", b"one")
    await publisher.publish("elsewhere/topic", b"not recorded")
    await publisher.publish("dsp/device/00-DB-12-00-00-00-01-A0/up", b"two")
    await broker.drain()
    stop.set()
    assert await task == 2
    recording = read_recording(path)
    assert recording.header.source == "recorded"
    assert recording.header.created == wall.isoformat()
    assert recording.header.topics == ("dsp/#",)
    assert [(item.t, item.topic, item.payload) for item in recording.items] == [
        (0.5, "dsp/in/90-B3-D5-1F-30-01-00-01", b"one"),
        (1.0, "dsp/device/00-DB-12-00-00-00-01-A0/up", b"two"),
    ]


async def test_record_stopped_before_it_is_connected_writes_no_file(tmp_path):
    class NeverConnects(MemoryTransport):
        async def start(self, subscriptions, handler):
            await asyncio.Event().wait()

    stop = asyncio.Event()
    path = tmp_path / "live.jsonl"
    task = asyncio.create_task(record(NeverConnects(MemoryBroker(), "recorder"), path, stop=stop))
    await asyncio.sleep(0)
    stop.set()
    assert await task is None
    assert not path.exists()


async def _ignore(message):
    return None
