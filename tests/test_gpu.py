"""Tests for llmd.gpu: the probes at their seams, and the footprint and size helpers."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llmd import gpu
from llmd.gpu import (
    GRAPH_SURCHARGE,
    OLLAMA_MIN_GPU_RESERVE,
    CommandResult,
    Device,
    GiB,
    MiB,
    NvidiaSmiProbe,
    NvmlProbe,
    OllamaProbe,
    ProcessUsage,
)

SIM_SMI = Path(__file__).parent / "sim" / "nvidia-smi"


# --- nvidia-smi CSV parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "0, NVIDIA GeForce RTX 4090, 1234, 24564, 23330\n",
            [Device(0, "NVIDIA GeForce RTX 4090", 24564 * MiB, 1234 * MiB)],
        ),
        (  # two GPUs, odd spacing, CRLF and blank lines
            "  0 ,Tesla T4 ,  0,15360 , 15360  \r\n\n1,Tesla T4,100,15360,15260\r\n\n",
            [Device(0, "Tesla T4", 15360 * MiB, 0), Device(1, "Tesla T4", 15360 * MiB, 100 * MiB)],
        ),
        (  # used not reported: derived from total - free
            "0, NVIDIA GH200, [N/A], 97871, 90000\n",
            [Device(0, "NVIDIA GH200", 97871 * MiB, 7871 * MiB)],
        ),
        (
            "0, GPU, [Not Supported], 1000, 600\n",
            [Device(0, "GPU", 1000 * MiB, 400 * MiB)],
        ),
        (  # free not reported is fine when used is
            "0, GPU, 10, 1000, [N/A]\n",
            [Device(0, "GPU", 1000 * MiB, 10 * MiB)],
        ),
        (  # a name with a comma in it
            "0, Weird, GPU, 10, 1000, 990\n",
            [Device(0, "Weird, GPU", 1000 * MiB, 10 * MiB)],
        ),
        ("0, GPU, 1.5, 2, 0.5\n", [Device(0, "GPU", 2 * MiB, MiB + MiB // 2)]),
        (  # with the telemetry SMI_GPU_QUERY asks for
            "0, NVIDIA H100, 1234, 81559, 80325, 87, 61, 412.34, 700.00\n",
            [Device(0, "NVIDIA H100", 81559 * MiB, 1234 * MiB, None, 87, 61, 412.34, 700)],
        ),
        (  # telemetry a GPU does not report, and a name with commas
            "1, A, B, C, 10, 1000, 990, [N/A], 45, [Not Supported], [N/A]\n",
            [Device(1, "A, B, C", 1000 * MiB, 10 * MiB, None, None, 45, None, None)],
        ),
        ("", []),
        ("\n  \n", []),
    ],
)
def test_parse_smi_gpus(text: str, expected: list[Device]) -> None:
    """GPU query lines become Devices in bytes; [N/A] used memory is derived from total - free."""
    assert gpu.parse_smi_gpus(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0, GPU, 10, [N/A], 990\n", "does not report its memory"),
        ("0, GPU, [N/A], 1000, [N/A]\n", "does not report its memory"),
        ("0, GPU, 10\n", "expected 5 fields"),
        ("No devices were found\n", "expected 5 fields"),
        ("x, GPU, 10, 1000, 990\n", "bad GPU index"),
        ("0, GPU, ten, 1000, 990\n", "memory.used is not a number"),
    ],
)
def test_parse_smi_gpus_errors(text: str, match: str) -> None:
    """Malformed or memory-less GPU lines are a ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=match):
        gpu.parse_smi_gpus(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1234, 500\n", [ProcessUsage(1234, None, 500 * MiB)]),
        (
            "1234, [N/A]\n 99 ,7\n\n",
            [ProcessUsage(1234, None, None), ProcessUsage(99, None, 7 * MiB)],
        ),
        ("1234\n", [ProcessUsage(1234, None, None)]),
        ("", []),
    ],
)
def test_parse_smi_apps(text: str, expected: list[ProcessUsage]) -> None:
    """Compute-app lines become ProcessUsage; [N/A] memory is None."""
    assert gpu.parse_smi_apps(text) == expected


def test_parse_smi_apps_error() -> None:
    """A compute-app line without a pid is a ValueError."""
    with pytest.raises(ValueError, match="bad pid"):
        gpu.parse_smi_apps("No running processes found\n")


# --- nvidia-smi probe at the command-runner seam ----------------------------------------------

GPU_CSV = "0, NVIDIA GeForce RTX 4090, 1234, 24564, 23330\n"


