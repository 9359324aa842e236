"""Simulated GPUs: a JSON state file shared by every simulator process (and nvidia-smi).

File format (OLLAMA_SIM_GPU):
    {"devices": [{"index": 0, "name": "...", "total_mib": 24564, "external_mib": 0,
                  "uuid": "GPU-..."}],
     "allocations": [{"pid": 123, "start": "456", "device": 0, "mib": 5000,
                      "bytes": 5242880000, "model": "phi3:mini", "runner": "r1"}]}
Writers hold an exclusive flock on "<file>.lock" and replace the file atomically. Allocations
of a process that is gone (or whose pid was reused: the start token differs) are ignored by
every reader and dropped by the next writer, the way a driver frees a dead process's memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
DEFAULT_NAME = "NVIDIA GeForce RTX 4090"
DEFAULT_TOTAL_MIB = 24576


class GpuFileError(Exception):
    """The GPU state file is missing or malformed."""


@dataclass(frozen=True)
class Device:
    """One simulated GPU."""

    index: int
    name: str
    total_mib: int
    external_mib: int
    uuid: str
    power_limit_w: int = 450


@dataclass(frozen=True)
class Allocation:
    """Memory one process holds on one device for one loaded model."""

    pid: int
    start: str
    device: int
    mib: int
    bytes: int
    model: str
    runner: str
    # Wall-clock time until which the runner counts as computing (utilisation, power).
    busy_until: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """As stored in the state file."""
        return {
            "pid": self.pid,
            "start": self.start,
            "device": self.device,
            "mib": self.mib,
            "bytes": self.bytes,
            "model": self.model,
            "runner": self.runner,
            "busy_until": self.busy_until,
        }


def stable_uuid(name: str, index: int) -> str:
    """A GPU UUID that stays the same for the same device description."""
    return "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"llmd-sim-gpu:{index}:{name}"))


def start_token(pid: int) -> str | None:
    """A token for the process's start time (from /proc), or None if it is not running.

    Zombies count as gone: a driver frees memory when a process exits, before it is reaped.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return _kill0(pid)
    rest = stat[stat.rfind(")") + 2 :].split()
    if len(rest) < 20 or rest[0] in ("Z", "X", "x"):
        return None
    return rest[19]


def _kill0(pid: int) -> str | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def is_alive(pid: int, token: str) -> bool:
    """Whether the allocation's owner still runs (same pid and same start time)."""
    now = start_token(pid) if Path("/proc/self/stat").exists() else _kill0(pid)
    return now is not None and (token == "" or now == "" or now == token)


def _device_from_json(i: int, d: Any) -> Device:
    if not isinstance(d, dict):
        raise GpuFileError(f"devices[{i}]: expected an object")
    try:
        index = int(d.get("index", i))
        name = str(d.get("name", DEFAULT_NAME))
        total = int(d["total_mib"])
        external = int(d.get("external_mib", 0))
        power_limit = int(d.get("power_limit_w", 450))
    except (KeyError, TypeError, ValueError) as e:
        raise GpuFileError(f"devices[{i}]: needs integer total_mib ({e})") from None
    uuid = str(d.get("uuid") or stable_uuid(name, index))
    return Device(index, name, total, external, uuid, power_limit)


