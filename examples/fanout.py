#!/usr/bin/env python3
"""Fan-out through llmd by task: several models answer the same prompt at once and the answers
are merged (here: printed side by side, and the first to finish is kept as the quick answer).

    python examples/fanout.py [--host http://127.0.0.1:11434] [--tasks code,summarize,chat]
                              [--prompts 3] "your prompt"

All the models answer in parallel only if they are all in GPU memory. When they do not all
fit, llmd does not let them thrash: each model's queue takes its turn on the GPU, by priority
([[model]] priority), serving a batch of requests before making way ([scheduler] swap_batch),
so a fan-out costs a swap per model rather than one per request. The per-task times printed
show it: the models that had to wait for memory answer last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import ollama


async def answer(client: ollama.AsyncClient, task: str, prompt: str) -> tuple[str, str, float]:
    """One task's answer: the model that gave it, its text, and its seconds. A 429 (the model's
    queue is full) is retried after a pause."""
    t0 = time.monotonic()
    while True:
        try:
            r = await client.generate(
                model=f"task:{task}", prompt=prompt, options={"num_predict": 48}
            )
            return r.model or "", r.response, time.monotonic() - t0
        except ollama.ResponseError as e:
            if e.status_code != 429:
                raise
            await asyncio.sleep(1.0)


async def fan_out(
    client: ollama.AsyncClient, tasks: list[str], prompt: str
) -> dict[str, tuple[str, str, float]]:
    got = await asyncio.gather(*(answer(client, t, prompt) for t in tasks))
    return dict(zip(tasks, got, strict=True))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt", nargs="?", default="Explain what a hash map is, briefly.")
    ap.add_argument("--host", default=os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434"))
    ap.add_argument("--key", default=os.environ.get("LLMD_KEY"), help="an inference key, if set")
    ap.add_argument("--tasks", default="code,summarize,chat", help="comma-separated tasks")
    ap.add_argument("--prompts", type=int, default=1, help="fan-outs sent at once (load)")
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else None
    client = ollama.AsyncClient(host=args.host, headers=headers)
    t0 = time.monotonic()
    rounds = await asyncio.gather(
        *(fan_out(client, tasks, args.prompt) for _ in range(args.prompts))
    )
    wall = time.monotonic() - t0
    first = rounds[0]
    for task, (model, text, seconds) in first.items():
        print(f"[task:{task} -> {model}, {seconds:.2f} s] {' '.join(text.split())[:200]}")
    quickest = min(first, key=lambda t: first[t][2])
    print(f"merged: {len(first)} answers; the quickest, from task:{quickest}, is kept first")
    for task in tasks:
        times = [r[task][2] for r in rounds]
        print(f"task:{task}: median {statistics.median(times):.2f} s, slowest {max(times):.2f} s")
    print(f"{args.prompts} fan-outs of {len(tasks)} in {wall:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