class FakeRunner:
    """A command runner answering the GPU and compute-app queries from canned results."""

    def __init__(self, gpus: CommandResult | BaseException, apps: Any = None) -> None:
        self.answers = {"gpu": gpus, "apps": apps or CommandResult(0, "", "")}
        self.calls: list[tuple[list[str], float]] = []

    async def __call__(self, argv: Sequence[str], timeout_s: float) -> CommandResult:
        self.calls.append((list(argv), timeout_s))
        answer = self.answers["apps" if "--query-compute-apps" in argv[-2] else "gpu"]
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, CommandResult)
        return answer


async def test_smi_probe_reads_devices_and_processes() -> None:
    """The probe runs both CSV queries with its timeout and reports devices and processes."""
    runner = FakeRunner(CommandResult(0, GPU_CSV, ""), CommandResult(0, "4242, 1024\n", ""))
    probe = NvidiaSmiProbe(("/opt/nv/nvidia-smi",), runner=runner, timeout_s=3, clock=lambda: 7.0)
    snap = await probe.read()
    assert snap.error is None and snap.probe == "nvidia-smi" and snap.at == 7.0
    assert snap.devices == [Device(0, "NVIDIA GeForce RTX 4090", 24564 * MiB, 1234 * MiB)]
    assert snap.processes == [ProcessUsage(4242, None, 1024 * MiB)]
    assert runner.calls == [
        (["/opt/nv/nvidia-smi", *gpu.SMI_GPU_QUERY], 3),
        (["/opt/nv/nvidia-smi", *gpu.SMI_APPS_QUERY], 3),
    ]


async def test_smi_probe_asks_for_processes_every_apps_every_s() -> None:
    """The compute processes (shown in status only) are asked for at most every APPS_EVERY_S;
    the readings between (a pressure check every [gpu] interval) run the device query alone,
    one nvidia-smi instead of two, and carry the last process list."""
    now = [100.0]
    runner = FakeRunner(CommandResult(0, GPU_CSV, ""), CommandResult(0, "4242, 1024\n", ""))
    probe = NvidiaSmiProbe(runner=runner, clock=lambda: now[0])
    queries = []
    for t in (100.0, 102.0, 100.0 + gpu.APPS_EVERY_S - 1, 100.0 + gpu.APPS_EVERY_S):
        now[0] = t
        runner.calls.clear()
        snap = await probe.read()
        assert snap.processes == [ProcessUsage(4242, None, 1024 * MiB)]
        queries.append(["--query-compute-apps" in argv[-2] for argv, _ in runner.calls])
    assert queries == [[False, True], [False], [False], [False, True]]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (FileNotFoundError(2, "No such file"), "nvidia-smi not found"),
        (PermissionError(13, "Permission denied"), "nvidia-smi could not run: [Errno 13]"),
        (TimeoutError(), "nvidia-smi timed out after 5s"),
        (
            CommandResult(9, "", "Failed to initialize NVML: Driver/library version mismatch\n"),
            "nvidia-smi exited with status 9: Failed to initialize NVML: Driver/library version",
        ),
        (  # nvidia-smi writes this one to stdout
            CommandResult(6, "No devices were found\n", ""),
            "nvidia-smi exited with status 6: No devices were found",
        ),
        (CommandResult(1, "", ""), "exited with status 1: no output"),
        (CommandResult(0, "garbage\n", ""), "expected 5 fields"),
        (CommandResult(0, "", ""), "nvidia-smi listed no GPUs"),
    ],
)
async def test_smi_probe_errors(answer: CommandResult | BaseException, error: str) -> None:
    """A failing nvidia-smi is reported in the snapshot's error, never raised."""
    snap = await NvidiaSmiProbe(runner=FakeRunner(answer)).read()
    assert snap.error is not None and error in snap.error
    assert snap.devices == [] and snap.processes == []


async def test_smi_probe_process_query_failure_is_not_an_error() -> None:
    """When only the compute-app query fails, devices are reported with no processes."""
    runner = FakeRunner(CommandResult(0, GPU_CSV, ""), CommandResult(2, "", "boom"))
    snap = await NvidiaSmiProbe(runner=runner).read()
    assert snap.error is None and len(snap.devices) == 1 and snap.processes == []


