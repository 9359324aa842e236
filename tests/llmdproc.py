"""Run the real llmd daemon as a subprocess for end-to-end tests, with the simulator as ollama."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import tomli_w
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

ROOT = Path(__file__).resolve().parent.parent
SIM_DIR = ROOT / "tests" / "sim"
SPEED = "100"

# Every daemon started by the current test: tests/conftest.py prints their logs when it fails.
STARTED: list[Llmd] = []


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """n distinct free ports."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def llmctl_argv() -> list[str]:
    """The installed llmctl console script, as users run it."""
    exe = Path(sys.executable).parent / "llmctl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llmd.cli"]


def llmd_argv() -> list[str]:
    exe = Path(sys.executable).parent / "llmd"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llmd.daemon"]


def render_toml(
    sections: dict[str, dict[str, Any]], arrays: dict[str, list[dict[str, Any]]]
) -> str:
    """A config file from [section] tables and [[array]] tables (empty arrays left out)."""
    return tomli_w.dumps({**sections, **{k: v for k, v in arrays.items() if v}})


@dataclass
class Llmd:
    """A running llmd subprocess and the paths around it."""

    workdir: Path
    config_path: Path
    socket: Path
    proxy_port: int
    backend_ports: list[int]
    env: dict[str, str]
    gpu_file: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    arrays: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def backend_url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.backend_ports[i]}"

    def write_config(self) -> None:
        self.config_path.write_text(render_toml(self.sections, self.arrays))

    def start(self, wait: bool = True, timeout: float = 30) -> Llmd:
        self.write_config()
        self.log_path = self.workdir / f"llmd-{int(time.time() * 1000)}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [*llmd_argv(), "--config", str(self.config_path)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        STARTED.append(self)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        """Wait until the admin socket answers and no backend is still starting."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"llmd exited with {self.proc.returncode}:\n{self.logs()}")
            r = self.llmctl("status", "--json")
            if r.returncode == 0:
                last = json.loads(r.stdout)
                backends = last["backends"]
                settled = not {b["state"] for b in backends} & {"starting", "stopped"}
                if settled and len(backends) == len(self.arrays["backend"]):
                    return last
            time.sleep(0.1)
        raise AssertionError(f"llmd not ready in {timeout}s (last status {last}):\n{self.logs()}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def llmctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*llmctl_argv(), "--socket", str(self.socket), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        r = self.llmctl("status", "--json")
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    def model(self, name: str) -> dict[str, Any]:
        r = self.llmctl("models", "--json")
        assert r.returncode == 0, r.stderr
        for m in json.loads(r.stdout)["models"]:
            if m["name"] == name:
                return dict(m)
        raise KeyError(name)

    def child_pids(self) -> list[int]:
        """PIDs of the backends' children as status reports them."""
        return [b["pid"] for b in self.status()["backends"] if b["pid"]]

    def descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"llmd did not stop within {timeout}s:\n{self.logs()}") from None

    def get(self, path: str, *, backend: int | None = None, timeout: float = 30) -> Any:
        base = self.url if backend is None else self.backend_url(backend)
        with urllib.request.urlopen(base + path, timeout=timeout) as r:
            return json.loads(r.read())


