"""Check the nvml probe on a real NVIDIA GPU: a 2 GiB PyTorch allocation must show up as used.

Run directly (`python tests/gpu/nvml_check.py [--gib 2] [--json]`) or through
test_nvml_gpu.py. Exit status: 0 passed, 1 failed, 77 skipped (no GPU, PyTorch or pynvml).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's llmd

from llmd import gpu

SKIP = 77
MiB = gpu.MiB
# cudaMalloc rounds to 2 MiB pages; the driver may add page tables. Other tenants of a shared
# GPU could move the numbers too, so the tolerance is generous but far below the allocation.
TOLERANCE = 256 * MiB


class Skip(Exception):
    """The check cannot run here."""


async def check(gib: float) -> dict[str, Any]:
    """Allocate gib GiB with PyTorch and compare the nvml probe's readings before and after."""
    try:
        import torch
    except ImportError:
        raise Skip("PyTorch is not installed") from None
    if not torch.cuda.is_available():
        raise Skip("no CUDA GPU visible to PyTorch")
    torch.zeros(1, device="cuda")  # create the CUDA context before the baseline
    torch.cuda.synchronize()
    probe = gpu.NvmlProbe()
    try:
        base = await probe.read()
        if base.error is not None and base.error.startswith("pynvml is not installed"):
            raise Skip(base.error)
        if base.error is not None:
            return {"ok": False, "why": f"nvml probe failed: {base.error}"}
        size = int(gib * (1 << 30))
        block = torch.empty(size, dtype=torch.uint8, device="cuda")
        block.fill_(1)
        torch.cuda.synchronize()
        await asyncio.sleep(0.2)
        held = await probe.read()
        del block
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        await asyncio.sleep(0.2)
        freed = await probe.read()
    finally:
        await probe.close()
    grew = held.used_bytes - base.used_bytes
    back = freed.used_bytes - base.used_bytes
    pid = os.getpid()
    # Inside a container the driver may list host PIDs, so a process holding the whole
    # allocation also counts as ours.
    listed = [p for p in held.processes if p.pid == pid or (p.used_bytes or 0) >= size]
    problems = []
    if abs(grew - size) > TOLERANCE:
        problems.append(f"used grew by {grew / MiB:.0f} MiB, expected {size / MiB:.0f} MiB")
    if abs(back) > TOLERANCE:
        problems.append(f"after freeing, used is {back / MiB:+.0f} MiB off the baseline")
    if held.processes and not listed:
        problems.append(f"pid {pid} not among the listed processes {held.processes}")
    return {
        "ok": not problems,
        "why": "; ".join(problems) or None,
        "process_listed": bool(listed) if held.processes else "driver lists no processes",
        "devices": [d.to_dict() for d in base.devices],
        "grew_mib": round(grew / MiB),
        "after_free_mib": round(back / MiB),
        "pid": pid,
        "processes": [p.to_dict() for p in held.processes],
    }


def main() -> int:
    """Run the check and print its result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="GiB to allocate (default 2)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    try:
        result = asyncio.run(check(args.gib))
    except Skip as e:
        result = {"ok": None, "skip": str(e)}
    if args.json:
        print(json.dumps(result, indent=2))
    elif result["ok"] is None:
        print(f"skipped: {result['skip']}")
    else:
        print("passed" if result["ok"] else f"FAILED: {result['why']}")
        print(f"used grew by {result['grew_mib']} MiB; after free {result['after_free_mib']} MiB")
        print(f"process listed: {result['process_listed']}")
    return SKIP if result["ok"] is None else 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