async def test_probe_error_logged_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    """A repeated probe error is logged once; a changed one and a recovery are logged again."""
    runner = FakeRunner(FileNotFoundError())
    probe = NvidiaSmiProbe(runner=runner)
    with caplog.at_level(logging.INFO, logger="llmd.gpu"):
        for _ in range(3):
            await probe.read()
        runner.answers["gpu"] = TimeoutError()
        await probe.read()
        await probe.read()
        runner.answers["gpu"] = CommandResult(0, GPU_CSV, "")
        await probe.read()
        await probe.read()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "gpu probe nvidia-smi: nvidia-smi not found",
        "gpu probe nvidia-smi: nvidia-smi timed out after 5s",
        "gpu probe nvidia-smi: working again",
    ]


async def test_run_command_output_and_status() -> None:
    """run_command returns the exit status and both outputs decoded."""
    result = await gpu.run_command(["sh", "-c", "echo out; echo err >&2; exit 3"], 5)
    assert result == CommandResult(3, "out\n", "err\n")


async def test_run_command_timeout_kills() -> None:
    """A command past its timeout is killed and TimeoutError raised."""
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await gpu.run_command(["sleep", "30"], 0.2)
    assert time.monotonic() - start < 5


async def test_run_command_missing_binary() -> None:
    """A missing executable raises FileNotFoundError, which the probe reports as not found."""
    with pytest.raises(FileNotFoundError):
        await gpu.run_command(["/nonexistent/nvidia-smi"], 1)
    snap = await NvidiaSmiProbe(("/nonexistent/nvidia-smi",)).read()
    assert snap.error == "/nonexistent/nvidia-smi not found"


def _write_sim_gpu_state(path: Path) -> None:
    # The format of tests/sim/simlib/gpu.py: used = external_mib + live processes' allocations.
    state = {
        "devices": [
            {
                "index": 0,
                "name": "NVIDIA GeForce RTX 4090",
                "total_mib": 24564,
                "external_mib": 234,
                "uuid": "GPU-00000000-0000-0000-0000-000000000000",
            }
        ],
        "allocations": [{"pid": os.getpid(), "start": "", "device": 0, "mib": 1000}],
    }
    path.write_text(json.dumps(state))


@pytest.mark.skipif(not SIM_SMI.exists(), reason="tests/sim/nvidia-smi stand-in not there yet")
async def test_sim_nvidia_smi_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe reads the simulator's nvidia-smi stand-in, which reports the shared GPU state."""
    state = tmp_path / "gpu.json"
    _write_sim_gpu_state(state)
    monkeypatch.setenv("OLLAMA_SIM_GPU", str(state))
    command = [str(SIM_SMI)] if os.access(SIM_SMI, os.X_OK) else [sys.executable, str(SIM_SMI)]
    snap = await NvidiaSmiProbe(command, timeout_s=30).read()
    assert snap.error is None, snap.error
    # Idle (no runner computing): 0%, 35 C, the idle draw, the board's limit.
    assert snap.devices[0] == Device(
        0, "NVIDIA GeForce RTX 4090", 24564 * MiB, 1234 * MiB, None, 0, 35, 30, 450
    )
    assert ProcessUsage(os.getpid(), None, 1000 * MiB) in snap.processes


# --- NVML at the pynvml seam ------------------------------------------------------------------


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


class FakeNvml:
    """A pynvml stand-in with scripted devices, processes and failures."""

    NVMLError = FakeNVMLError

    def __init__(self, devices: list[dict[str, Any]], *, init_error: bool = False) -> None:
        self.devices = devices
        self.init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return self.devices[i]

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> Any:
        return h["name"]

    def nvmlDeviceGetUUID(self, h: dict[str, Any]) -> Any:
        if h.get("uuid") is None:
            raise FakeNVMLError("Not Supported")
        return h["uuid"]

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> Any:
        if "mem_error" in h:
            raise FakeNVMLError(h["mem_error"])
        return SimpleNamespace(total=h["total"], used=h["used"], free=h["total"] - h["used"])

    def _scripted(self, h: dict[str, Any], key: str) -> Any:
        if key not in h:
            raise FakeNVMLError("Not Supported")
        return h[key]

    def nvmlDeviceGetUtilizationRates(self, h: dict[str, Any]) -> Any:
        return SimpleNamespace(gpu=self._scripted(h, "util"), memory=0)

    def nvmlDeviceGetTemperature(self, h: dict[str, Any], sensor: int) -> Any:
        assert sensor == 0  # NVML_TEMPERATURE_GPU
        return self._scripted(h, "temp")

    def nvmlDeviceGetPowerUsage(self, h: dict[str, Any]) -> Any:
        return self._scripted(h, "power_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, h: dict[str, Any]) -> Any:
        return self._scripted(h, "limit_mw")

    def nvmlDeviceGetComputeRunningProcesses(self, h: dict[str, Any]) -> list[Any]:
        if h.get("procs") is None:
            raise FakeNVMLError("Not Supported")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in h["procs"]]


