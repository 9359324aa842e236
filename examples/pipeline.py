#!/usr/bin/env python3
"""A pipeline through llmd by task: one model summarises a document, another classifies the
summary. Each step names a task ([[model]] tasks in llmd.toml), not a model, so the mapping
lives in one place and can change without touching the application.

    python examples/pipeline.py [--host http://127.0.0.1:11434] [--documents 8] [--concurrency 4]

Under load, every step waits in llmd's queue for its model (num_parallel requests run at once
per model, the rest wait in order; more than max_queue waiting get 429 with Retry-After, which
this script honours). The timings printed at the end show where the time went: the second
step's wait grows when its model is busy or is making way for a more important one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import ollama

DOCUMENTS = [
    "The quarterly report shows revenue up 12% on strong cloud sales, while hardware declined.",
    "A new firmware update fixes the battery drain reported by users after last month's patch.",
    "The city council approved the bike lane plan after a three-hour public hearing.",
    "Researchers found that the enzyme breaks down plastic twice as fast at higher temperature.",
]
LABELS = ("business", "technology", "politics", "science", "other")


async def call(client: ollama.AsyncClient, task: str, prompt: str) -> tuple[str, float]:
    """One generate by task; the text and the seconds it took. A 429 (llmd's queue for the
    model is full) is retried after a pause, as its Retry-After asks."""
    t0 = time.monotonic()
    while True:
        try:
            r = await client.generate(
                model=f"task:{task}", prompt=prompt, options={"num_predict": 48}
            )
            return r.response, time.monotonic() - t0
        except ollama.ResponseError as e:
            if e.status_code != 429:
                raise
            await asyncio.sleep(1.0)


async def one(
    client: ollama.AsyncClient, doc: str, first: str, then: str
) -> tuple[str, float, float]:
    summary, t_sum = await call(client, first, f"Summarise in one sentence:\n\n{doc}")
    label, t_cls = await call(
        client,
        then,
        f"Classify this summary as one of {', '.join(LABELS)}; answer with the word only.\n\n"
        f"{summary}",
    )
    return label.strip().split()[0] if label.strip() else "other", t_sum, t_cls


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default=os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434"))
    ap.add_argument("--key", default=os.environ.get("LLMD_KEY"), help="an inference key, if set")
    ap.add_argument("--first", default="summarize", help="the first step's task")
    ap.add_argument("--then", default="chat", help="the second step's task")
    ap.add_argument("--documents", type=int, default=len(DOCUMENTS))
    ap.add_argument("--concurrency", type=int, default=4, help="documents in flight at once")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else None
    client = ollama.AsyncClient(host=args.host, headers=headers)
    gate = asyncio.Semaphore(args.concurrency)

    async def limited(i: int) -> tuple[str, float, float]:
        async with gate:
            return await one(client, DOCUMENTS[i % len(DOCUMENTS)], args.first, args.then)

    t0 = time.monotonic()
    results = await asyncio.gather(*(limited(i) for i in range(args.documents)))
    wall = time.monotonic() - t0
    for i, (label, t_sum, t_cls) in enumerate(results):
        print(f"document {i}: {label} (summary {t_sum:.2f} s, classification {t_cls:.2f} s)")
    for step, times in (
        (args.first, [r[1] for r in results]),
        (args.then, [r[2] for r in results]),
    ):
        print(
            f"step task:{step}: median {statistics.median(times):.2f} s, slowest {max(times):.2f} s"
        )
    print(f"{args.documents} documents in {wall:.2f} s, {args.concurrency} at a time")


if __name__ == "__main__":
    asyncio.run(main())
