"""The migration guide and the examples, checked: docs/migrating-from-compose.md's config passes
`llmd --check-config` and equals its file, its `llmctl plan` command prints what the page
shows (the guide's own numbers), it maps every setting of the guide's setup, and the examples
run against llmd serving the guide's three models by task (simulator children)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from llmdproc import Llmd, llmctl_argv, llmd_argv
from simproc import write_catalog

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "migrating-from-compose.md"
CONFIG = ROOT / "docs" / "three-models.llmd.toml"
CATALOG = ROOT / "tests" / "sim" / "catalog.toml"

Factory = Callable[..., Llmd]


def blocks(lang: str) -> list[str]:
    """The page's fenced code blocks of one language, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", GUIDE.read_text(), re.S | re.M)


def test_the_pages_config_is_the_file_and_llmd_accepts_it() -> None:
    (shown,) = blocks("toml")
    assert tomllib.loads(shown) == tomllib.loads(CONFIG.read_text())
    r = subprocess.run(
        [*llmd_argv(), "--check-config", str(CONFIG)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{CONFIG}: OK"
    tasks = {t: m["name"] for m in tomllib.loads(CONFIG.read_text())["model"] for t in m["tasks"]}
    assert set(tasks) == {"code", "summarize", "chat"}


def test_the_pages_plan_gives_the_guides_numbers() -> None:
    """The `llmctl plan` command on the page prints exactly the table the page shows, whose
    total is the guide's 13.69 GB of 24."""
    command = next(b for b in blocks("sh") if b.startswith("llmctl plan"))
    argv = shlex.split(command.replace("\\\n", " "))
    r = subprocess.run([*llmctl_argv(), *argv[1:]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (table,) = blocks("text")
    assert r.stdout == table
    assert "VRAM     13.69 of 24.00 GB" in r.stdout


@pytest.mark.parametrize(
    "setting",
    [
        "QUANT_SIZES_GB",
        "18%",
        "OLLAMA_MAX_LOADED_MODELS",
        "OLLAMA_NUM_PARALLEL",
        "OLLAMA_KEEP_ALIVE",
        "readiness and warm-up loop",
        "MODEL_MAP",
        "CUDA_VISIBLE_DEVICES",
        "probes",
        "PVC",
        "POST /infer",
    ],
)
def test_the_page_maps_each_setting_of_the_guide(setting: str) -> None:
    """Each setting the guide's setup has is a row of the page's table (its first column)."""
    rows = [line for line in GUIDE.read_text().splitlines() if line.startswith("| ")]
    assert any(setting in row.split(" | ")[0] for row in rows), setting


def seed_catalog(path: Path) -> Path:
    """The simulator's catalog with the guide's three models present: the simulator's codellama
    and phi3 under the tags the guide uses (their sizes at those quantisations)."""
    models = tomllib.loads(CATALOG.read_text())["model"]
    by_name = {m["name"]: m for m in models}
    seeded = [
        {
            **by_name["codellama:7b-code-q4_K_M"],
            "name": "codellama:7b-instruct-q5_K_M",
            "quantization": "Q5_K_M",
            "size": 4_783_156_928,
        },
        {**by_name["mistral:7b-instruct-q4_K_M"]},
        {
            **{k: v for k, v in by_name["phi3:mini"].items() if k != "aliases"},
            "name": "phi3:3.8b-mini-4k-instruct-q4_K_M",
            "quantization": "Q4_K_M",
            "size": 2_393_231_072,
        },
    ]
    for m in seeded:
        m["pulled"] = True
    return write_catalog(path, seeded)


@pytest.fixture
def seeded(daemon: Factory, tmp_path: Path) -> Llmd:
    """llmd serving the page's [[model]] entries (tasks, priorities, preload) on a simulated
    24 GiB GPU."""
    cfg: dict[str, Any] = tomllib.loads(CONFIG.read_text())
    catalog = seed_catalog(tmp_path / "catalog.toml")
    d = daemon(
        models=cfg["model"],
        backend_extra=[
            {k: v for k, v in cfg["backend"][0].items() if k in ("num_parallel", "env")}
        ],
        sim_env={"OLLAMA_SIM_CATALOG": str(catalog)},
    ).start()
    return d


def run_example(name: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_pipeline_example_runs_by_task(seeded: Llmd) -> None:
    out = run_example("pipeline.py", "--host", seeded.url, "--documents", "6", "--concurrency", "3")
    assert len(re.findall(r"^document \d: \S+ \(summary ", out, re.M)) == 6
    assert re.search(r"^step task:summarize: median [\d.]+ s", out, re.M)
    assert re.search(r"^step task:chat: median [\d.]+ s", out, re.M)
    assert "6 documents in" in out


def test_the_fanout_example_runs_by_task(seeded: Llmd) -> None:
    out = run_example("fanout.py", "--host", seeded.url, "--prompts", "3", "What is a queue?")
    cfg = tomllib.loads(CONFIG.read_text())
    for m in cfg["model"]:
        (task,) = m["tasks"]
        assert f"[task:{task} -> {m['name']}, " in out  # the answer names its model
        assert re.search(rf"^task:{task}: median [\d.]+ s", out, re.M)
    assert "3 fan-outs of 3 in" in out
