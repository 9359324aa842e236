"""Fault injection (OLLAMA_SIM_FAULTS), startup errors and the `ollama` command line."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from simproc import (
    OLLAMA,
    SimProcess,
    catalog_model,
    nvidia_smi,
    read_gpu_file,
    sim_path_env,
    spawn_sim,
    start_sim,
    write_catalog,
    write_gpu_file,
)


def faulty(tmp_path: Path, faults: str, **env: str) -> SimProcess:
    cat = write_catalog(tmp_path / "catalog.toml", [catalog_model("a:1"), catalog_model("b:1")])
    return start_sim(
        tmp_path,
        {"OLLAMA_SIM_CATALOG": str(cat), "OLLAMA_SIM_GPU": "", "OLLAMA_SIM_FAULTS": faults, **env},
    )


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def gen(http: httpx.Client, sim: SimProcess, model: str = "a:1") -> httpx.Response:
    return http.post(
        sim.url + "/api/generate", json={"model": model, "prompt": "x", "stream": False}
    )


def test_fail_request_and_exit_after_requests(tmp_path: Path, http: httpx.Client) -> None:
    """fail_request=N: the Nth model request gets a 500; exit_after_requests=N: the process
    exits with code 1 right after answering N model requests."""
    with faulty(tmp_path, "fail_request=2,exit_after_requests=3") as sim:
        assert http.get(sim.url + "/api/tags").status_code == 200  # not a model request
        assert gen(http, sim).status_code == 200
        r = gen(http, sim)
        assert r.status_code == 500
        assert r.json() == {
            "error": "llama runner process has terminated: simulated failure "
            "(OLLAMA_SIM_FAULTS fail_request)"
        }
        r = gen(http, sim)
        assert r.status_code == 200 and r.json()["done"] is True
        assert sim.wait(5) == 1


def test_exit_during_load_leaves_memory_to_the_driver(tmp_path: Path, http: httpx.Client) -> None:
    """exit_during_load=1 crashes mid-load; the dead process's GPU memory no longer counts."""
    gpu = write_gpu_file(tmp_path / "gpu.json", [{"index": 0, "total_mib": 4000}])
    with faulty(tmp_path, "exit_during_load=1", OLLAMA_SIM_GPU=str(gpu)) as sim:
        with pytest.raises(httpx.HTTPError):
            gen(http, sim)
        assert sim.wait(5) == 1
    assert [a["pid"] for a in read_gpu_file(gpu)["allocations"]] == [sim.pid]
    used = nvidia_smi(
        "--query-gpu=memory.used", "--format=csv,noheader,nounits", env={"OLLAMA_SIM_GPU": str(gpu)}
    )
    assert used.stdout.strip() == "0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_never_ready_and_slow_start(tmp_path: Path, http: httpx.Client) -> None:
    """never_ready=1 never listens; slow_start=S delays listening by S seconds."""
    port = _free_port()
    proc, log = spawn_sim(tmp_path, {"OLLAMA_SIM_FAULTS": "never_ready=1"}, port=port)
    try:
        time.sleep(0.5)
        assert proc.poll() is None and "Listening on" not in log.read_text()
        with pytest.raises(httpx.ConnectError):
            http.get(f"http://127.0.0.1:{port}/")
    finally:
        proc.terminate()
        proc.wait(5)
    t0 = time.monotonic()
    with start_sim(tmp_path, {"OLLAMA_SIM_FAULTS": "slow_start=0.4"}) as sim:
        assert time.monotonic() - t0 >= 0.4
        assert http.get(sim.url + "/").status_code == 200


def test_openai_fail_request_and_stall_stream(tmp_path: Path, http: httpx.Client) -> None:
    """/v1 failures are OpenAI-shaped; stall_stream=N stops a stream after N chunks without
    closing it, and a client that gives up releases the model."""
    with (
        faulty(tmp_path, "fail_request=1,stall_stream=2") as sim,
        openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as oai,
    ):
        with pytest.raises(openai.InternalServerError) as e:
            oai.chat.completions.create(model="a:1", messages=[{"role": "user", "content": "x"}])
        body = e.value.body
        assert isinstance(body, dict) and body["type"] == "api_error"
        lines: list[str] = []
        with (
            pytest.raises(httpx.ReadTimeout),
            http.stream(
                "POST",
                sim.url + "/api/generate",
                json={"model": "a:1", "prompt": "x"},
                timeout=httpx.Timeout(5, read=0.5),
            ) as r,
        ):
            for line in r.iter_lines():
                lines.append(line)
        assert len(lines) == 2 and not json.loads(lines[-1])["done"]
        time.sleep(0.2)
        http.post(sim.url + "/api/generate", json={"model": "a:1", "keep_alive": 0})
        assert http.get(sim.url + "/api/ps").json() == {"models": []}


