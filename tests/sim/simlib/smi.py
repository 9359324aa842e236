"""A stand-in for `nvidia-smi` reading the simulated GPUs (OLLAMA_SIM_GPU).

It ignores CUDA_VISIBLE_DEVICES, like the real tool, and reports used = external memory plus the
live allocations of simulator processes (no extra driver overhead), free = total - used.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from pathlib import Path

from .gpu import Allocation, Device, GpuFileError, GpuState, used_mib, utilization

DRIVER = "550.54.14"
CUDA = "12.4"
INVALID_ARGS = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help."
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)

HELP = """NVIDIA System Management Interface (simulated for llmd's tests)

    nvidia-smi [-i ID] [-L]
    nvidia-smi --query-gpu=FIELDS --format=csv[,noheader][,nounits]
    nvidia-smi --query-compute-apps=FIELDS --format=csv[,noheader][,nounits]

GPU fields: index, name, uuid, memory.total, memory.used, memory.free, memory.reserved, count,
driver_version, pci.bus_id, compute_cap, utilization.gpu, temperature.gpu, power.draw,
power.limit (utilisation, temperature and power follow the runners computing on the GPU).
Compute-app fields: pid, process_name, used_memory, gpu_uuid, gpu_name, gpu_bus_id.
"""


def _bus_id(d: Device) -> str:
    return f"00000000:{d.index + 1:02X}:00.0"


# field -> (header, unit or None, value function)
GpuField = tuple[str, str | None, Callable[[Device, list[Allocation], int], str]]
GPU_FIELDS: dict[str, GpuField] = {
    "index": ("index", None, lambda d, a, n: str(d.index)),
    "name": ("name", None, lambda d, a, n: d.name),
    "gpu_name": ("name", None, lambda d, a, n: d.name),
    "uuid": ("uuid", None, lambda d, a, n: d.uuid),
    "gpu_uuid": ("uuid", None, lambda d, a, n: d.uuid),
    "memory.total": ("memory.total", "MiB", lambda d, a, n: str(d.total_mib)),
    "memory.used": ("memory.used", "MiB", lambda d, a, n: str(used_mib(d, a))),
    "memory.free": (
        "memory.free",
        "MiB",
        lambda d, a, n: str(max(0, d.total_mib - used_mib(d, a))),
    ),
    "memory.reserved": ("memory.reserved", "MiB", lambda d, a, n: "0"),
    "count": ("count", None, lambda d, a, n: str(n)),
    "driver_version": ("driver_version", None, lambda d, a, n: DRIVER),
    "pci.bus_id": ("pci.bus_id", None, lambda d, a, n: _bus_id(d)),
    "gpu_bus_id": ("pci.bus_id", None, lambda d, a, n: _bus_id(d)),
    "compute_cap": ("compute_cap", None, lambda d, a, n: "8.9"),
    "utilization.gpu": ("utilization.gpu", "%", lambda d, a, n: str(_util(d, a))),
    "temperature.gpu": ("temperature.gpu", None, lambda d, a, n: str(35 + _util(d, a) * 4 // 10)),
    "power.draw": ("power.draw", "W", lambda d, a, n: f"{_power(d, a):.2f}"),
    "power.limit": ("power.limit", "W", lambda d, a, n: f"{d.power_limit_w:.2f}"),
}

IDLE_W = 30.0


def _util(d: Device, allocs: list[Allocation]) -> int:
    return utilization(d, allocs, time.time())


def _power(d: Device, allocs: list[Allocation]) -> float:
    """Idle draw plus the rest of the limit in proportion to utilisation."""
    return IDLE_W + (d.power_limit_w - IDLE_W) * _util(d, allocs) / 100


AppField = tuple[str, str | None, Callable[[int, Device, int], str]]
APP_FIELDS: dict[str, AppField] = {
    "pid": ("pid", None, lambda pid, d, mib: str(pid)),
    "process_name": ("process_name", None, lambda pid, d, mib: _process_name(pid)),
    "name": ("process_name", None, lambda pid, d, mib: _process_name(pid)),
    "used_memory": ("used_gpu_memory", "MiB", lambda pid, d, mib: str(mib)),
    "used_gpu_memory": ("used_gpu_memory", "MiB", lambda pid, d, mib: str(mib)),
    "gpu_uuid": ("gpu_uuid", None, lambda pid, d, mib: d.uuid),
    "gpu_name": ("gpu_name", None, lambda pid, d, mib: d.name),
    "gpu_bus_id": ("gpu_bus_id", None, lambda pid, d, mib: _bus_id(d)),
}


def _process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "ollama"
    for arg in argv:
        if arg.endswith(b"/ollama") or arg == b"ollama":
            return arg.decode(errors="replace")
    return "ollama"


class UsageError(Exception):
    """Bad arguments: message and exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _format_flags(fmt: str | None) -> tuple[bool, bool]:
    if fmt is None:
        raise UsageError(INVALID_ARGS)
    parts = [p.strip() for p in fmt.split(",") if p.strip()]
    if not parts or parts[0] != "csv" or any(p not in ("noheader", "nounits") for p in parts[1:]):
        raise UsageError(f'"{fmt}" is not a valid format.')
    return "noheader" not in parts, "nounits" not in parts


def _table(
    names: list[str], specs: dict[str, tuple[str, str | None, object]], header: bool, units: bool
) -> list[tuple[str, str | None]]:
    cols: list[tuple[str, str | None]] = []
    for f in names:
        if f not in specs:
            raise UsageError(f'Field "{f}" is not a valid field to query.\n')
        h, unit, _ = specs[f]
        cols.append((h, unit))
    return cols


def query_gpu(
    fields: list[str], fmt: str | None, devices: list[Device], allocs: list[Allocation]
) -> list[str]:
    """Lines for --query-gpu."""
    header, units = _format_flags(fmt)
    cols = _table(fields, GPU_FIELDS, header, units)  # type: ignore[arg-type]
    out: list[str] = []
    if header:
        out.append(", ".join(f"{h} [{u}]" if u else h for h, u in cols))
    for d in devices:
        vals = []
        for f, (_h, unit) in zip(fields, cols, strict=True):
            v = GPU_FIELDS[f][2](d, allocs, len(devices))
            vals.append(f"{v} {unit}" if unit and units else v)
        out.append(", ".join(vals))
    return out


def query_apps(
    fields: list[str], fmt: str | None, devices: list[Device], allocs: list[Allocation]
) -> list[str]:
    """Lines for --query-compute-apps: one per (process, GPU)."""
    header, units = _format_flags(fmt)
    cols = _table(fields, APP_FIELDS, header, units)  # type: ignore[arg-type]
    out: list[str] = []
    if header:
        out.append(", ".join(f"{h} [{u}]" if u else h for h, u in cols))
    by_dev = {d.index: d for d in devices}
    usage: dict[tuple[int, int], int] = {}
    for a in allocs:
        if a.device in by_dev:
            usage[(a.device, a.pid)] = usage.get((a.device, a.pid), 0) + a.mib
    for (dev, pid), mib in sorted(usage.items()):
        vals = []
        for f, (_h, unit) in zip(fields, cols, strict=True):
            v = APP_FIELDS[f][2](pid, by_dev[dev], mib)
            vals.append(f"{v} {unit}" if unit and units else v)
        out.append(", ".join(vals))
    return out


def list_gpus(devices: list[Device]) -> list[str]:
    """Lines for -L."""
    return [f"GPU {d.index}: {d.name} (UUID: {d.uuid})" for d in devices]


def summary(devices: list[Device], allocs: list[Allocation]) -> list[str]:
    """A short version of the default table."""
    now = dt.datetime.now().strftime("%a %b %d %H:%M:%S %Y")
    bar = "+" + "-" * 89 + "+"
    head = f" NVIDIA-SMI {DRIVER}    Driver Version: {DRIVER}    CUDA Version: {CUDA}"
    out = [now, bar, f"|{head:<89}|", bar]
    for d in devices:
        used = used_mib(d, allocs)
        mem = f"{used}MiB / {d.total_mib}MiB"
        out.append(f"| {d.index:>3}  {d.name:<40} | {_bus_id(d):<16} | {mem:>22} |")
    out.append(bar)
    out.append("| Processes:" + " " * 78 + "|")
    per: dict[tuple[int, int], int] = {}
    for a in allocs:
        per[(a.device, a.pid)] = per.get((a.device, a.pid), 0) + a.mib
    if not per:
        out.append("|  No running processes found" + " " * 61 + "|")
    for (dev, pid), mib in sorted(per.items()):
        out.append(f"| {dev:>4} {pid:>10}  C   {_process_name(pid):<50} {mib:>8}MiB |")
    out.append(bar)
    return out


def _parse(argv: list[str]) -> dict[str, str | None]:
    opts: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        key, eq, val = a.partition("=")
        if key in ("-h", "--help"):
            opts["help"] = None
        elif key in ("-L", "--list-gpus"):
            opts["list"] = None
        elif key in ("--query-gpu", "--query-compute-apps", "--format", "-i", "--id"):
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(INVALID_ARGS)
                val = argv[i]
            opts["id" if key in ("-i", "--id") else key.lstrip("-")] = val
        else:
            raise UsageError(INVALID_ARGS)
        i += 1
    return opts


def run(argv: list[str]) -> tuple[int, list[str]]:
    """Execute with argv (without the program name); returns (exit code, stdout lines)."""
    opts = _parse(argv)
    if "help" in opts:
        return 0, HELP.splitlines()
    gpu_file = os.environ.get("OLLAMA_SIM_GPU", "").strip()
    try:
        devices, allocs = GpuState(Path(gpu_file) if gpu_file else None).snapshot()
    except GpuFileError:
        return 9, [NO_DRIVER]
    if opts.get("id") is not None:
        wanted = {s.strip() for s in str(opts["id"]).split(",")}
        devices = [d for d in devices if str(d.index) in wanted or d.uuid in wanted]
        if not devices:
            return 6, ["No devices were found"]
    queries = [k for k in ("query-gpu", "query-compute-apps", "list") if k in opts]
    if len(queries) > 1:
        raise UsageError(INVALID_ARGS)
    if "list" in opts:
        return 0, list_gpus(devices)
    if "query-gpu" in opts:
        fields = [f.strip() for f in str(opts["query-gpu"]).split(",") if f.strip()]
        return 0, query_gpu(fields, opts.get("format"), devices, allocs)
    if "query-compute-apps" in opts:
        fields = [f.strip() for f in str(opts["query-compute-apps"]).split(",") if f.strip()]
        return 0, query_apps(fields, opts.get("format"), devices, allocs)
    if "format" in opts:
        raise UsageError(INVALID_ARGS)
    return 0, summary(devices, allocs)


def main(argv: list[str]) -> int:
    """Entry point of tests/sim/nvidia-smi."""
    try:
        code, lines = run(argv[1:])
    except UsageError as e:
        print(e.message)
        return e.code
    for line in lines:
        print(line)
    return code