def make_llmd(
    tmp_path: Path,
    *,
    backends: int = 1,
    models: list[dict[str, Any]] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    backend_extra: list[dict[str, Any]] | None = None,
    sim_env: dict[str, str] | None = None,
    gpu_devices: list[dict[str, Any]] | None = None,
) -> Llmd:
    """An llmd with `backends` simulator children on free ports, not yet started."""
    # Unix socket paths are limited to ~100 bytes: keep the socket in a short temp directory.
    tmp_path.mkdir(parents=True, exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="llmd-", dir="/tmp"))
    ports = free_ports(backends + 1)
    gpu_file = tmp_path / "gpu.json"
    gpu_file.write_text(
        json.dumps(
            {
                "devices": gpu_devices
                or [{"index": 0, "name": "NVIDIA GeForce RTX 4090", "total_mib": 24564}]
            }
        )
    )
    from simproc import sim_path_env  # the simulator's helper (tests/simproc.py)

    env = sim_path_env()
    env.update({"OLLAMA_SIM_SPEED": SPEED, "OLLAMA_SIM_GPU": str(gpu_file)})
    env.update(sim_env or {})
    env.pop("NOTIFY_SOCKET", None)
    base_sections: dict[str, dict[str, Any]] = {
        "daemon": {
            "state_dir": str(tmp_path / "state"),
            "admin_socket": str(sockdir / "admin.sock"),
            "log_level": "debug",
            "shutdown_timeout": "10s",
        },
        "proxy": {"listen": f"127.0.0.1:{ports[0]}"},
    }
    for k, v in (sections or {}).items():
        base_sections.setdefault(k, {}).update(v)
    arrays: dict[str, list[dict[str, Any]]] = {"backend": [], "model": list(models or [])}
    for i in range(backends):
        b: dict[str, Any] = {
            "name": f"b{i}",
            "port": ports[i + 1],
            "env": {"OLLAMA_MODELS": str(tmp_path / f"models-b{i}")},
            "start_timeout": "20s",
            "stop_timeout": "5s",
        }
        if backend_extra and i < len(backend_extra):
            extra = dict(backend_extra[i])
            b["env"].update(extra.pop("env", {}))
            b.update(extra)
        arrays["backend"].append(b)
    return Llmd(
        workdir=tmp_path,
        config_path=tmp_path / "llmd.toml",
        socket=sockdir / "admin.sock",
        proxy_port=ports[0],
        backend_ports=ports[1:],
        env=env,
        gpu_file=gpu_file,
        sections=base_sections,
        arrays=arrays,
    )


# What the `daemon` fixture (tests/conftest.py) gives a test: make_llmd with a folder each.
Factory = Callable[..., Llmd]


def cleanup(d: Llmd) -> None:
    """Stop the daemon and anything it left behind."""
    if d.proc is not None and d.proc.poll() is None:
        left = d.descendants()
        try:
            d.stop(timeout=20)
        except AssertionError:
            pass
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
    shutil.rmtree(d.socket.parent, ignore_errors=True)


def pull(d: Llmd, model: str, backend: int = 0) -> None:
    """Pull a catalog model straight into one backend's simulator."""
    req = urllib.request.Request(
        d.backend_url(backend) + "/api/pull",
        data=json.dumps({"model": model, "stream": False}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.read())["status"] == "success"


def call(
    url: str, body: Any = None, *, timeout: float = 60
) -> tuple[int, dict[str, str], Any, float]:
    """One request: status, headers, JSON body (None if not JSON) and how long it took."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, dict(e.headers), e.read()
    took = time.monotonic() - t0
    try:
        doc = json.loads(raw or b"null")
    except ValueError:
        doc = None
    return status, headers, doc, took


def wait_for(
    pred: Any, timeout: float = 10, what: str = "condition", interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def series(name: str, **labels: str) -> str:
    """A series' key in parse_metrics' answer: `name{a="x",b="y"}`, labels sorted by name."""
    pairs = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{pairs}}}" if pairs else name


def parse_metrics(text: str, openmetrics: bool = False) -> dict[str, float]:
    """A /metrics page parsed by prometheus_client: {series(name, **labels): value}."""
    families = parse_om(text) if openmetrics else parse_text(text)
    return {series(s.name, **s.labels): s.value for f in families for s in f.samples}


def scrape(d: Llmd) -> dict[str, float]:
    """llmd's /metrics (the Prometheus text format), parsed."""
    with urllib.request.urlopen(d.url + "/metrics", timeout=30) as r:
        return parse_metrics(r.read().decode())


@asynccontextmanager
async def held(session: aiohttp.ClientSession, url: str, model: str) -> AsyncIterator[None]:
    """A streamed generate that holds one of the model's slots until the block ends."""
    body = {"model": model, "prompt": "hold", "stream": True}
    async with session.post(url + "/api/generate", json=body) as r:
        assert r.status == 200, await r.text()
        await r.content.readline()  # the first chunk: it is running
        yield
    # Leaving closes the connection: the child sees the client go and frees the slot.


async def until(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll a blocking check (llmctl, /metrics) off the loop until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = await asyncio.to_thread(cond)
        if v:
            return v
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
