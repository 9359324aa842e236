"""Simulated GPUs shared through OLLAMA_SIM_GPU, and the nvidia-smi stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest
from simproc import (
    SimProcess,
    catalog_model,
    nvidia_smi,
    read_gpu_file,
    start_sim,
    write_catalog,
    write_gpu_file,
)

MIB = 1024 * 1024


@pytest.fixture
def setup(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A catalog of test models and a two-GPU state file (1000 MiB each)."""
    cat = write_catalog(
        tmp_path / "catalog.toml",
        [
            catalog_model("a:1", 100),
            catalog_model("b:1", 100),
            catalog_model("c:1", 100),
            catalog_model("d:1", 100),
            catalog_model("big:1", 400, layers=8),
            catalog_model("huge:1", 1500, layers=8),
        ],
    )
    gpu = write_gpu_file(
        tmp_path / "gpu.json",
        [
            {"index": 0, "name": "Sim GPU A", "total_mib": 1000},
            {"index": 1, "name": "Sim GPU B", "total_mib": 1000},
        ],
    )
    return {"OLLAMA_SIM_CATALOG": str(cat), "OLLAMA_SIM_GPU": str(gpu)}, gpu


@pytest.fixture
def clients() -> Iterator[list[ollama.Client]]:
    made: list[ollama.Client] = []
    yield made
    for c in made:
        c.close()


def client_for(sim: SimProcess, made: list[ollama.Client]) -> ollama.Client:
    c = ollama.Client(host=sim.url)
    made.append(c)
    return c


def smi_used(env: dict[str, str]) -> dict[int, int]:
    out = nvidia_smi("--query-gpu=index,memory.used", "--format=csv,noheader,nounits", env=env)
    assert out.returncode == 0, out.stdout
    return {int(i): int(u) for i, u in (line.split(", ") for line in out.stdout.splitlines())}


def smi_apps(env: dict[str, str]) -> dict[tuple[int, str], int]:
    out = nvidia_smi(
        "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits", env=env
    )
    apps: dict[tuple[int, str], int] = {}
    for line in out.stdout.splitlines():
        pid, uuid, mib = line.split(", ")
        apps[(int(pid), uuid)] = int(mib)
    return apps