def parse_state(data: Any) -> tuple[list[Device], list[Allocation]]:
    """Validate a decoded state document."""
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
        raise GpuFileError('expected {"devices": [...]}')
    devices = [_device_from_json(i, d) for i, d in enumerate(data["devices"])]
    allocs: list[Allocation] = []
    for a in data.get("allocations") or []:
        try:
            allocs.append(
                Allocation(
                    int(a["pid"]),
                    str(a.get("start", "")),
                    int(a["device"]),
                    int(a["mib"]),
                    int(a.get("bytes", int(a["mib"]) * MIB)),
                    str(a.get("model", "")),
                    str(a.get("runner", "")),
                    float(a.get("busy_until", 0.0)),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return devices, allocs


class GpuState:
    """Devices and live allocations, either in a shared file or private to this process."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.pid = os.getpid()
        self.token = start_token(self.pid) or ""
        self._private_devices = [
            Device(0, DEFAULT_NAME, DEFAULT_TOTAL_MIB, 0, stable_uuid(DEFAULT_NAME, 0))
        ]
        self._private_allocs: list[Allocation] = []

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        assert self.path is not None
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            if exclusive:
                raise GpuFileError(
                    f"{lock}: permission denied (every simulator needs write access to the "
                    "GPU state file's directory)"
                ) from None
            try:
                fd = os.open(lock, os.O_RDONLY)
            except OSError:
                yield  # a reader without the lock still sees whole files (atomic replace)
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _read_raw(self) -> dict[str, Any]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as e:
            raise GpuFileError(f"{self.path}: {e.strerror}") from None
        except ValueError as e:
            raise GpuFileError(f"{self.path}: invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise GpuFileError(f'{self.path}: expected {{"devices": [...]}}')
        return data

    def snapshot(self) -> tuple[list[Device], list[Allocation]]:
        """Devices and the allocations of live processes."""
        if self.path is None:
            return list(self._private_devices), list(self._private_allocs)
        with self._locked(exclusive=False):
            devices, allocs = parse_state(self._read_raw())
        return devices, [a for a in allocs if is_alive(a.pid, a.start)]

    def update_own(self, fn: Callable[[list[Device], list[Allocation]], list[Allocation]]) -> None:
        """Atomically replace this process's allocations with fn(devices, live allocations).

        fn sees every live allocation (its own included) and returns this process's new set.
        """
        if self.path is None:
            self._private_allocs = fn(list(self._private_devices), list(self._private_allocs))
            return
        with self._locked(exclusive=True):
            raw = self._read_raw()
            devices, allocs = parse_state(raw)
            live = [a for a in allocs if is_alive(a.pid, a.start)]
            mine = fn(devices, live)
            others = [a for a in live if a.pid != self.pid]
            raw["allocations"] = [a.to_json() for a in others + mine]
            tmp = self.path.with_name(f".{self.path.name}.tmp.{self.pid}")
            tmp.write_text(json.dumps(raw, indent=1), encoding="utf-8")
            tmp.replace(self.path)

    def check_writable(self) -> None:
        """Fail early when this process could not record allocations."""
        if self.path is not None and not os.access(self.path.parent, os.W_OK):
            raise GpuFileError(
                f"{self.path.parent}: not writable (the simulator writes the GPU state file "
                "atomically and keeps a lock file next to it)"
            )

    def release_all(self) -> None:
        """Drop every allocation of this process (clean exit)."""
        self.update_own(lambda _d, _a: [])


def select_visible(devices: list[Device], spec: tuple[str, ...] | None) -> list[Device]:
    """Apply CUDA_VISIBLE_DEVICES (indexes or GPU-uuid prefixes; stops at the first bad one)."""
    if spec is None:
        return list(devices)
    out: list[Device] = []
    for item in spec:
        found: Device | None = None
        if item.lstrip("-").isdigit():
            found = next((d for d in devices if d.index == int(item)), None)
        elif item.startswith("GPU-"):
            found = next((d for d in devices if d.uuid.startswith(item)), None)
        if found is None:
            break
        if found not in out:
            out.append(found)
    return out


def free_bytes(devices: list[Device], allocs: list[Allocation]) -> dict[int, int]:
    """Free memory per device index: total - external - live allocations."""
    used: dict[int, int] = {}
    for a in allocs:
        used[a.device] = used.get(a.device, 0) + a.mib
    return {
        d.index: max(0, (d.total_mib - d.external_mib - used.get(d.index, 0)) * MIB)
        for d in devices
    }


def busy_runners(device: Device, allocs: list[Allocation], now: float) -> int:
    """Runners with memory on the device that are computing now."""
    busy = {(a.pid, a.runner) for a in allocs if a.device == device.index and a.busy_until > now}
    return len(busy)


def utilization(device: Device, allocs: list[Allocation], now: float) -> int:
    """GPU utilisation in %: idle 0, one computing runner 80, each more +10, at most 100."""
    k = busy_runners(device, allocs, now)
    return 0 if k == 0 else min(100, 70 + 10 * k)


def used_mib(device: Device, allocs: list[Allocation]) -> int:
    """What nvidia-smi reports as used: external + live allocations."""
    return device.external_mib + sum(a.mib for a in allocs if a.device == device.index)


def to_mib(nbytes: int) -> int:
    """Bytes rounded up to whole MiB, as the allocation is recorded."""
    return math.ceil(nbytes / MIB)
