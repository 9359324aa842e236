"""daemon.event_loop: llmd serves on asyncio's loop and on uvloop alike (uvloop's transports
are not asyncio.Transport subclasses: the connection limiter refused every connection), and
asking for uvloop where it is not installed is a config error that names the fix."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import ollama
import pytest
from llmdproc import Factory, call, pull

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


@pytest.mark.parametrize(
    "loop",
    [
        "asyncio",
        pytest.param(
            "uvloop", marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop not installed")
        ),
    ],
)
def test_llmd_serves_on_either_event_loop(daemon: Factory, loop: str) -> None:
    d = daemon(sections={"daemon": {"event_loop": loop}}).start()
    pull(d, "tiny:1m")
    with closing(ollama.Client(host=d.url)) as c:
        assert c.generate(model="tiny:1m", prompt="hi", options={"num_predict": 4}).done
        parts = list(
            c.generate(model="tiny:1m", prompt="hi", stream=True, options={"num_predict": 6})
        )
        assert parts[-1].done and len(parts) >= 6
    status, _, doc, _ = call(d.url + "/v1/chat/completions", {
        "model": "tiny:1m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
    })  # fmt: skip
    assert status == 200 and doc["object"] == "chat.completion"
    status = d.status()
    assert status["event_loop"] == loop
    assert status["proxy"]["connections"]["accepted"] >= 2  # the ollama client's, urllib's
    assert f"event loop: {loop}" in d.logs()
    # The lifecycle ran on that loop too: the model was loaded for the requests and kept.
    assert d.model("tiny:1m")["state"] == "loaded"


def test_uvloop_asked_for_but_missing_is_a_config_error(daemon: Factory, tmp_path: Path) -> None:
    """An `import uvloop` that fails (a stand-in module on PYTHONPATH) with event_loop =
    "uvloop": exit 78 (EX_CONFIG, no restart loop under systemd) and the package to install."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "uvloop.py").write_text("raise ImportError('no uvloop here')\n")
    d = daemon(sections={"daemon": {"event_loop": "uvloop"}})
    d.write_config()
    env = {**d.env, "PYTHONPATH": f"{shim}:{Path(__file__).resolve().parent.parent}"}
    proc = subprocess.run(
        [sys.executable, "-m", "llmd.daemon", "--config", str(d.config_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78, proc.stderr
    assert 'daemon.event_loop = "uvloop": uvloop is not installed' in proc.stderr
    assert "python3-uvloop" in proc.stderr
