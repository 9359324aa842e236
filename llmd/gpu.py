"""GPU memory probes (NVML, nvidia-smi, Ollama-reported, none) and model footprint estimates."""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30

PROBE_KINDS = ("auto", "nvml", "nvidia-smi", "ollama", "none")

# Ollama subtracts at least this much from every GPU's free memory (ml/device.go). Each loaded
# model is its own llama-server process with its own CUDA context, so it is charged per model.
OLLAMA_MIN_GPU_RESERVE = 457 * MiB
# llama.cpp's compute graph buffer. Ollama's surcharge is 0, 768 MiB or 2 GiB; the middle tier
# covers the compute buffer of typical 4k-32k contexts with flash attention (on by default).
GRAPH_SURCHARGE = 768 * MiB
# The KV cache is f16 (OLLAMA_KV_CACHE_TYPE's default).
KV_BYTES_PER_ELEMENT = 2

Clock = Callable[[], float]  # wall-clock seconds, injected for tests


@dataclass
class Device:
    """One GPU's memory as a probe saw it."""

    index: int
    name: str
    total_bytes: int
    used_bytes: int
    uuid: str | None = None
    # Telemetry, where the probe can read it (None: not known): % of time a kernel ran over
    # the driver's last sample period, degrees Celsius, watts drawn, enforced power limit.
    util_pct: float | None = None
    temp_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None

    @property
    def free_bytes(self) -> int:
        """Total minus used, never negative."""
        return max(self.total_bytes - self.used_bytes, 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the admin API, in bytes and MiB."""
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "total_bytes": self.total_bytes,
            "used_bytes": self.used_bytes,
            "free_bytes": self.free_bytes,
            "total_mib": _mib(self.total_bytes),
            "used_mib": _mib(self.used_bytes),
            "free_mib": _mib(self.free_bytes),
            "util_pct": self.util_pct,
            "temp_c": self.temp_c,
            "power_w": self.power_w,
            "power_limit_w": self.power_limit_w,
        }


@dataclass
class ProcessUsage:
    """GPU memory held by one process; used_bytes is None where the driver does not say."""

    pid: int
    device_index: int | None
    used_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the admin API, in bytes and MiB."""
        used = self.used_bytes
        return {
            "pid": self.pid,
            "device_index": self.device_index,
            "used_bytes": used,
            "used_mib": None if used is None else _mib(used),
        }


@dataclass
class GpuSnapshot:
    """One probe reading; on error, devices and processes are empty and error says why."""

    probe: str
    devices: list[Device]
    processes: list[ProcessUsage]
    error: str | None
    at: float
    # Set by the auto probe: each probe it passed over, with the reason.
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Total memory over all devices."""
        return sum(d.total_bytes for d in self.devices)

    @property
    def used_bytes(self) -> int:
        """Used memory over all devices."""
        return sum(d.used_bytes for d in self.devices)

    @property
    def free_bytes(self) -> int:
        """Free memory over all devices."""
        return sum(d.free_bytes for d in self.devices)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the admin API and `llmctl status`, in bytes and MiB."""
        return {
            "probe": self.probe,
            "at": self.at,
            "error": self.error,
            "skipped": dict(self.skipped),
            "total_bytes": self.total_bytes,
            "used_bytes": self.used_bytes,
            "free_bytes": self.free_bytes,
            "total_mib": _mib(self.total_bytes),
            "used_mib": _mib(self.used_bytes),
            "free_mib": _mib(self.free_bytes),
            "devices": [d.to_dict() for d in self.devices],
            "processes": [p.to_dict() for p in self.processes],
        }


def _mib(n: int) -> int:
    return round(n / MiB)


class Probe(Protocol):
    """What the daemon uses: read a snapshot, close at shutdown."""

    name: str

    async def read(self) -> GpuSnapshot:
        """Take one reading; never raises for probe failures."""
        ...

    async def close(self) -> None:
        """Release what the probe holds (NVML handle)."""
        ...


class _ProbeError(Exception):
    """A probe failure whose message goes into the snapshot as is."""


class _BaseProbe:
    """Snapshot building and once-per-change error logging shared by the probes."""

    name = "base"

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._last_error: str | None = None
        # The auto probe silences candidates while it chooses, then logs its own summary.
        self.log_errors = True

    def _snapshot(
        self,
        devices: list[Device] | None = None,
        processes: list[ProcessUsage] | None = None,
        error: str | None = None,
    ) -> GpuSnapshot:
        if error != self._last_error and self.log_errors:
            if error is None:
                log.info("gpu probe %s: working again", self.name)
            else:
                log.warning("gpu probe %s: %s", self.name, error)
        self._last_error = error
        if error is not None:
            devices, processes = [], []
        return GpuSnapshot(self.name, devices or [], processes or [], error, self._clock())

    async def read(self) -> GpuSnapshot:
        """Take one reading; never raises for probe failures."""
        raise NotImplementedError

    async def close(self) -> None:
        """Nothing to release by default."""


class NoneProbe(_BaseProbe):
    """No GPU information: no devices, so the daemon's admission check is disabled."""

    name = "none"

    async def read(self) -> GpuSnapshot:
        """An empty snapshot."""
        return self._snapshot()


# --- NVML -------------------------------------------------------------------------------------


def import_pynvml() -> ModuleType:
    """Import pynvml, hiding the deprecation FutureWarning of the PyPI `pynvml` redirect package."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import pynvml

    module: ModuleType = pynvml
    return module


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlProbe(_BaseProbe):
    """Reads memory through NVML (pynvml), initialised once, calls run in a worker thread."""

    name = "nvml"

    def __init__(self, nvml: Any = None, *, clock: Clock = time.time) -> None:
        super().__init__(clock)
        self._nvml = nvml  # the pynvml module, or None to import it on first read
        self._initialized = False
        self._lock = asyncio.Lock()

    async def read(self) -> GpuSnapshot:
        """Init NVML if needed, then read every device's memory and compute processes."""
        async with self._lock:
            if self._nvml is None:
                try:
                    self._nvml = import_pynvml()
                except ImportError as e:
                    return self._snapshot(error=f"pynvml is not installed ({e})")
            try:
                devices, processes = await asyncio.to_thread(self._read_blocking, self._nvml)
            except Exception as e:  # any NVML failure is reported, never fatal
                return self._snapshot(error=f"{type(e).__name__}: {e}".rstrip(": "))
            return self._snapshot(devices, processes)

    def _read_blocking(self, nv: Any) -> tuple[list[Device], list[ProcessUsage]]:
        if not self._initialized:
            nv.nvmlInit()
            self._initialized = True
        devices: list[Device] = []
        processes: list[ProcessUsage] = []
        for i in range(int(nv.nvmlDeviceGetCount())):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            try:
                uuid: str | None = _text(nv.nvmlDeviceGetUUID(handle))
            except nv.NVMLError:
                uuid = None
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            name = _text(nv.nvmlDeviceGetName(handle))
            d = Device(i, name, int(mem.total), int(mem.used), uuid)
            _nvml_telemetry(nv, handle, d)
            devices.append(d)
            try:
                running = nv.nvmlDeviceGetComputeRunningProcesses(handle)
            except nv.NVMLError:
                running = []  # not supported by every driver and GPU; memory is what matters
            for p in running:
                used = getattr(p, "usedGpuMemory", None)  # None under WDDM and some containers
                processes.append(ProcessUsage(int(p.pid), i, None if used is None else int(used)))
        return devices, processes

    async def close(self) -> None:
        """Shut NVML down if this probe initialised it."""
        async with self._lock:
            if self._initialized:
                self._initialized = False
                try:
                    await asyncio.to_thread(self._nvml.nvmlShutdown)
                except Exception as e:
                    log.debug("nvmlShutdown failed: %s", e)


def _nvml_telemetry(nv: Any, handle: Any, d: Device) -> None:
    """A device's utilisation, temperature and power; each may be unsupported (some GPUs,
    vGPUs, containers) and is then left None: memory is what matters."""

    def read(fn: Callable[[], Any]) -> float | None:
        try:
            return float(fn())
        except (nv.NVMLError, TypeError, ValueError, AttributeError):
            return None

    d.util_pct = read(lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu)
    die = getattr(nv, "NVML_TEMPERATURE_GPU", 0)
    d.temp_c = read(lambda: nv.nvmlDeviceGetTemperature(handle, die))
    d.power_w = read(lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000)  # milliwatts
    d.power_limit_w = read(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000)


# --- nvidia-smi -------------------------------------------------------------------------------

SMI_GPU_QUERY = (
    "--query-gpu=index,name,memory.used,memory.total,memory.free,"
    "utilization.gpu,temperature.gpu,power.draw,power.limit",
    "--format=csv,noheader,nounits",
)
SMI_TELEMETRY = ("utilization.gpu", "temperature.gpu", "power.draw", "power.limit")
SMI_APPS_QUERY = ("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")


@dataclass(frozen=True)
class CommandResult:
    """A finished command's exit status and decoded output."""

    returncode: int
    stdout: str
    stderr: str


CommandRunner = Callable[[Sequence[str], float], Awaitable[CommandResult]]


async def run_command(argv: Sequence[str], timeout_s: float) -> CommandResult:
    """Run argv, killing it after timeout_s (raises TimeoutError, or OSError if it cannot start)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except BaseException:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        await proc.wait()  # reap it so no zombie or unclosed transport is left behind
        raise
    assert proc.returncode is not None
    return CommandResult(
        proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )


def _smi_value(raw: str) -> str | None:
    """A field's text, or None for "[N/A]", "[Not Supported]", "N/A" and empty fields."""
    v = raw.strip()
    if not v or v.upper() == "N/A" or (v.startswith("[") and v.endswith("]")):
        return None
    return v


def _smi_mib(raw: str, what: str, line: str) -> int | None:
    v = _smi_value(raw)
    if v is None:
        return None
    try:
        mib = float(v)
    except ValueError:
        raise ValueError(f"nvidia-smi: {what} is not a number in {line!r}") from None
    return round(mib * MiB)


def parse_smi_gpus(text: str) -> list[Device]:
    """Parse SMI_GPU_QUERY's CSV (MiB, no header, no units): index, name, memory used, total
    and free, then utilisation %, temperature, power draw and limit, each possibly "[N/A]".
    A line of fewer than nine fields is read as the first five (memory only)."""
    devices = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) < 5:
            raise ValueError(f"nvidia-smi: expected 5 fields, got {line.strip()!r}")
        extra = len(SMI_TELEMETRY) if len(fields) >= 5 + len(SMI_TELEMETRY) else 0
        tele = fields[len(fields) - extra :]
        fields = fields[: len(fields) - extra]
        # A name containing a comma would shift the fields, so read index first and memory last.
        index_s, name, (used_s, total_s, free_s) = fields[0], ",".join(fields[1:-3]), fields[-3:]
        try:
            index = int(index_s.strip())
        except ValueError:
            raise ValueError(f"nvidia-smi: bad GPU index in {line.strip()!r}") from None
        used = _smi_mib(used_s, "memory.used", line)
        total = _smi_mib(total_s, "memory.total", line)
        free = _smi_mib(free_s, "memory.free", line)
        if used is None and total is not None and free is not None:
            used = total - free
        if total is None or used is None:
            raise ValueError(
                f"nvidia-smi: GPU {index} does not report its memory: {line.strip()!r}"
            )
        d = Device(index, name.strip(), total, used, None)
        if tele:
            d.util_pct, d.temp_c, d.power_w, d.power_limit_w = (_smi_float(v) for v in tele)
        devices.append(d)
    return devices