def test_two_simulators_share_a_gpu_and_kill_9_frees_memory(
    tmp_path: Path, setup: tuple[dict[str, str], Path], clients: list[ollama.Client]
) -> None:
    """Two simulators on one GPU file see each other's memory; a kill -9'd one's is freed."""
    env, _ = setup
    env = {**env, "CUDA_VISIBLE_DEVICES": "0"}
    with start_sim(tmp_path, env, name="a") as sim_a, start_sim(tmp_path, env, name="b") as sim_b:
        ca, cb = client_for(sim_a, clients), client_for(sim_b, clients)
        ca.generate(model="a:1", prompt="")
        a = ca.ps().models[0]
        assert a.size_vram == 358 * MIB
        assert smi_used(env) == {0: 358, 1: 0}
        assert list(smi_apps(env).values()) == [358]
        assert next(iter(smi_apps(env)))[0] == sim_a.pid
        # big:1 needs 660 MiB; only 642 MiB are left by sim A, so sim B loads it partly.
        cb.generate(model="big:1", prompt="")
        big = cb.ps().models[0]
        assert big.size == 660 * MIB
        assert big.size_vram and 256 * MIB < big.size_vram <= 642 * MIB
        b_mib = -(-big.size_vram // MIB)
        assert smi_used(env) == {0: 358 + b_mib, 1: 0}
        sim_a.kill()
        assert smi_used(env) == {0: b_mib, 1: 0}
        assert set(pid for pid, _ in smi_apps(env)) == {sim_b.pid}
        cb.generate(model="big:1", prompt="", keep_alive=0)
        cb.generate(model="big:1", prompt="")
        big = cb.ps().models[0]
        assert big.size_vram == big.size == 660 * MIB
    assert smi_used(env) == {0: 0, 1: 0}


def test_cuda_visible_devices_and_sigterm(
    tmp_path: Path, setup: tuple[dict[str, str], Path], clients: list[ollama.Client]
) -> None:
    """CUDA_VISIBLE_DEVICES limits a simulator to some GPUs (empty: CPU only); nvidia-smi shows
    each simulator's memory as /api/ps does; SIGTERM exits 0 and frees it."""
    env, gpu = setup
    sim = start_sim(tmp_path, {**env, "CUDA_VISIBLE_DEVICES": "1"})
    c = client_for(sim, clients)
    c.generate(model="a:1", prompt="")
    c.generate(model="b:1", prompt="", options={"num_ctx": 8192})
    vram = sum(m.size_vram or 0 for m in c.ps().models)
    assert vram == (358 + 360) * MIB
    assert smi_used(env) == {0: 0, 1: 718}
    uuid1 = nvidia_smi("--query-gpu=uuid", "--format=csv,noheader", "-i", "1", env=env).stdout
    assert smi_apps(env) == {(sim.pid, uuid1.strip()): 718}
    assert [a["pid"] for a in read_gpu_file(gpu)["allocations"]] == [sim.pid, sim.pid]
    assert sim.stop() == 0
    assert read_gpu_file(gpu)["allocations"] == []
    assert smi_used(env) == {0: 0, 1: 0}
    with start_sim(tmp_path, {**env, "CUDA_VISIBLE_DEVICES": ""}) as sim:
        c = client_for(sim, clients)
        c.generate(model="a:1", prompt="")
        c.generate(model="b:1", prompt="")
        assert [m.size_vram for m in c.ps().models] == [0, 0]  # both stay, on the CPU
        assert smi_used(env) == {0: 0, 1: 0}


def test_model_spreads_over_gpus_and_default_max_models(
    tmp_path: Path, setup: tuple[dict[str, str], Path], clients: list[ollama.Client]
) -> None:
    """A model too big for one GPU spreads over several; the default cap is 3 models per GPU."""
    env, _ = setup
    with start_sim(tmp_path, env) as sim:
        c = client_for(sim, clients)
        c.generate(model="huge:1", prompt="")  # 1500 + 4 + 256 MiB
        huge = c.ps().models[0]
        assert huge.size_vram == huge.size == 1760 * MIB
        used = smi_used(env)
        assert used[0] > 0 and used[1] > 0 and sum(used.values()) in (1760, 1761)
    one = write_gpu_file(tmp_path / "one.json", [{"index": 0, "total_mib": 80000}])
    with start_sim(tmp_path, {**env, "OLLAMA_SIM_GPU": str(one)}) as sim:
        c = client_for(sim, clients)
        for m in ("a:1", "b:1", "c:1", "d:1"):
            c.generate(model=m, prompt="")
        assert {m.model for m in c.ps().models} == {"b:1", "c:1", "d:1"}


def test_nvidia_smi_formats(tmp_path: Path, setup: tuple[dict[str, str], Path]) -> None:
    """The stand-in answers -L and --query-gpu in the real tool's csv formats."""
    env, _ = setup
    listed = nvidia_smi("-L", env=env).stdout.splitlines()
    assert len(listed) == 2
    assert listed[0].startswith("GPU 0: Sim GPU A (UUID: GPU-") and listed[0].endswith(")")
    assert nvidia_smi("-L", env=env).stdout == nvidia_smi("-L", env=env).stdout  # stable UUIDs
    full = nvidia_smi(
        "--query-gpu=index,name,memory.used,memory.total,memory.free", "--format=csv", env=env
    ).stdout.splitlines()
    assert full[0] == "index, name, memory.used [MiB], memory.total [MiB], memory.free [MiB]"
    assert full[1] == "0, Sim GPU A, 0 MiB, 1000 MiB, 1000 MiB"
    bare = nvidia_smi(
        "--query-gpu=memory.free,uuid,index", "--format=csv,noheader,nounits", env=env
    ).stdout.splitlines()
    assert bare[1].startswith("1000, GPU-") and bare[1].endswith(", 1")
    apps = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv", env=env)
    assert apps.stdout.splitlines() == ["pid, used_gpu_memory [MiB]"]


def test_nvidia_smi_errors_and_default_gpu(tmp_path: Path) -> None:
    """Bad arguments fail like the real tool; without OLLAMA_SIM_GPU one idle 24 GiB GPU shows."""
    bad = nvidia_smi("--bogus")
    assert bad.returncode == 2 and "Invalid combination of input arguments" in bad.stdout
    field = nvidia_smi("--query-gpu=nope", "--format=csv")
    assert (
        field.returncode == 2
        and field.stdout.strip() == 'Field "nope" is not a valid field to query.'
    )
    default = nvidia_smi(
        "--query-gpu=name,memory.used,memory.total",
        "--format=csv,noheader,nounits",
        env={"OLLAMA_SIM_GPU": ""},
    )
    assert default.stdout.strip() == "NVIDIA GeForce RTX 4090, 0, 24576"
    missing = nvidia_smi("-L", env={"OLLAMA_SIM_GPU": str(tmp_path / "nope.json")})
    assert missing.returncode == 9 and "couldn't communicate" in missing.stdout