def test_fail_load_and_fail_stream(tmp_path: Path, http: httpx.Client) -> None:
    """fail_load=N: the Nth load fails with a 500 and the next works; fail_stream=N: after N
    chunks a native stream ends with an {"error"} line, an SSE one without [DONE]."""
    with faulty(tmp_path, "fail_load=1,fail_stream=2") as sim:
        r = gen(http, sim)
        assert r.status_code == 500
        assert r.json()["error"].startswith("llama runner process has terminated")
        assert http.get(sim.url + "/api/ps").json() == {"models": []}
        assert gen(http, sim).status_code == 200  # not streamed: no fail_stream
        c = ollama.Client(host=sim.url)
        got = []
        with pytest.raises(ollama.ResponseError, match="simulated failure"):
            for part in c.generate(model="a:1", prompt="x", stream=True):
                got.append(part)
        c.close()
        assert len(got) == 2
        body = {"model": "a:1", "messages": [{"role": "user", "content": "x"}], "stream": True}
        raw = http.post(sim.url + "/v1/chat/completions", json=body).text
        assert "[DONE]" not in raw and raw.count("data: ") == 3


def test_fail_create(tmp_path: Path, http: httpx.Client) -> None:
    """fail_create=N: the Nth /api/create fails with a 500 and writes nothing; the next works."""
    body = {"model": "c:1", "from": "a:1", "parameters": {"num_ctx": 2048}, "stream": False}
    with faulty(tmp_path, "fail_create=1") as sim:
        r = http.post(sim.url + "/api/create", json=body)
        assert r.status_code == 500
        assert r.json() == {"error": "simulated create failure (OLLAMA_SIM_FAULTS fail_create)"}
        assert "c:1" not in {m["name"] for m in http.get(sim.url + "/api/tags").json()["models"]}
        r = http.post(sim.url + "/api/create", json=body)
        assert (r.status_code, r.json()) == (200, {"status": "success"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OLLAMA_SIM_FAULTS": "nope=1"}, "Error: OLLAMA_SIM_FAULTS: unknown fault 'nope'"),
        ({"OLLAMA_SIM_FAULTS": "fail_request"}, "Error: OLLAMA_SIM_FAULTS: expected key=value"),
        ({"OLLAMA_SIM_SPEED": "0"}, "Error: OLLAMA_SIM_SPEED: expected a number > 0"),
        ({"OLLAMA_SIM_CATALOG": "/nonexistent.toml"}, "Error: OLLAMA_SIM_CATALOG: cannot read"),
        ({"OLLAMA_SIM_GPU": "/nonexistent.json"}, "Error: /nonexistent.json"),
    ],
)
def test_bad_simulator_settings_fail_at_start(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """A malformed simulator setting is a clear error and exit code 1 at start."""
    proc, log = spawn_sim(tmp_path, env)
    assert proc.wait(10) == 1
    assert message in log.read_text()


def test_port_in_use(tmp_path: Path) -> None:
    """Binding a busy port fails like Ollama: an error and exit code 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc, log = spawn_sim(tmp_path, port=int(s.getsockname()[1]))
        assert proc.wait(10) == 1
        assert "bind: address already in use" in log.read_text()


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(OLLAMA), *args],
        env={**sim_path_env(), **env},
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_cli_and_all_interfaces_listener(tmp_path: Path, http: httpx.Client) -> None:
    """`ollama --version` reports the server's version (or warns); other commands are refused.
    OLLAMA_HOST=:PORT listens on every interface, where the Host check does not apply. With
    nothing installed, lists are empty (and /v1/models has data null)."""
    alone = _cli("--version", OLLAMA_HOST=f"127.0.0.1:{_free_port()}")
    assert alone.returncode == 0
    assert alone.stdout.splitlines() == [
        "Warning: could not connect to a running Ollama instance",
        "Warning: client version is 0.33.0-rc2",
    ]
    run = _cli("run", "tiny:1m")
    assert run.returncode == 1 and "not supported by the simulator" in run.stderr
    cat = write_catalog(tmp_path / "c.toml", [catalog_model("a:1", pulled=False)])
    with start_sim(tmp_path, {"OLLAMA_SIM_CATALOG": str(cat)}, host="") as sim:
        assert "Listening on [::]:" in sim.log()
        assert http.get(sim.url + "/api/tags").json() == {"models": []}
        assert http.get(sim.url + "/v1/models").json() == {"object": "list", "data": None}
        up = _cli("-v", OLLAMA_HOST=f"http://127.0.0.1:{sim.port}")
        assert up.stdout.strip() == "ollama version is 0.33.0-rc2"
        r = http.get(sim.url + "/api/version", headers={"Host": "evil.example.com"})
        assert r.status_code == 200


def test_header_log(tmp_path: Path, http: httpx.Client) -> None:
    """OLLAMA_SIM_HEADER_LOG records every request's method, path and headers as received."""
    log = tmp_path / "headers.jsonl"
    with faulty(tmp_path, "", OLLAMA_SIM_HEADER_LOG=str(log)) as sim:
        http.get(sim.url + "/api/version", headers={"X-Probe": "1", "Cookie": "a=b"})
        gen(http, sim)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["method"], x["path"]) for x in lines] == [
        ("GET", "/api/version"),
        ("POST", "/api/generate"),
    ]
    first = {k.lower(): v for k, v in lines[0]["headers"]}
    assert first["x-probe"] == "1" and first["cookie"] == "a=b"
