"""End to end: /v1 requests, which cannot carry runner options, are served by the runner a model
is loaded with instead of making the child reload it with Ollama's defaults: llmd sends them to a
derived model it made on the child (llmd/derived.py), which the clients never see.

Loads are counted in the simulator's own log lines (`llama runner started`, which llmd copies into
its log), since a reload by the child happens behind llmd's back; `context_length` in the child's
/api/ps says which num_ctx the runner has. Clients are the official `openai` client and urllib."""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Any

import openai
from llmdproc import Factory, Llmd, call, wait_for

TINY = "tiny:1m"  # trained context 8192
EMBED = "tiny-embed:1m"  # trained context 512
NAMESPACE = "llmd-derived/"
CHAT = [{"role": "user", "content": "hello there"}]


def client(d: Llmd) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0)


def native(d: Llmd, model: str, options: dict[str, Any] | None = None) -> None:
    """One native request (generate, or embed for an embedding model) with these options."""
    path, body = ("/api/embed", {"input": "x"}) if "embed" in model else ("/api/generate", {})
    body = {"model": model, "stream": False, "prompt": "hi", **body}
    if options is not None:
        body["options"] = options
    status, _, doc, _ = call(d.url + path, body)
    assert status == 200, doc


def child_ps(d: Llmd) -> dict[str, dict[str, Any]]:
    """The child's own /api/ps, by name."""
    return {m["name"]: m for m in d.get("/api/ps", backend=0)["models"]}


def runner_starts(d: Llmd) -> int:
    """Loads the simulator itself logged (llmd's own and the child's reloads), any model."""
    return sum("llama runner started" in line for line in d.logs().splitlines())


def creates(d: Llmd) -> int:
    """POST /api/create requests the child answered (its request log, copied into llmd's)."""
    return sum('POST    "/api/create"' in line for line in d.logs().splitlines())


def derived_on_child(d: Llmd) -> str:
    """The one derived model on the child."""
    (name,) = [
        m["name"]
        for m in d.get("/api/tags", backend=0)["models"]
        if m["name"].startswith(NAMESPACE)
    ]
    return str(name)


def assert_hidden(d: Llmd) -> None:
    """No derived name in the proxy's /api/tags, /v1/models and /api/ps or in `llmctl models`;
    the child itself has them."""
    tags = [m["name"] for m in d.get("/api/tags")["models"]]
    v1 = [m["id"] for m in d.get("/v1/models")["data"]]
    ps = [m["name"] for m in d.get("/api/ps")["models"]]
    r = d.llmctl("models", "--json")
    assert r.returncode == 0, r.stderr
    listed = [m["name"] for m in json.loads(r.stdout)["models"]]
    for names in (tags, v1, ps, listed):
        assert names and not [n for n in names if n.startswith(NAMESPACE)], names
    on_child = [m["name"] for m in d.get("/api/tags", backend=0)["models"]]
    assert [n for n in on_child if n.startswith(NAMESPACE)]