def _nvml_devices() -> list[dict[str, Any]]:
    return [
        {
            "name": b"NVIDIA H100 80GB HBM3",
            "uuid": b"GPU-aaaa",
            "total": 80 * GiB,
            "used": 3 * GiB,
            "procs": [(100, 2 * GiB), (101, None)],
            "util": 87,
            "temp": 61,
            "power_mw": 412_345,
            "limit_mw": 700_000,
        },
        # A GPU (or vGPU) that reports none of the telemetry.
        {"name": "Tesla T4", "uuid": None, "total": 16 * GiB, "used": 0, "procs": None},
    ]


async def test_nvml_probe_reads_devices_and_processes() -> None:
    """NVML gives names (bytes or str), UUIDs, memory and per-process usage per device."""
    nv = FakeNvml(_nvml_devices())
    probe = NvmlProbe(nv, clock=lambda: 1.0)
    snap = await probe.read()
    assert snap.error is None and snap.probe == "nvml"
    assert snap.devices == [
        Device(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 3 * GiB, "GPU-aaaa", 87, 61, 412.345, 700),
        Device(1, "Tesla T4", 16 * GiB, 0, None),
    ]
    assert snap.processes == [ProcessUsage(100, 0, 2 * GiB), ProcessUsage(101, 0, None)]
    await probe.read()
    assert nv.init_calls == 1
    await probe.close()
    await probe.close()
    assert nv.shutdown_calls == 1


async def test_nvml_init_failure_is_reported_and_retried() -> None:
    """A failing nvmlInit is the snapshot's error, and is tried again on the next read."""
    nv = FakeNvml(_nvml_devices(), init_error=True)
    probe = NvmlProbe(nv)
    snap = await probe.read()
    assert snap.error == "FakeNVMLError: NVML Shared Library Not Found" and snap.devices == []
    nv.init_error = False
    snap = await probe.read()
    assert snap.error is None and len(snap.devices) == 2 and nv.init_calls == 2
    await probe.close()


async def test_nvml_device_error_is_reported() -> None:
    """An NVML error reading a device's memory fails the reading with that error."""
    devices = _nvml_devices()
    devices[1]["mem_error"] = "GPU is lost"
    probe = NvmlProbe(FakeNvml(devices))
    snap = await probe.read()
    assert snap.error == "FakeNVMLError: GPU is lost" and snap.devices == []
    await probe.close()


async def test_nvml_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pynvml installed the nvml probe reports itself unavailable."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    snap = await NvmlProbe().read()
    assert snap.error is not None and snap.error.startswith("pynvml is not installed")


# --- ollama and none --------------------------------------------------------------------------


def _ps(entries: list[dict[str, Any]] | BaseException) -> Any:
    async def ps() -> list[dict[str, Any]]:
        if isinstance(entries, BaseException):
            raise entries
        return entries

    return ps


