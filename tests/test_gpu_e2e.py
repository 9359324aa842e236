"""End to end on a small simulated GPU: admission, priority eviction, pins, pressure, no spill.

Footprints at the default 4096 context (simulator formula, tests/sim/README.md):
codellama:7b 6.05 GiB, mistral:7b 4.82 GiB, phi3:mini 3.78 GiB, together 14.65 GiB; the GPU
has 14 GiB. llmd's first estimate of a model is ~1 GiB more than the simulator's size.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from llmdproc import Llmd, cleanup, make_llmd, pull, wait_for
from simproc import set_external_mib, start_sim, write_gpu_file

CODE = "codellama:7b-code-q4_K_M"
CHAT = "mistral:7b-instruct-q4_K_M"
SMALL = "phi3:mini"
GPU_MIB = 14 * 1024
DEVICE = {"index": 0, "name": "NVIDIA GeForce RTX 4080", "total_mib": GPU_MIB}
CTX = {"OLLAMA_CONTEXT_LENGTH": "4096"}

Factory = Callable[..., Llmd]


@pytest.fixture
def gpu_daemon(tmp_path: Path) -> Iterator[Factory]:
    made: list[Llmd] = []

    def make(models: list[dict[str, Any]], speed: str = "20", **sections: dict[str, Any]) -> Llmd:
        gpu = {"interval": "0.5s", "admission_timeout": "3s", "probe": "nvidia-smi"}
        gpu.update(sections.pop("gpu", {}))
        d = make_llmd(
            tmp_path / f"d{len(made)}",
            models=models,
            sections={"gpu": gpu, **sections},
            backend_extra=[{"env": CTX}],
            sim_env={"OLLAMA_SIM_SPEED": speed},
            gpu_devices=[DEVICE],
        )
        made.append(d)
        d.start()
        for m in (CODE, CHAT, SMALL):
            pull(d, m)
        return d

    yield make
    for d in made:
        cleanup(d)


def generate(base: str, model: str, **extra: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"model": model, "prompt": "hello", "stream": False, **extra}
    req = urllib.request.Request(base + "/api/generate", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def ps(base: str) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(base + "/api/ps", timeout=10) as r:
        return {m["name"]: m for m in json.loads(r.read())["models"]}


class SpillWatch:
    """Polls a child's /api/ps in the background and records any partial load."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.partial: list[tuple[str, int, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for m in ps(self.base).values():
                    if m["size_vram"] < m["size"]:
                        self.partial.append((m["name"], m["size_vram"], m["size"]))
            except OSError:
                pass
            time.sleep(0.05)

    def __enter__(self) -> SpillWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def test_low_priority_leaves_first_where_ollama_evicts_the_important_one(
    gpu_daemon: Factory, tmp_path: Path
) -> None:
    """Loading a third model evicts the least important one, never spilling; Ollama alone
    evicts the most important (its tie-break is the name) on the same sequence."""
    d = gpu_daemon(
        [
            {"name": CHAT, "priority": 1},
            {"name": CODE, "priority": 2},
            {"name": SMALL, "priority": 3},
        ]
    )
    with SpillWatch(d.backend_url(0)) as watch:
        for m in (SMALL, CHAT, CODE):
            status, body, _ = generate(d.url, m)
            assert status == 200, body
    assert watch.partial == []
    loaded = ps(d.backend_url(0))
    assert set(loaded) == {CHAT, CODE}
    assert all(m["size_vram"] == m["size"] for m in loaded.values())
    events = json.loads(d.llmctl("events", "--json").stdout)["events"]
    evicted = [e for e in events if e["kind"] == "evict"]
    assert [e["model"] for e in evicted] == [SMALL]
    assert f"to make room for {CODE}" in evicted[0]["reason"]

    # The same sequence straight to Ollama (the simulator) on the same GPU.
    gpu_file = write_gpu_file(tmp_path / "direct-gpu.json", [DEVICE])
    env = {"OLLAMA_SIM_GPU": str(gpu_file), **CTX}
    (tmp_path / "direct").mkdir()
    with start_sim(tmp_path / "direct", env, speed=20) as sim:
        for m in (SMALL, CHAT, CODE):
            pull_direct(sim.url, m)
            assert generate(sim.url, m)[0] == 200
        assert set(ps(sim.url)) == {SMALL, CODE}  # the priority-1 model is gone


