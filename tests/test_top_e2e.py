"""`llmctl top` in a real terminal: tmux runs it against a real llmd; the test reads the screen
with `capture-pane` and presses keys with `send-keys`. Without a terminal it prints one frame."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from llmdproc import Llmd, call, llmctl_argv

TINY = "tiny:1m"
Factory = Callable[..., Llmd]

needs_tmux = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)"
)


class Screen:
    """A tmux session (on a tmux server of its own) running one command in a 160x40 terminal."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tmux = ["tmux", "-L", name]

    def text(self) -> str:
        r = subprocess.run(
            [*self.tmux, "capture-pane", "-p", "-t", self.name],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return r.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, *keys], check=True, timeout=10)

    def wait(self, pred: Callable[[str], bool], what: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if pred(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed {what}:\n{text}")
            time.sleep(0.1)


@contextmanager
def tmux(d: Llmd, tmp: Path, *args: str) -> Iterator[Screen]:
    """`llmctl top` in a fresh tmux server; the pane stays after it exits, showing its status."""
    script = tmp / "top.sh"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in d.env.items() if k in ("PATH", "HOME"))
    argv = shlex.join([*llmctl_argv(), "--socket", str(d.socket), "top", *args])
    script.write_text(
        f"#!/bin/sh\nunset COLUMNS LINES\nexport {env} TERM=xterm-256color\n{argv}\n"
        "echo EXIT=$?\nsleep 60\n"
    )
    script.chmod(0o755)
    s = Screen(f"llmd-top-{d.proxy_port}")
    subprocess.run(
        [*s.tmux, "new-session", "-d", "-s", s.name, "-x", "160", "-y", "40", str(script)],
        check=True,
        timeout=10,
    )
    try:
        yield s
    finally:
        subprocess.run([*s.tmux, "kill-server"], capture_output=True, timeout=10)


def row(text: str, model: str) -> str:
    found = [ln for ln in text.splitlines() if f" {model} " in f" {ln} "]
    assert found, text
    return found[0]


@needs_tmux
def test_top_shows_gpus_backends_and_models_live_and_answers_keys(
    daemon: Factory, tmp_path: Path
) -> None:
    d = daemon(
        models=[{"name": TINY, "priority": 1}],
        sections={"gpu": {"probe": "nvidia-smi", "interval": "0.5s"}},
    ).start()
    with tmux(d, tmp_path) as s:
        text = s.wait(lambda t: "MODEL" in t and TINY in t, "the models")
        assert "GPU 0 NVIDIA GeForce RTX 4090" in text and "BACKEND" in text
        assert re.search(r" b0 +unloaded ", row(text, TINY))
        # A request loads the model: the next refresh shows it, with its GPU memory.
        status, _, body, _ = call(d.url + "/api/generate", {"model": TINY, "prompt": "hi"})
        assert status == 200, body
        text = s.wait(lambda t: bool(re.search(r" b0 +loaded ", row(t, TINY))), "it loaded")
        assert "0.3 GiB" in row(text, TINY) and "load " in row(text, TINY)
        s.wait(lambda t: "llmd 0.3 GiB" in t, "llmd's share of the GPU")
        # s changes the sort.
        s.keys("s")
        s.wait(lambda t: "sort (priority)" in t, "the sort changed")
        # With the sort by priority the priority-1 model is first, and selected; p asks, y pins.
        s.keys("p")
        s.wait(lambda t: f"pin {TINY}? press y" in t, "the confirmation")
        s.keys("y")
        text = s.wait(lambda t: f"{TINY} pinned" in t, "the pin done")
        assert " yes " in row(text, TINY)
        # Its newest event is the pin (which has no backend), not its load.
        s.wait(lambda t: " pin " in row(t, TINY) and "(llmctl)" in row(t, TINY), "the pin event")
        models = json.loads(d.llmctl("models", "--json").stdout)["models"]
        assert next(m for m in models if m["name"] == TINY)["pinned"] is True
        # Another key after p cancels.
        s.keys("p")
        s.wait(lambda t: f"unpin {TINY}? press y" in t, "the confirmation")
        s.keys("n")
        s.wait(lambda t: "cancelled" in t, "the cancel")
        s.keys("q")
        text = s.wait(lambda t: "EXIT=" in t, "llmctl to exit")
        assert "EXIT=0" in text


def test_top_without_a_terminal_prints_one_plain_frame(daemon: Factory) -> None:
    d = daemon().start()
    r = d.llmctl("top")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("llmd ") and "\x1b[" not in r.stdout
    assert "MODEL" in r.stdout and TINY in r.stdout and "q quit" not in r.stdout
    d.stop()
    r = d.llmctl("top", "--once")
    assert r.returncode == 3 and "cannot reach llmd" in r.stderr


def test_tokens_per_second_come_from_successive_counts(daemon: Factory) -> None:
    d = daemon().start()
    before = json.loads(d.llmctl("models", "--json").stdout)["models"]
    assert next(m for m in before if m["name"] == TINY)["eval_tokens"] == 0
    status, _, body, _ = call(
        d.url + "/api/generate",
        {"model": TINY, "prompt": "hi", "stream": False, "options": {"num_predict": 7}},
    )
    assert status == 200, body
    after = json.loads(d.llmctl("models", "--json").stdout)["models"]
    assert next(m for m in after if m["name"] == TINY)["eval_tokens"] == body["eval_count"]

    from llmd.top import View

    v = View(status={"models": [{"name": "a", "eval_tokens": 100}]})
    v.count_tokens(10.0)
    assert v.rates == {}  # one reading: no rate yet
    v.status = {"models": [{"name": "a", "eval_tokens": 160}]}
    v.count_tokens(12.0)
    assert v.rates == {"a": 30.0}
    v.status = {"models": [{"name": "a", "eval_tokens": 5}]}  # llmd restarted: counts reset
    v.count_tokens(13.0)
    assert v.rates == {"a": 30.0}
