"""End to end: clients asking for other runner options (num_ctx...) do not make the child reload
a loaded model (ollama#8903, #6148), unless `reload_on_options = true` asks for Ollama's way.

Loads are counted in the simulator's own log lines (`llama runner started`, which llmd copies
into its log), since a reload by the child happens behind llmd's back; `context_length` in the
child's /api/ps says which num_ctx the runner has."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from llmdproc import Factory, Llmd, scrape, series

TINY = "tiny:1m"  # trained context 8192
EMBED = "tiny-embed:1m"  # trained context 512


def post(d: Llmd, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        d.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def generate(d: Llmd, options: dict[str, Any] | None = None, path: str = "/api/generate") -> None:
    body: dict[str, Any] = {"model": TINY, "stream": False}
    if path == "/api/chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    if options is not None:
        body["options"] = options
    status, doc = post(d, path, body)
    assert status == 200, doc


def child_ctx(d: Llmd, model: str) -> int:
    """The num_ctx the child's runner for `model` has (its /api/ps context_length)."""
    ps = {m["name"]: m for m in d.get("/api/ps", backend=0)["models"]}
    return int(ps[model]["context_length"])


def runner_starts(d: Llmd, model: str) -> int:
    """Loads the simulator itself logged for `model` (llmd's own and the child's reloads)."""
    return sum(
        "llama runner started" in line and f"model={model}" in line
        for line in d.logs().splitlines()
    )


def test_other_runner_options_are_served_by_the_loaded_runner(daemon: Factory) -> None:
    """num_ctx 2048, then 8192: one load only, the second request is served with 2048, and the
    override is counted in /metrics and `llmctl models --json`; likewise for embeddings."""
    d = daemon().start()
    generate(d, {"num_ctx": 2048})
    generate(d, {"num_ctx": 8192, "temperature": 0.1}, path="/api/chat")
    generate(d)  # no options: Ollama's default num_ctx would reload it too
    assert child_ctx(d, TINY) == 2048
    assert runner_starts(d, TINY) == 1
    for path, ctx in (("/api/embed", 256), ("/api/embeddings", 512), ("/api/embed", 128)):
        field = "input" if path == "/api/embed" else "prompt"
        status, doc = post(d, path, {"model": EMBED, field: "x", "options": {"num_ctx": ctx}})
        assert status == 200, doc
    assert child_ctx(d, EMBED) == 256
    assert runner_starts(d, EMBED) == 1
    s = scrape(d)
    assert s[series("llmd_runner_options_overridden_total", model=TINY)] == 1
    assert s[series("llmd_runner_options_overridden_total", model=EMBED)] == 2
    m = d.model(TINY)
    assert m["options_overridden"] == 1
    assert m["runner_options"] == {"num_ctx": 2048}
    # An operator sees, once, that a client wanted more context than the model was given.
    asked = [ln for ln in d.logs().splitlines() if f"{TINY}: a client asked for num_ctx" in ln]
    assert len(asked) == 1 and "num_ctx 8192" in asked[0]
    # Once unloaded, the next request's options decide the next load.
    assert d.llmctl("unload", TINY).returncode == 0
    generate(d, {"num_ctx": 8192})
    assert child_ctx(d, TINY) == 8192
    assert runner_starts(d, TINY) == 2


def test_configured_options_decide_the_load(daemon: Factory) -> None:
    """With `options = { num_ctx = 4096 }` the model loads with 4096 even though the first
    request asked for 2048, and no later request reloads it; `llmctl load` uses them too."""
    d = daemon(models=[{"name": TINY, "options": {"num_ctx": 4096}}]).start()
    generate(d, {"num_ctx": 2048})
    assert child_ctx(d, TINY) == 4096
    generate(d, {"num_ctx": 8192}, path="/api/chat")
    generate(d)
    assert child_ctx(d, TINY) == 4096
    assert runner_starts(d, TINY) == 1
    assert d.model(TINY)["options_overridden"] == 2
    assert d.llmctl("unload", TINY).returncode == 0
    assert d.llmctl("load", TINY).returncode == 0
    assert child_ctx(d, TINY) == 4096


def test_reload_on_options_reloads_as_ollama_does(daemon: Factory) -> None:
    """`reload_on_options = true`: a request with another num_ctx reloads the model."""
    d = daemon(models=[{"name": TINY, "reload_on_options": True}]).start()
    generate(d, {"num_ctx": 2048})
    generate(d, {"num_ctx": 8192})
    assert child_ctx(d, TINY) == 8192
    assert runner_starts(d, TINY) == 2
    assert d.model(TINY)["options_overridden"] == 0


def test_v1_is_served_without_reload_when_the_backend_default_matches(daemon: Factory) -> None:
    """A backend whose OLLAMA_CONTEXT_LENGTH equals the model's configured num_ctx (the remedy
    for /v1 before derived models) serves /v1 requests and native ones with the one load llmd
    made. (/v1 without it: tests/test_derived_e2e.py.)"""
    d = daemon(
        models=[{"name": TINY, "options": {"num_ctx": 2048}}],
        backend_extra=[{"env": {"OLLAMA_CONTEXT_LENGTH": "2048"}}],
    ).start()
    chat = {"model": TINY, "messages": [{"role": "user", "content": "hi"}]}
    status, doc = post(d, "/v1/chat/completions", chat)
    assert status == 200, doc
    generate(d, {"num_ctx": 8192})
    status, doc = post(d, "/v1/completions", {"model": TINY, "prompt": "hi"})
    assert status == 200, doc
    assert child_ctx(d, TINY) == 2048
    assert runner_starts(d, TINY) == 1
    assert "/v1 requests cannot carry runner options" not in d.logs()