def pull_direct(base: str, model: str) -> None:
    req = urllib.request.Request(
        base + "/api/pull", data=json.dumps({"model": model, "stream": False}).encode()
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.read())["status"] == "success"


def test_no_spill_when_other_programs_hold_memory(gpu_daemon: Factory, tmp_path: Path) -> None:
    """When a model cannot fit, llmd answers 503 naming who holds the memory; Ollama alone
    loads it partly on the CPU."""
    d = gpu_daemon([{"name": CODE, "priority": 1}])
    set_external_mib(d.gpu_file, 0, 10 * 1024)
    with SpillWatch(d.backend_url(0)) as watch:
        status, body, headers = generate(d.url, CODE)
    assert status == 503
    assert "not enough GPU memory for " + CODE in body["error"]
    assert "other programs" in body["error"]
    assert int(headers["Retry-After"]) >= 1
    assert watch.partial == [] and CODE not in ps(d.backend_url(0))

    gpu_file = write_gpu_file(tmp_path / "direct-gpu.json", [{**DEVICE, "external_mib": 10240}])
    (tmp_path / "direct").mkdir()
    with start_sim(tmp_path / "direct", {"OLLAMA_SIM_GPU": str(gpu_file), **CTX}, speed=20) as sim:
        pull_direct(sim.url, CODE)
        assert generate(sim.url, CODE)[0] == 200
        m = ps(sim.url)[CODE]
        assert m["size_vram"] < m["size"]  # Ollama spilled layers to the CPU


def test_pinned_models_are_never_evicted(gpu_daemon: Factory) -> None:
    """Pinned models stay, even the least important one (pinned at run time with llmctl); the
    request then waits admission_timeout and gets 503 naming them."""
    d = gpu_daemon(
        [
            {"name": CHAT, "priority": 1, "pin": True},
            {"name": CODE, "priority": 2},
            {"name": SMALL, "priority": 3},
        ]
    )
    assert d.llmctl("pin", SMALL).returncode == 0
    for m in (SMALL, CHAT):
        assert generate(d.url, m)[0] == 200
    t0 = time.monotonic()
    status, body, _ = generate(d.url, CODE)
    waited = time.monotonic() - t0
    assert status == 503
    assert f"{SMALL} (3.8 GiB, priority 3, pinned)" in body["error"]
    assert f"{CHAT} (4.8 GiB, priority 1, pinned)" in body["error"]
    assert waited > 2.5  # it waited admission_timeout (3 s) for memory before answering
    assert set(ps(d.backend_url(0))) == {SMALL, CHAT}
    assert d.llmctl("unpin", SMALL).returncode == 0
    status, body, _ = generate(d.url, CODE)
    assert status == 200, body
    assert set(ps(d.backend_url(0))) == {CHAT, CODE}