def test_v1_is_served_by_the_runner_of_the_configured_options(daemon: Factory) -> None:
    """With `options = { num_ctx = 8192 }` loaded by a native request, /v1 chat (streamed and
    not), completions and embeddings are served by that runner: no second load, one create per
    model, the answers name the model as the client sent it, and the derived models llmd made
    show nowhere but on the child itself."""
    d = daemon(
        models=[
            {"name": TINY, "options": {"num_ctx": 8192}},
            {"name": EMBED, "options": {"num_ctx": 256}},
        ]
    ).start()
    native(d, TINY, {"num_ctx": 2048})
    native(d, EMBED)
    assert runner_starts(d) == 2
    with client(d) as c:
        r = c.chat.completions.create(model=TINY, messages=CHAT)  # type: ignore[arg-type]
        assert r.model == TINY and r.choices[0].message.content
        chunks = list(
            c.chat.completions.create(
                model=TINY,
                messages=CHAT,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert len(chunks) > 3 and {ch.model for ch in chunks} == {TINY}
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == r.choices[0].message.content
        done = c.completions.create(model=TINY, prompt="once upon", max_tokens=3)
        assert done.model == TINY and done.usage is not None
        streamed = list(c.completions.create(model=TINY, prompt="once upon", stream=True))
        assert {ch.model for ch in streamed} == {TINY}
        e = c.embeddings.create(model=EMBED, input=["alpha", "beta"])
        assert e.model == EMBED and len(e.data) == 2
    native(d, TINY)
    assert runner_starts(d) == 2
    ps = child_ps(d)
    assert ps[TINY]["context_length"] == 8192 and ps[EMBED]["context_length"] == 256
    assert creates(d) == 2
    assert "/v1 requests cannot carry runner options" not in d.logs()
    assert d.model(TINY)["state"] == "loaded"
    assert_hidden(d)


def test_v1_is_served_by_the_runner_a_native_request_loaded(daemon: Factory) -> None:
    """A model without configured options, loaded by a native request with num_ctx 8192, is
    served on /v1 by that runner too (non-streamed JSON with a Content-Length upstream, and
    an SSE stream split into chunks)."""
    d = daemon().start()
    native(d, TINY, {"num_ctx": 8192})
    with client(d) as c:
        r = c.chat.completions.create(model=TINY, messages=CHAT)  # type: ignore[arg-type]
        assert r.model == TINY
        streamed = list(c.completions.create(model=TINY, prompt="once upon", stream=True))
        assert {ch.model for ch in streamed} == {TINY}
    status, _, doc, _ = call(d.url + "/v1/chat/completions", {"model": TINY, "messages": CHAT})
    assert status == 200 and doc["model"] == TINY, doc
    assert runner_starts(d) == 1 and child_ps(d)[TINY]["context_length"] == 8192
    assert d.model(TINY)["runner_options"] == {"num_ctx": 8192}
    assert_hidden(d)


def test_concurrent_v1_requests_share_one_create(daemon: Factory) -> None:
    """Several /v1 requests for a cold model with configured options at once: one create,
    one load, every answer naming the model as sent."""
    d = daemon(models=[{"name": TINY, "options": {"num_ctx": 2048}}]).start()
    answers: list[Any] = []

    def ask() -> None:
        answers.append(call(d.url + "/v1/chat/completions", {"model": TINY, "messages": CHAT}))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(a[0], a[2]["model"]) for a in answers] == [(200, TINY)] * 6
    assert creates(d) == 1 and runner_starts(d) == 1
    assert child_ps(d)[TINY]["context_length"] == 2048


def test_runner_loaded_under_the_derived_name_counts_as_the_base(daemon: Factory) -> None:
    """A runner the child lists under a derived name (loaded there by a request for that name)
    is the base model's to llmd: found loaded, shown under the base's name and digest in
    /api/ps, used by /v1 requests without a reload and unloaded by `llmctl unload`."""
    d = daemon(models=[{"name": TINY, "options": {"num_ctx": 2048}}]).start()
    with client(d) as c:
        c.chat.completions.create(model=TINY, messages=CHAT)  # type: ignore[arg-type]
    derived = derived_on_child(d)
    assert d.llmctl("unload", TINY).returncode == 0
    assert child_ps(d) == {}
    # Straight to the child, behind llmd's back: the runner is listed under the derived name.
    status, _, doc, _ = call(d.backend_url(0) + "/api/generate", {"model": derived})
    assert status == 200 and doc["done_reason"] == "load", doc
    assert list(child_ps(d)) == [derived]
    wait_for(lambda: d.model(TINY)["state"] == "loaded", timeout=15, what="reconciliation")
    base_digest = {m["name"]: m["digest"] for m in d.get("/api/tags")["models"]}[TINY]
    ps = d.get("/api/ps")["models"]
    assert [(m["name"], m["model"], m["digest"]) for m in ps] == [(TINY, TINY, base_digest)]
    starts = runner_starts(d)
    with client(d) as c:
        assert c.chat.completions.create(model=TINY, messages=CHAT).model == TINY  # type: ignore[arg-type]
    assert runner_starts(d) == starts
    assert_hidden(d)
    assert d.llmctl("unload", TINY).returncode == 0
    assert child_ps(d) == {}
    assert d.model(TINY)["state"] == "unloaded"


def test_failed_create_falls_back_to_ollamas_defaults(daemon: Factory) -> None:
    """When the child refuses to create the derived model, /v1 requests are sent as they came:
    they succeed, served with Ollama's defaults (num_ctx 4096 here, a reload), as before llmd
    made derived models; the failure and the reload are each logged once."""
    d = daemon(
        models=[{"name": TINY, "options": {"num_ctx": 2048}}],
        backend_extra=[{"env": {"OLLAMA_SIM_FAULTS": "fail_create=1"}}],
    ).start()
    assert d.llmctl("load", TINY).returncode == 0
    assert child_ps(d)[TINY]["context_length"] == 2048
    with client(d) as c:
        for _ in range(2):
            r = c.chat.completions.create(model=TINY, messages=CHAT)  # type: ignore[arg-type]
            assert r.model == TINY
    assert child_ps(d)[TINY]["context_length"] == 4096
    assert runner_starts(d) == 2 and creates(d) == 1
    logs = d.logs()
    assert logs.count("for /v1 requests) failed") == 1
    wait_for(lambda: "/v1 requests cannot carry runner options" in d.logs(), what="the notice")


def test_derived_model_removed_on_the_child_is_made_again(daemon: Factory) -> None:
    """A derived model deleted on the child behind llmd's back: the request that finds it gone
    fails (404, naming the model as sent), and the next one makes it again."""
    d = daemon(models=[{"name": TINY, "options": {"num_ctx": 2048}}]).start()
    body = {"model": TINY, "messages": CHAT}
    assert call(d.url + "/v1/chat/completions", body)[0] == 200
    derived = derived_on_child(d)
    req = urllib.request.Request(
        d.backend_url(0) + "/api/delete",
        data=json.dumps({"model": derived}).encode(),
        method="DELETE",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    status, _, doc, _ = call(d.url + "/v1/chat/completions", body)
    assert status == 404 and NAMESPACE not in json.dumps(doc), doc
    status, _, doc, _ = call(d.url + "/v1/chat/completions", body)
    assert status == 200 and doc["model"] == TINY
    assert creates(d) == 2 and runner_starts(d) == 1


def test_deleting_a_model_deletes_its_derived_models(daemon: Factory) -> None:
    """DELETE /api/delete of a model through llmd also deletes the derived models llmd made of
    it on that child, which would otherwise keep its file on disk."""
    d = daemon(models=[{"name": TINY, "options": {"num_ctx": 2048}}]).start()
    assert call(d.url + "/v1/chat/completions", {"model": TINY, "messages": CHAT})[0] == 200
    derived = derived_on_child(d)
    req = urllib.request.Request(
        d.url + "/api/delete", data=json.dumps({"model": TINY}).encode(), method="DELETE"
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200

    def on_child() -> set[str]:
        return {m["name"] for m in d.get("/api/tags", backend=0)["models"]}

    wait_for(lambda: not {TINY, derived} & on_child(), what="the derived model deleted")
