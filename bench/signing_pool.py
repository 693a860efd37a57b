"""Where the DSP's signatures run: the thread pool, a process pool with a task per document, or a
process pool fed batches of documents (the design the end-to-end note names), side by side.

Each variant signs the same I99 acknowledgements (gateway.responses.response_xml, as the gateway
answers a forwarded request) the way the shell does: an asyncio loop submits every document as it is
produced and awaits the signed ones in order. Per variant: documents signed a second (wall) and the
CPU this process spent a document (the event loop and, for the thread pool, the signing threads: on
a process pool the signatures' own CPU is in the workers). Rounds rotate the order; medians.

    python -m bench.signing_pool [--rounds 5] [--documents 3000] [--workers 2] [--batch 32]

Writes bench/results/signing_pool.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import signing
from gateway.config import SigningSettings
from gateway.responses import response_xml
from rules.codes import ResponseCode
from rules.domain import Eui, RequestId

if TYPE_CHECKING:
    from collections.abc import Coroutine

RESULTS = Path(__file__).parent / "results" / "signing_pool.json"
_USER = Eui("90-B3-D5-1F-30-01-00-00")
_DEVICE = Eui("00-DB-12-34-56-78-90-A0")


def documents(count: int) -> list[bytes]:
    at = datetime.now(UTC)
    return [
        response_xml(
            request_id=RequestId(_USER, _DEVICE, number),
            code=ResponseCode.ACKNOWLEDGED,
            service_reference=None,
            srv="4.8.1",
            at=at,
        )
        for number in range(1, count + 1)
    ]


def sign_batch(batch: list[bytes]) -> list[bytes]:
    """In a worker process started by signing.start_worker: a batch of documents, one pipe message."""
    return [signing.sign_in_worker(document) for document in batch]


async def one_task_each(executor: Executor, sign: functools.partial[bytes] | None, docs: list[bytes]) -> int:
    loop = asyncio.get_running_loop()
    function = sign if sign is not None else signing.sign_in_worker
    futures = [loop.run_in_executor(executor, function, document) for document in docs]
    return sum([len(await future) for future in futures])


async def batched(executor: Executor, docs: list[bytes], size: int) -> int:
    loop = asyncio.get_running_loop()
    futures = [
        loop.run_in_executor(executor, sign_batch, docs[i : i + size]) for i in range(0, len(docs), size)
    ]
    return sum([sum(len(signed) for signed in await future) for future in futures])


async def measure(work: Coroutine[object, object, int], count: int) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    await work
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "documents_per_second": round(count / wall),
        "process_cpu_us_per_document": round(1e6 * cpu / count, 1),
    }


async def main(rounds: int, count: int, workers: int, size: int) -> dict[str, object]:
    settings = SigningSettings(verify=False)
    key, certificate = signing.dsp_credentials(settings)
    sign = functools.partial(signing.sign, key=key, certificate=certificate)
    docs = documents(count)
    threads = ThreadPoolExecutor(max_workers=workers)
    spawn = multiprocessing.get_context("spawn")
    processes = ProcessPoolExecutor(
        workers, spawn, initializer=signing.start_worker, initargs=(settings, 1 << 20)
    )
    try:
        # Warm up: the workers spawned and initialised, the threads started.
        await one_task_each(processes, None, docs[: 4 * workers])
        await one_task_each(threads, sign, docs[: 4 * workers])
        variants = {
            "thread pool, a task per document": lambda: one_task_each(threads, sign, docs),
            "process pool, a task per document": lambda: one_task_each(processes, None, docs),
            f"process pool, batches of {size}": lambda: batched(processes, docs, size),
        }
        names = list(variants)
        runs: list[dict[str, dict[str, float]]] = []
        for number in range(rounds):
            order = names[number % len(names) :] + names[: number % len(names)]
            runs.append({name: await measure(variants[name](), count) for name in order})
    finally:
        threads.shutdown()
        processes.shutdown()
    medians = {
        name: {key: statistics.median(run[name][key] for run in runs) for key in runs[0][name]}
        for name in names
    }
    base = medians[names[0]]["documents_per_second"]
    return {
        "documents": count,
        "workers": workers,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "median": medians,
        "vs_thread_pool": {
            name: round(value["documents_per_second"] / base, 3) for name, value in medians.items()
        },
        "runs": runs,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    options = parser.parse_args()
    result = asyncio.run(main(options.rounds, options.documents, options.workers, options.batch))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["median"], indent=2))
    print(json.dumps(result["vs_thread_pool"], indent=2))