def _smi_float(raw: str) -> float | None:
    """A telemetry field: a number, or None for "[N/A]", "[Not Supported]" and the like."""
    v = _smi_value(raw)
    if v is None:
        return None
    try:
        return float(v)
    except ValueError:
        return None


def parse_smi_apps(text: str) -> list[ProcessUsage]:
    """Parse `--query-compute-apps=pid,used_memory` CSV; "[N/A]" memory becomes None."""
    processes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split(",")
        try:
            pid = int(fields[0].strip())
        except ValueError:
            raise ValueError(f"nvidia-smi: bad pid in {line.strip()!r}") from None
        used = _smi_mib(fields[1], "used_memory", line) if len(fields) > 1 else None
        processes.append(ProcessUsage(pid, None, used))
    return processes


APPS_EVERY_S = 30.0
"""How often the nvidia-smi probe asks for the compute processes. They are only shown (in
`llmctl status --json`), and each query is one more nvidia-smi run: ~1.5 ms of llmd's CPU and
tens of ms of nvidia-smi's own. The pressure check reads the GPUs every [gpu] interval (2 s),
and two spawns per reading were the largest part of an idle llmd's CPU."""


class NvidiaSmiProbe(_BaseProbe):
    """Reads memory by running `nvidia-smi` CSV queries as a subprocess with a timeout."""

    name = "nvidia-smi"

    def __init__(
        self,
        command: Sequence[str] = ("nvidia-smi",),
        *,
        runner: CommandRunner = run_command,
        timeout_s: float = 5.0,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(clock)
        self._command = tuple(command)
        self._runner = runner
        self._timeout_s = timeout_s
        self._apps_error: str | None = None
        self._apps_at: float | None = None  # when the process list was last asked for
        self._processes: list[ProcessUsage] = []

    async def _query(self, args: Sequence[str]) -> str:
        argv = [*self._command, *args]
        try:
            result = await self._runner(argv, self._timeout_s)
        except TimeoutError:
            raise _ProbeError(f"{argv[0]} timed out after {self._timeout_s:g}s") from None
        except FileNotFoundError:
            raise _ProbeError(f"{argv[0]} not found") from None
        except OSError as e:
            raise _ProbeError(f"{argv[0]} could not run: {e}") from None
        if result.returncode != 0:
            # nvidia-smi prints some failures ("No devices were found") on stdout.
            why = result.stderr.strip() or result.stdout.strip() or "no output"
            raise _ProbeError(f"{argv[0]} exited with status {result.returncode}: {why}")
        return result.stdout

    async def read(self) -> GpuSnapshot:
        """Query the GPUs, then their compute processes (the latter failing is not an error)."""
        try:
            devices = parse_smi_gpus(await self._query(SMI_GPU_QUERY))
        except (_ProbeError, ValueError) as e:
            return self._snapshot(error=str(e))
        if not devices:
            return self._snapshot(error=f"{self._command[0]} listed no GPUs")
        now = self._clock()
        if self._apps_at is not None and 0 <= now - self._apps_at < APPS_EVERY_S:
            return self._snapshot(devices, self._processes)
        self._apps_at = now
        processes: list[ProcessUsage] = []
        apps_error = None
        try:
            processes = parse_smi_apps(await self._query(SMI_APPS_QUERY))
        except (_ProbeError, ValueError) as e:
            apps_error = str(e)
        if apps_error != self._apps_error and apps_error is not None and self.log_errors:
            log.warning("gpu probe nvidia-smi: no process list: %s", apps_error)
        self._apps_error = apps_error
        self._processes = processes
        return self._snapshot(devices, processes)


# --- Ollama-reported ---------------------------------------------------------------------------

PsFetcher = Callable[[], Awaitable[Sequence[Mapping[str, Any]]]]


class OllamaProbe(_BaseProbe):
    """Sums the children's `/api/ps` size_vram against configured totals, one pseudo-device each.

    It sees only models loaded by llmd's children, not other processes on the GPU. An entry may
    carry "gpus" (device indexes, as the daemon knows them from the backend's config); its
    size_vram is split evenly over those devices, or over all devices when it carries none.
    """

    name = "ollama"

    def __init__(self, totals: Sequence[int], ps: PsFetcher, *, clock: Clock = time.time) -> None:
        super().__init__(clock)
        self._totals = list(totals)
        self._ps = ps

    async def read(self) -> GpuSnapshot:
        """Fetch the ps entries and attribute their VRAM to the pseudo-devices."""
        if not self._totals:
            return self._snapshot(error="no gpu.total configured")
        try:
            entries = await self._ps()
        except Exception as e:  # a child being down is reported, never fatal
            return self._snapshot(error=f"/api/ps failed: {type(e).__name__}: {e}".rstrip(": "))
        n = len(self._totals)
        used = [0] * n
        for entry in entries:
            vram = entry.get("size_vram")
            if not isinstance(vram, int) or isinstance(vram, bool) or vram <= 0:
                continue
            gpus = entry.get("gpus")
            targets = [g for g in gpus if isinstance(g, int) and 0 <= g < n] if gpus else []
            targets = targets or list(range(n))
            share, rest = divmod(vram, len(targets))
            for k, g in enumerate(targets):
                used[g] += share + (rest if k == 0 else 0)
        devices = [
            Device(i, "ollama-reported", total, used[i], None)
            for i, total in enumerate(self._totals)
        ]
        return self._snapshot(devices, [])


# --- auto --------------------------------------------------------------------------------------


class AutoProbe(_BaseProbe):
    """Uses the first candidate that works (nvml, nvidia-smi, ollama), retrying better ones later.

    A hardware probe is chosen when it reads without error and lists at least one GPU; the
    ollama probe, when configured, is chosen even while its children are down. With none left it
    behaves as `none`. While on a fallback it retries the better candidates every reprobe_s, so a
    driver that loads after llmd starts is picked up.
    """

    name = "auto"

    def __init__(
        self,
        candidates: Sequence[_BaseProbe],
        *,
        unavailable: Mapping[str, str] | None = None,
        reprobe_s: float = 300.0,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(clock)
        self._candidates = list(candidates)
        self._unavailable = dict(unavailable or {})
        self._reprobe_s = reprobe_s
        self._none = NoneProbe(clock)
        self._chosen: _BaseProbe | None = None
        self._rank = len(self._candidates)
        self._chosen_at = 0.0
        self._skipped: dict[str, str] = {}
        self._choosing = asyncio.Lock()
        for c in self._candidates:
            c.log_errors = False

    @property
    def chosen(self) -> str | None:
        """Name of the probe in use, None before the first read."""
        return None if self._chosen is None else self._chosen.name

    @property
    def skipped(self) -> dict[str, str]:
        """Each probe passed over, with the reason."""
        return dict(self._skipped)

    async def read(self) -> GpuSnapshot:
        """Read through the chosen probe, choosing (again) first when due."""
        snap: GpuSnapshot | None = None
        async with self._choosing:
            now = self._clock()
            if self._chosen is None or (
                self._rank > 0 and now - self._chosen_at >= self._reprobe_s
            ):
                snap = await self._choose(now)
        assert self._chosen is not None
        if snap is None:
            snap = await self._chosen.read()
        snap.skipped = self.skipped
        return snap

    async def _choose(self, now: float) -> GpuSnapshot | None:
        self._chosen_at = now
        found: tuple[int, _BaseProbe, GpuSnapshot] | None = None
        for rank, cand in enumerate(self._candidates[: self._rank]):
            snap = await cand.read()
            # The ollama probe is taken even while /api/ps fails: the children may be starting.
            if (snap.error is None and snap.devices) or cand.name == "ollama":
                found = rank, cand, snap
                break
            self._skipped[cand.name] = snap.error or "no GPUs found"
            await cand.close()
        if found is None:
            if self._chosen is None:
                self._chosen = self._none
                self._skipped.update(self._unavailable)
                log.warning("gpu probe auto: no GPU probe works (%s)", _reasons(self._skipped))
            return None
        rank, cand, snap = found
        old, self._chosen, self._rank = self._chosen, cand, rank
        cand.log_errors = True
        for c in self._candidates[rank:]:  # those after the chosen one were not passed over
            self._skipped.pop(c.name, None)
        self._skipped.update(self._unavailable)
        if old is not None and old is not cand:
            await old.close()
        log.info("gpu probe auto: using %s (skipped: %s)", cand.name, _reasons(self._skipped))
        if snap.error is not None:  # its own once-per-change logging was silenced until now
            log.warning("gpu probe %s: %s", cand.name, snap.error)
        return snap

    async def close(self) -> None:
        """Close every candidate."""
        for c in self._candidates:
            await c.close()


def _reasons(skipped: Mapping[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"


def make_probe(
    kind: str = "auto",
    *,
    nvml: Any = None,
    smi_command: Sequence[str] = ("nvidia-smi",),
    runner: CommandRunner = run_command,
    timeout_s: float = 5.0,
    totals: Sequence[int] = (),
    ps: PsFetcher | None = None,
    reprobe_s: float = 300.0,
    clock: Clock = time.time,
) -> Probe:
    """Build the probe named by `[gpu] probe`; nvml and runner are the test seams."""
    if kind == "nvml":
        return NvmlProbe(nvml, clock=clock)
    if kind == "nvidia-smi":
        return NvidiaSmiProbe(smi_command, runner=runner, timeout_s=timeout_s, clock=clock)
    if kind == "ollama":
        if not totals or ps is None:
            raise ValueError("gpu.probe = 'ollama' needs gpu.total and the children's /api/ps")
        return OllamaProbe(totals, ps, clock=clock)
    if kind == "none":
        return NoneProbe(clock)
    if kind == "auto":
        candidates: list[_BaseProbe] = [
            NvmlProbe(nvml, clock=clock),
            NvidiaSmiProbe(smi_command, runner=runner, timeout_s=timeout_s, clock=clock),
        ]
        unavailable = {}
        if totals and ps is not None:
            candidates.append(OllamaProbe(totals, ps, clock=clock))
        else:
            unavailable["ollama"] = "no gpu.total configured" if not totals else "no /api/ps"
        return AutoProbe(candidates, unavailable=unavailable, reprobe_s=reprobe_s, clock=clock)
    raise ValueError(f"unknown GPU probe {kind!r}: expected one of {', '.join(PROBE_KINDS)}")


# --- sizes and footprints ----------------------------------------------------------------------


def _info_int(info: Mapping[str, Any], key: str) -> int | None:
    v = info.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        return None
    return int(v)


def estimate_footprint(
    show: Mapping[str, Any],
    *,
    num_ctx: int,
    num_parallel: int = 1,
    file_size: int | None = None,
) -> int | None:
    """Predicted GPU bytes of a model from its `/api/show` response and `/api/tags` file size.

    Weights (the file size) + f16 KV cache + Ollama's per-GPU minimum reserve + a graph
    surcharge, as Ollama's own pre-flight check does; None when anything needed is missing.
    """
    if num_ctx < 1 or num_parallel < 1:
        raise ValueError("num_ctx and num_parallel must be at least 1")
    info = show.get("model_info")
    if not isinstance(info, Mapping) or file_size is None or file_size <= 0:
        return None
    arch = info.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        return None
    layers = _info_int(info, f"{arch}.block_count")
    heads = _info_int(info, f"{arch}.attention.head_count")
    # Some architectures give per-layer lists of KV heads (and skip KV on some layers).
    kv_raw = info.get(f"{arch}.attention.head_count_kv")
    if isinstance(kv_raw, list):
        if not all(isinstance(x, int) for x in kv_raw):
            return None
        kv_heads_total: int | None = sum(kv_raw)
    else:
        kv = _info_int(info, f"{arch}.attention.head_count_kv") or heads  # MHA omits head_count_kv
        kv_heads_total = None if kv is None or layers is None else kv * layers
    key_len = _info_int(info, f"{arch}.attention.key_length")
    if key_len is None:
        embedding = _info_int(info, f"{arch}.embedding_length")
        if embedding is None or heads is None:
            return None
        key_len = embedding // heads
    value_len = _info_int(info, f"{arch}.attention.value_length") or key_len
    if kv_heads_total is None:
        return None
    ctx = num_ctx
    trained = _info_int(info, f"{arch}.context_length")
    if trained is not None:
        ctx = min(ctx, trained)
    kv_cache = kv_heads_total * (key_len + value_len) * ctx * num_parallel * KV_BYTES_PER_ELEMENT
    return file_size + kv_cache + OLLAMA_MIN_GPU_RESERVE + GRAPH_SURCHARGE
