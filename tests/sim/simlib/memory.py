"""Memory footprint of a loaded model and where its layers go (GPU(s), partly CPU, CPU only).

footprint = file size + f16 KV cache + graph overhead, where
    kv    = 2 * layers * kv_heads * head_dim * (num_ctx * num_parallel) * 2 bytes
            (llm.PredictServerVRAM's f16 KV term, research/ollama-facts.md section 3)
    graph = GRAPH_BYTES (a constant 256 MiB compute-graph/overhead term)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .catalog import ModelSpec
from .gpu import MIB

GRAPH_BYTES = 256 * MIB
# server/sched.go pre-flight: with other models loaded, a new one must fit in 80% of free memory.
PREFLIGHT_FRACTION = 0.8
# Time per token of a layer on the CPU, relative to the GPU (a fully CPU model is 10x slower).
CPU_SLOWDOWN = 10.0


class OutOfMemory(Exception):
    """An explicit num_gpu asks for more GPU memory than there is."""


def kv_bytes(spec: ModelSpec, num_ctx: int, num_parallel: int) -> int:
    """The f16 KV cache for num_ctx tokens in each of num_parallel slots."""
    return 2 * spec.layers * spec.kv_heads * spec.head_dim * num_ctx * num_parallel * 2


@dataclass(frozen=True)
class Estimate:
    """Sizes of one model at one context."""

    total: int
    layers: int
    layer_bytes: float

    def need(self, gpu_layers: int) -> int:
        """GPU bytes for gpu_layers layers (all layers = total)."""
        if gpu_layers <= 0:
            return 0
        if gpu_layers >= self.layers:
            return self.total
        return GRAPH_BYTES + int(gpu_layers * self.layer_bytes)


def estimate(spec: ModelSpec, num_ctx: int, num_parallel: int) -> Estimate:
    """Footprint of spec loaded with num_ctx and num_parallel."""
    weights_kv = spec.size + kv_bytes(spec, num_ctx, num_parallel)
    return Estimate(weights_kv + GRAPH_BYTES, spec.layers, weights_kv / spec.layers)


@dataclass(frozen=True)
class Placement:
    """Bytes per device index and how many layers run on the GPU."""

    per_device: dict[int, int]
    gpu_layers: int
    layers: int

    @property
    def vram(self) -> int:
        """size_vram."""
        return sum(self.per_device.values())

    @property
    def slowdown(self) -> float:
        """Time-per-token factor: 1 on the GPU, CPU_SLOWDOWN fully on the CPU, linear between."""
        cpu = 1.0 - self.gpu_layers / self.layers
        return 1.0 + (CPU_SLOWDOWN - 1.0) * cpu


def requested_layers(est: Estimate, num_gpu: int) -> int:
    """num_gpu < 0 means automatic (all layers if they fit)."""
    return est.layers if num_gpu < 0 else min(num_gpu, est.layers)


def predicted_vram(est: Estimate, num_gpu: int) -> int:
    """What the scheduler's pre-flight check compares with free memory."""
    return est.need(requested_layers(est, num_gpu))


def _spread(need: int, free: dict[int, int]) -> dict[int, int]:
    total = sum(free.values())
    out: dict[int, int] = {}
    left = need
    items = sorted(free.items(), key=lambda kv: -kv[1])
    for i, (idx, f) in enumerate(items):
        share = left if i == len(items) - 1 else min(f, need * f // total)
        out[idx] = share
        left -= share
    return {k: v for k, v in out.items() if v > 0}


def place(est: Estimate, num_gpu: int, free: dict[int, int]) -> Placement:
    """Put the model on the best single GPU, else across GPUs, else partly (or fully) on the CPU.

    free maps the visible devices to their free bytes. An explicit num_gpu that cannot fit raises
    OutOfMemory (llama-server's cudaMalloc failure).
    """
    layers = requested_layers(est, num_gpu)
    if layers == 0 or not free:
        return Placement({}, 0, est.layers)
    need = est.need(layers)
    best = max(free, key=lambda i: (free[i], -i))
    if need <= free[best]:
        return Placement({best: need}, layers, est.layers)
    if need <= sum(free.values()):
        return Placement(_spread(need, free), layers, est.layers)
    if num_gpu >= 0:
        raise OutOfMemory(
            f"cudaMalloc failed: out of memory (need {math.ceil(need / MIB)} MiB on the GPU)"
        )
    room = sum(free.values()) - GRAPH_BYTES
    fit = 0 if room <= 0 else min(est.layers - 1, int(room // est.layer_bytes))
    if fit <= 0:
        return Placement({}, 0, est.layers)
    return Placement(_spread(est.need(fit), free), fit, est.layers)