def test_busy_model_is_not_evicted_until_idle(gpu_daemon: Factory) -> None:
    """A lower-priority model with a request in flight is not evicted mid-stream; the newcomer
    waits until it is idle, then takes its place."""
    d = gpu_daemon(
        [
            {"name": CHAT, "priority": 1},
            {"name": CODE, "priority": 2},
            {"name": SMALL, "priority": 3},
        ],
        speed="2",
        gpu={"admission_timeout": "20s"},
    )
    for m in (SMALL, CHAT):
        assert generate(d.url, m)[0] == 200
    lines: list[dict[str, Any]] = []

    def slow_stream() -> None:
        # phi3 writes 320 tokens/s at speed 2: this stream lasts about 3 s.
        body = {"model": SMALL, "prompt": "long", "options": {"num_predict": 1000}}
        req = urllib.request.Request(d.url + "/api/generate", data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            lines.extend(json.loads(line) for line in r)

    t = threading.Thread(target=slow_stream)
    t.start()
    wait_for(lambda: d.model(SMALL)["in_flight"] == 1, what="stream started")
    status, body, _ = generate(d.url, CODE)
    t.join()
    assert status == 200, body
    assert len(lines) == 1001 and lines[-1]["done"] is True  # not cut off by an eviction
    assert set(ps(d.backend_url(0))) == {CHAT, CODE}


def test_memory_taken_by_another_program_triggers_pressure_eviction(
    gpu_daemon: Factory,
) -> None:
    """Above the high watermark, idle low-priority models are evicted to the low watermark."""
    d = gpu_daemon([{"name": CHAT, "priority": 1}, {"name": SMALL, "priority": 3}])
    for m in (SMALL, CHAT):
        assert generate(d.url, m)[0] == 200
    set_external_mib(d.gpu_file, 0, 5000)
    # How fast is measured by bench/gpu_pressure.py; here only that it happens.
    wait_for(lambda: SMALL not in ps(d.backend_url(0)), timeout=15, what="pressure eviction")
    assert CHAT in ps(d.backend_url(0))
    events = json.loads(d.llmctl("events", "--json").stdout)["events"]
    ev = next(e for e in events if e["kind"] == "evict")
    assert ev["model"] == SMALL and "high_watermark" in ev["reason"]
    gpu = d.status()["gpu"]
    assert gpu["probe"] == "nvidia-smi" and gpu["devices"][0]["total_bytes"] == GPU_MIB * 2**20


def test_llmctl_plan_offline_worked_example(tmp_path: Path) -> None:
    """`llmctl plan` places the worked example in VRAM without a daemon."""
    import subprocess

    from llmdproc import llmctl_argv

    r = subprocess.run(
        [
            *llmctl_argv(),
            "--socket",
            str(tmp_path / "none.sock"),
            "--json",
            "plan",
            "--model",
            "codellama,7,Q5_K_M,1",
            "--model",
            "mistral,7,Q4_K_M,2",
            "--model",
            "phi3,4,Q4_K_M,3",
            "--vram-gb",
            "24",
            "--ram-gb",
            "64",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert [(m["name"], m["vram_gb"]) for m in plan["vram"]] == [
        ("codellama", 6.02),
        ("mistral", 4.96),
        ("phi3", 2.71),
    ]
    assert plan["total_vram_gb"] == 13.69 and plan["ram_spillover"] == []


def test_pins_that_cannot_fit_together_are_rejected(gpu_daemon: Factory) -> None:
    """A run-time pin that would overfill the GPU is refused; so is a config whose pinned
    models cannot fit together: llmd exits 78 (EX_CONFIG) naming them."""
    d = gpu_daemon([{"name": CODE, "pin": True}, {"name": SMALL, "pin": True}, {"name": CHAT}])
    r = d.llmctl("pin", CHAT)
    assert r.returncode == 1
    assert f"cannot pin {CHAT}: pinned models need" in r.stderr and CODE in r.stderr
    assert d.stop() == 0
    d.arrays["model"][2]["pin"] = True
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 78
    assert "pinned models need" in d.logs() and "unpin one or add GPU memory" in d.logs()


def test_llmctl_plan_from_running_daemon(gpu_daemon: Factory) -> None:
    """Without --model, `llmctl plan` plans the daemon's models with their measured sizes."""
    d = gpu_daemon([{"name": CHAT, "priority": 1}, {"name": SMALL, "priority": 3}])
    for m in (CHAT, SMALL):
        assert generate(d.url, m)[0] == 200
    r = d.llmctl("--json", "plan", "--ram-gb", "64")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    vram = {m["name"]: m["vram_gb"] for m in plan["vram"]}
    assert vram[CHAT] == pytest.approx(5.17, abs=0.02)  # measured, no overhead added
    assert vram[SMALL] == pytest.approx(4.06, abs=0.02)


def test_concurrent_cold_loads_do_not_share_memory(gpu_daemon: Factory) -> None:
    """Two cold models requested at once on a GPU that holds only one: the second waits for
    the first's memory to be accounted for, then evicts it when idle; neither spills."""
    small_gpu = {"index": 0, "name": "NVIDIA GeForce RTX 3080", "total_mib": 10 * 1024}
    d = gpu_daemon(
        [{"name": CHAT, "priority": 2}, {"name": CODE, "priority": 2}],
        gpu={"admission_timeout": "20s"},
    )
    d.gpu_file.write_text(json.dumps({"devices": [small_gpu]}))
    results: dict[str, int] = {}

    def go(model: str) -> None:
        results[model] = generate(d.url, model)[0]

    with SpillWatch(d.backend_url(0)) as watch:
        threads = [threading.Thread(target=go, args=(m,)) for m in (CHAT, CODE)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {CHAT: 200, CODE: 200}
    assert watch.partial == []
    assert len(ps(d.backend_url(0))) == 1  # one at a time fits; the other was evicted for it
    events = json.loads(d.llmctl("events", "--json").stdout)["events"]
    assert [e["kind"] for e in events].count("evict") == 1