async def test_ollama_probe_sums_size_vram() -> None:
    """size_vram is summed per pseudo-device: split over the entry's gpus, else over all."""
    entries = [
        {"name": "a", "size": 5 * GiB, "size_vram": 4 * GiB},  # no gpus: split over both
        {"name": "b", "size_vram": 3 * GiB, "gpus": [1]},
        {"name": "c", "size_vram": 0},  # CPU only
        {"name": "d"},  # malformed entries are ignored
        {"name": "e", "size_vram": 1 * GiB, "gpus": [7]},  # unknown gpus: all
    ]
    probe = OllamaProbe([24 * GiB, 16 * GiB], _ps(entries))
    snap = await probe.read()
    assert snap.error is None and snap.probe == "ollama"
    assert [(d.index, d.total_bytes, d.used_bytes) for d in snap.devices] == [
        (0, 24 * GiB, 2 * GiB + GiB // 2),
        (1, 16 * GiB, 2 * GiB + 3 * GiB + GiB // 2),
    ]


async def test_ollama_probe_ps_failure() -> None:
    """A failing /api/ps is reported in the snapshot's error."""
    snap = await OllamaProbe([GiB], _ps(ConnectionRefusedError(111, "refused"))).read()
    assert snap.error == "/api/ps failed: ConnectionRefusedError: [Errno 111] refused"


async def test_none_probe() -> None:
    """The none probe reports no devices and no error."""
    snap = await gpu.make_probe("none").read()
    assert (snap.probe, snap.devices, snap.error) == ("none", [], None)


def test_make_probe_rejects_bad_kinds() -> None:
    """An unknown kind, or ollama without totals, is a ValueError naming what is expected."""
    with pytest.raises(ValueError, match="expected one of auto, nvml, nvidia-smi, ollama, none"):
        gpu.make_probe("cuda")
    with pytest.raises(ValueError, match=r"needs gpu\.total"):
        gpu.make_probe("ollama", ps=_ps([]))


# --- auto -------------------------------------------------------------------------------------


def _runner(ok: bool) -> FakeRunner:
    return FakeRunner(CommandResult(0, GPU_CSV, "") if ok else FileNotFoundError())


@pytest.mark.parametrize(
    ("nvml_ok", "smi_ok", "ollama", "chosen", "skipped"),
    [
        (True, True, True, "nvml", set()),
        (False, True, True, "nvidia-smi", {"nvml"}),
        (False, False, True, "ollama", {"nvml", "nvidia-smi"}),
        (True, False, False, "nvml", {"ollama"}),
        (False, False, False, "none", {"nvml", "nvidia-smi", "ollama"}),
    ],
)
async def test_auto_fallback_order(
    nvml_ok: bool, smi_ok: bool, ollama: bool, chosen: str, skipped: set[str]
) -> None:
    """Auto takes the first working probe of nvml, nvidia-smi, ollama, else none, and says why."""
    probe = gpu.make_probe(
        "auto",
        nvml=FakeNvml(_nvml_devices(), init_error=not nvml_ok),
        runner=_runner(smi_ok),
        totals=[24 * GiB] if ollama else [],
        ps=_ps([]),
    )
    snap = await probe.read()
    assert snap.probe == chosen and snap.error is None
    assert set(snap.skipped) == skipped
    assert isinstance(probe, gpu.AutoProbe) and probe.chosen == chosen
    if "nvml" in skipped:
        assert snap.skipped["nvml"] == "FakeNVMLError: NVML Shared Library Not Found"
    if "nvidia-smi" in skipped:
        assert snap.skipped["nvidia-smi"] == "nvidia-smi not found"
    if "ollama" in skipped:
        assert snap.skipped["ollama"] == "no gpu.total configured"
    assert (await probe.read()).probe == chosen
    await probe.close()


async def test_auto_takes_ollama_while_children_are_down() -> None:
    """Auto chooses a configured ollama probe even while /api/ps fails, reporting the error."""
    probe = gpu.make_probe(
        "auto",
        nvml=FakeNvml([], init_error=True),
        runner=_runner(False),
        totals=[GiB],
        ps=_ps(ConnectionRefusedError()),
    )
    snap = await probe.read()
    assert snap.probe == "ollama" and snap.error is not None
    assert set(snap.skipped) == {"nvml", "nvidia-smi"}


async def test_auto_reprobes_better_probes_later(caplog: pytest.LogCaptureFixture) -> None:
    """On a fallback, auto retries the better probes after reprobe_s and switches when one works."""
    now = [0.0]
    nv = FakeNvml(_nvml_devices(), init_error=True)
    runner = _runner(False)
    probe = gpu.make_probe("auto", nvml=nv, runner=runner, reprobe_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="llmd.gpu"):
        assert (await probe.read()).probe == "none"
        nv.init_error = False
        now[0] = 30
        assert (await probe.read()).probe == "none"  # not due yet
        now[0] = 61
        snap = await probe.read()
    assert snap.probe == "nvml" and snap.skipped == {"ollama": "no gpu.total configured"}
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "using nvml" in caplog.records[-1].getMessage()
    now[0] = 1000
    assert (await probe.read()).probe == "nvml"
    assert nv.init_calls == 2  # once failing, once working: no reprobe once on the best probe
    await probe.close()
    assert nv.shutdown_calls == 1


# --- snapshot JSON ----------------------------------------------------------------------------


def test_snapshot_to_dict() -> None:
    """to_dict gives bytes and MiB per device, process and in total."""
    snap = gpu.GpuSnapshot(
        "nvml",
        [Device(0, "GPU", 24564 * MiB, 1234 * MiB, "GPU-x")],
        [ProcessUsage(1, 0, 512 * MiB), ProcessUsage(2, None, None)],
        None,
        12.5,
        {"ollama": "no gpu.total configured"},
    )
    d = snap.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["devices"][0] == {
        "index": 0,
        "name": "GPU",
        "uuid": "GPU-x",
        "total_bytes": 24564 * MiB,
        "used_bytes": 1234 * MiB,
        "free_bytes": 23330 * MiB,
        "total_mib": 24564,
        "used_mib": 1234,
        "free_mib": 23330,
        "util_pct": None,
        "temp_c": None,
        "power_w": None,
        "power_limit_w": None,
    }
    assert d["processes"][1] == {
        "pid": 2,
        "device_index": None,
        "used_bytes": None,
        "used_mib": None,
    }
    assert (d["probe"], d["at"], d["error"], d["free_mib"]) == ("nvml", 12.5, None, 23330)
    assert d["skipped"] == {"ollama": "no gpu.total configured"}


def test_free_bytes_never_negative() -> None:
    """A device reporting more used than total has no free memory, not negative."""
    assert Device(0, "x", 10, 20).free_bytes == 0


# --- footprint --------------------------------------------------------------------------------

OVERHEAD = OLLAMA_MIN_GPU_RESERVE + GRAPH_SURCHARGE
LLAMA7B = {
    "general.architecture": "llama",
    "llama.block_count": 32,
    "llama.attention.head_count": 32,
    "llama.embedding_length": 4096,
    "llama.context_length": 4096,
}
LLAMA3_8B = {
    "general.architecture": "llama",
    "llama.block_count": 32,
    "llama.attention.head_count": 32,
    "llama.attention.head_count_kv": 8,
    "llama.attention.key_length": 128,
    "llama.embedding_length": 4096,
    "llama.context_length": 131072,
}


def _show(info: dict[str, Any]) -> dict[str, Any]:
    return {"model_info": info, "details": {"parameter_size": "7B", "quantization_level": "Q4_0"}}


@pytest.mark.parametrize(
    ("info", "num_ctx", "num_parallel", "kv_bytes"),
    [
        # llama.cpp prints "KV self size = 2048.00 MiB" for LLaMA-7B at 4096 context.
        (LLAMA7B, 4096, 1, 2 * GiB),
        (LLAMA7B, 2048, 1, 1 * GiB),
        (LLAMA7B, 16384, 1, 2 * GiB),  # clamped to the trained context of 4096
        (LLAMA7B, 2048, 2, 2 * GiB),
        (LLAMA3_8B, 8192, 1, 1 * GiB),  # GQA: 8 KV heads of 128
        (LLAMA3_8B, 8192, 4, 4 * GiB),
        (  # per-layer KV head counts, some layers without KV
            {"general.architecture": "x", "x.attention.head_count_kv": [8, 0, 8, 0],
             "x.attention.key_length": 128, "x.attention.head_count": 8},
            1024, 1, 2 * 16 * 128 * 1024 * 2,
        ),
        (  # different K and V head sizes
            {"general.architecture": "deepseek2", "deepseek2.block_count": 2,
             "deepseek2.attention.head_count": 16, "deepseek2.attention.head_count_kv": 16,
             "deepseek2.attention.key_length": 192, "deepseek2.attention.value_length": 128},
            1000, 1, 2 * 16 * (192 + 128) * 1000 * 2,
        ),
    ],
)  # fmt: skip
def test_estimate_footprint(
    info: dict[str, Any], num_ctx: int, num_parallel: int, kv_bytes: int
) -> None:
    """Footprint is file size + f16 KV cache + 457 MiB reserve + graph surcharge."""
    size = 3_825_065_984
    got = gpu.estimate_footprint(
        _show(info), num_ctx=num_ctx, num_parallel=num_parallel, file_size=size
    )
    assert got == size + kv_bytes + OVERHEAD


@pytest.mark.parametrize(
    ("show", "file_size"),
    [
        (_show(LLAMA7B), None),
        ({}, 10**9),
        (_show({k: v for k, v in LLAMA7B.items() if k != "general.architecture"}), 10**9),
        (_show({k: v for k, v in LLAMA7B.items() if k != "llama.block_count"}), 10**9),
        (_show({k: v for k, v in LLAMA7B.items() if k != "llama.embedding_length"}), 10**9),
        (_show({**LLAMA7B, "llama.block_count": "32"}), 10**9),
    ],
)
def test_estimate_footprint_missing_info(show: dict[str, Any], file_size: int | None) -> None:
    """Missing file size or model_info keys give None, not a guess."""
    assert gpu.estimate_footprint(show, num_ctx=2048, file_size=file_size) is None
