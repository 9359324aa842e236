"""The simulator's HTTP API, driven by the official ollama and openai clients and raw httpx."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from simproc import SimProcess, start_sim


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    tmp = tmp_path_factory.mktemp("api")
    with start_sim(tmp, {"OLLAMA_SIM_GPU": ""}) as s:
        yield s


@pytest.fixture(scope="module")
def client(sim: SimProcess) -> Iterator[ollama.Client]:
    c = ollama.Client(host=sim.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def oai(sim: SimProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(sim: SimProcess) -> Iterator[httpx.Client]:
    """Raw HTTP to the simulator (one client: creating one per call is slow)."""
    with httpx.Client(base_url=sim.url) as c:
        yield c


def test_health_and_version(http: httpx.Client) -> None:
    """GET and HEAD / answer "Ollama is running"; /api/version reports 0.33.0-rc2."""
    r = http.get("/")
    assert (r.status_code, r.text) == (200, "Ollama is running")
    assert http.head("/").status_code == 200
    assert http.get("/api/version").json() == {"version": "0.33.0-rc2"}
    assert http.head("/api/version").status_code == 200


def test_unknown_path_and_wrong_method(http: httpx.Client) -> None:
    """Unknown paths are a plain-text 404; a wrong method is a 405."""
    r = http.get("/api/nope")
    assert r.status_code == 404 and r.text == "404 page not found"
    assert http.get("/api/generate").status_code == 405
    assert http.post("/api/tags").status_code == 405


def test_preset_models_are_listed(client: ollama.Client) -> None:
    """Catalog models marked pulled = true are installed from the start, with details."""
    models = {m.model: m for m in client.list().models}
    assert {"tiny:1m", "tiny:2m", "tiny-embed:1m"} <= set(models)
    tiny = models["tiny:1m"]
    assert tiny.size == 4 * 1024 * 1024
    assert tiny.details is not None and tiny.details.family == "llama"
    assert tiny.digest and len(tiny.digest) == 64


def test_show_reports_architecture(client: ollama.Client) -> None:
    """/api/show carries the numbers a memory estimator needs in model_info."""
    info = client.show("tiny:1m")
    mi = info.modelinfo or {}
    assert mi["general.architecture"] == "llama"
    assert mi["llama.block_count"] == 4
    assert mi["llama.attention.head_count_kv"] == 2
    assert mi["llama.attention.key_length"] == 16
    assert mi["llama.context_length"] == 8192
    assert mi["general.parameter_count"] == 1_000_000
    assert info.capabilities == ["completion"]
    assert isinstance(info.modelfile, str) and "FROM" in info.modelfile
    with pytest.raises(ollama.ResponseError) as e:
        client.show("missing:1")
    assert e.value.status_code == 404 and e.value.error == "model 'missing:1' not found"


def test_generate_is_deterministic_and_streams(client: ollama.Client) -> None:
    """Generate returns the same text for the same prompt, streamed token by token or whole."""
    whole = client.generate(model="tiny:1m", prompt="why is the sky blue?")
    again = client.generate(model="tiny:1m", prompt="why is the sky blue?")
    assert whole.response == again.response and whole.response
    parts = list(client.generate(model="tiny:1m", prompt="why is the sky blue?", stream=True))
    assert "".join(p.response for p in parts) == whole.response
    last = parts[-1]
    assert last.done and last.done_reason == "stop" and not any(p.done for p in parts[:-1])
    assert last.eval_count == len(parts) - 1
    assert last.prompt_eval_count == 5 and last.context
    assert last.total_duration and last.total_duration >= (last.eval_duration or 0)
    other = client.generate(model="tiny:1m", prompt="something else")
    assert other.response != whole.response


def test_num_predict_bounds_tokens(client: ollama.Client) -> None:
    """options.num_predict caps the reply; done_reason is then "length"."""
    r = client.generate(model="tiny:1m", prompt="count", options={"num_predict": 3})
    assert r.eval_count == 3 and r.done_reason == "length"


def test_chat_streamed_and_not(client: ollama.Client) -> None:
    """Chat answers as the assistant; streamed chunks join to the non-streamed reply."""
    msgs = [{"role": "user", "content": "hello there"}]
    whole = client.chat(model="tiny:2m", messages=msgs)
    assert whole.message.role == "assistant" and whole.message.content
    chunks = list(client.chat(model="tiny:2m", messages=msgs, stream=True))
    assert "".join(c.message.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].done and chunks[-1].done_reason == "stop"


async def test_async_client_generate(sim: SimProcess) -> None:
    """The AsyncClient streams generate output too."""
    c = ollama.AsyncClient(host=sim.url)
    try:
        text = ""
        async for part in await c.generate(model="tiny:1m", prompt="async", stream=True):
            text += part.response
        assert text == (await c.generate(model="tiny:1m", prompt="async")).response
    finally:
        await c.close()


def test_native_streaming_wire_format(http: httpx.Client) -> None:
    """Streams are application/x-ndjson; stream:false is one application/json object."""
    body = {"model": "tiny:1m", "prompt": "wire"}
    with http.stream("POST", "/api/generate", json=body) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and "load_duration" in lines[-1]
    r2 = http.post("/api/generate", json={**body, "stream": False})
    assert r2.headers["content-type"] == "application/json; charset=utf-8"
    assert r2.json()["response"] == "".join(x["response"] for x in lines)


def test_embed_and_legacy_embeddings(client: ollama.Client) -> None:
    """Embeddings are deterministic unit vectors of the model's embedding_length."""
    r = client.embed(model="tiny-embed:1m", input=["alpha", "beta"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 32
    assert sum(v * v for v in r.embeddings[0]) == pytest.approx(1.0, rel=1e-4)
    assert r.embeddings[0] != r.embeddings[1]
    assert client.embed(model="tiny-embed:1m", input="alpha").embeddings[0] == r.embeddings[0]
    legacy = client.embeddings(model="tiny-embed:1m", prompt="alpha")
    assert len(legacy.embedding) == 32


def test_embedding_model_cannot_generate_or_chat(http: httpx.Client) -> None:
    """An embedding-only model answers 400 "does not support" on generate and chat."""
    r = http.post("/api/generate", json={"model": "tiny-embed:1m", "prompt": "x"})
    assert r.status_code == 400 and r.json() == {
        "error": '"tiny-embed:1m" does not support generate'
    }
    r = http.post(
        "/api/chat",
        json={"model": "tiny-embed:1m", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400 and r.json() == {"error": '"tiny-embed:1m" does not support chat'}


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/generate", None, 400, "missing request body"),
        # encoding/json scanner.go: after "{" only a key string (or "}") may come.
        (
            "/api/generate",
            "{bad",
            400,
            "invalid character 'b' looking for beginning of object key string",
        ),
        ("/api/generate", "nope", 400, "invalid character 'o' in literal null (expecting 'u')"),
        ("/api/generate", "null", 404, "model '' not found"),  # null decodes as {}
        (
            "/api/generate",
            '{"model": "tiny:1m", "prompt": 1 "x"}',
            400,
            ("invalid character '\"' after object key:value pair"),
        ),
        (
            "/api/generate",
            {"model": "tiny:1m", "keep_alive": "-1"},
            400,
            'time: missing unit in duration "-1"',
        ),
        ("/api/chat", {"model": "tiny:1m", "keep_alive": True}, 400, "Unsupported type: 'bool'"),
        ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ("/api/chat", {"model": "", "messages": []}, 400, "model is required"),
        ("/api/chat", {"model": "nope", "messages": []}, 404, "model 'nope' not found"),
        (
            "/api/embed",
            {"model": "nope", "input": "x"},
            404,
            'model "nope" not found, try pulling it first',
        ),
        ("/api/embed", {"model": "tiny-embed:1m", "input": 5}, 400, "invalid input type"),
        (
            "/api/pull",
            {"model": "no-such-model:7b", "stream": False},
            500,
            "pull model manifest: file does not exist",
        ),
        ("/api/pull", {"model": ""}, 400, "invalid model name"),
        ("/api/copy", {"source": "nope", "destination": "x:1"}, 404, 'model "nope" not found'),
    ],
)
def test_native_errors(
    http: httpx.Client, path: str, body: object, status: int, error: str
) -> None:
    """Bad requests get Ollama's status codes and {"error": ...} messages."""
    if body is None:
        r = http.post(path)
    elif isinstance(body, str):
        r = http.post(path, content=body)
    else:
        r = http.post(path, json=body)
    assert (r.status_code, r.json()) == (status, {"error": error})


def test_delete_unknown_is_404(http: httpx.Client) -> None:
    """DELETE /api/delete of an unknown model is a 404."""
    r = http.request("DELETE", "/api/delete", json={"model": "ghost:1"})
    assert r.status_code == 404 and r.json() == {"error": "model 'ghost:1' not found"}


def test_pull_copy_delete(client: ollama.Client, http: httpx.Client) -> None:
    """Pull streams progress and installs the model; copy shares the digest; delete removes it."""
    progress = list(client.pull("phi3", stream=True))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses and "writing manifest" in statuses
    layer = [p for p in progress if p.total]
    assert layer[-1].completed == layer[-1].total == 2176177120
    assert layer[0].status == f"pulling {layer[0].digest.removeprefix('sha256:')[:12]}"
    names = [m.model for m in client.list().models]
    assert names[0] == "phi3:latest"  # newest first
    assert client.copy("phi3:latest", "myphi:v1").status == "success"
    digests = {m.model: m.digest for m in client.list().models}
    assert digests["myphi:v1"] == digests["phi3:latest"]
    r = http.request("DELETE", "/api/delete", json={"model": "myphi:v1"})
    assert r.status_code == 200 and r.content == b""
    assert client.pull("phi3:mini", stream=False).status == "success"
    client.delete("phi3:latest")
    client.delete("phi3:mini")
    assert not {"myphi:v1", "phi3:latest", "phi3:mini"} & {m.model for m in client.list().models}


def test_create_from_a_model_with_parameters(client: ollama.Client, http: httpx.Client) -> None:
    """/api/create with `from` and `parameters` writes a new manifest (another digest) over the
    same model, with the parameters merged over the source's; /api/show lists them in Ollama's
    `%-30s %#v` lines and names the source as parent_model; delete removes only the copy."""
    r = client.create("ns-test/tiny:ctx", from_="tiny:1m", parameters={"num_ctx": 2048})
    assert r.status == "success"
    statuses = [
        p.status
        for p in client.create(
            "ns-test/tiny:ctx2",
            from_="ns-test/tiny:ctx",
            parameters={"num_batch": 256, "stop": ["<x>", "<y>"]},
            stream=True,
        )
    ]
    assert statuses[0].startswith("using existing layer sha256:")
    assert statuses[-2:] == ["writing manifest", "success"]
    digests = {m.model: m.digest for m in client.list().models}
    assert len({digests["tiny:1m"], digests["ns-test/tiny:ctx"], digests["ns-test/tiny:ctx2"]}) == 3
    show = client.show("ns-test/tiny:ctx2")
    assert show.parameters == "\n".join(
        [
            f"{'num_ctx':<30} 2048",
            f"{'num_batch':<30} 256",
            f'{"stop":<30} "<x>"',
            f'{"stop":<30} "<y>"',
        ]
    )
    assert show.details is not None and show.details.parent_model == "ns-test/tiny:ctx"
    assert show.modelfile is not None and "PARAMETER num_ctx 2048\n" in show.modelfile
    assert client.show("tiny:1m").details.parent_model == ""  # type: ignore[union-attr]
    for name in ("ns-test/tiny:ctx", "ns-test/tiny:ctx2"):
        assert http.request("DELETE", "/api/delete", json={"model": name}).status_code == 200
    names = {m.model for m in client.list().models}
    assert "tiny:1m" in names and not {"ns-test/tiny:ctx", "ns-test/tiny:ctx2"} & names


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"model": "x:1"}, 400, "neither 'from' or 'files' was specified"),
        ({"model": "bad name", "from": "tiny:1m"}, 400, "invalid model name"),
        ({"model": "x:1", "from": "a/b/c/d"}, 400, "invalid model name"),
        (
            {"model": "x:1", "from": "ghost:1", "stream": False},
            500,
            "pull model manifest: file does not exist",
        ),
        (
            {"model": "x:1", "from": "tiny:1m", "parameters": []},
            400,
            "json: cannot unmarshal array into Go struct field CreateRequest.parameters "
            "of type map[string]interface {}",
        ),
    ],
)
def test_create_errors(
    http: httpx.Client, body: dict[str, object], status: int, error: str
) -> None:
    """A create without `from`, with an invalid name or an unknown source fails as Ollama's."""
    r = http.post("/api/create", json=body)
    assert (r.status_code, r.json()) == (status, {"error": error})


def test_unknown_model_pull_streams_error(client: ollama.Client) -> None:
    """Pulling a model outside the catalog fails with Ollama's manifest error."""
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        list(client.pull("no-such-model:7b", stream=True))


def test_openai_chat(oai: openai.OpenAI, client: ollama.Client) -> None:
    """/v1/chat/completions answers like /api/chat, with usage; streaming ends in a finish chunk."""
    msgs = [{"role": "user", "content": "hello there"}]
    r = oai.chat.completions.create(model="tiny:2m", messages=msgs)  # type: ignore[arg-type]
    native = client.chat(model="tiny:2m", messages=msgs)
    assert r.choices[0].message.content == native.message.content
    assert r.choices[0].finish_reason == "stop" and r.system_fingerprint == "fp_ollama"
    assert r.usage is not None and r.usage.completion_tokens == native.eval_count
    chunks = list(
        oai.chat.completions.create(
            model="tiny:2m",
            messages=msgs,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == native.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].choices[0].delta.role is None
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1


def test_openai_sse_wire_format(http: httpx.Client) -> None:
    """/v1 streams are SSE `data:` events ending with data: [DONE]."""
    body = {"model": "tiny:1m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"] == "text/event-stream"
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_openai_completions_and_max_tokens(oai: openai.OpenAI) -> None:
    """/v1/completions honours max_tokens and streams text chunks."""
    r = oai.completions.create(model="tiny:1m", prompt="once upon", max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage and r.usage.completion_tokens == 2
    chunks = list(oai.completions.create(model="tiny:1m", prompt="once upon", stream=True))
    full = oai.completions.create(model="tiny:1m", prompt="once upon")
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_embeddings(oai: openai.OpenAI, client: ollama.Client) -> None:
    """/v1/embeddings matches /api/embed (the client's default base64 encoding included)."""
    r = oai.embeddings.create(model="tiny-embed:1m", input=["alpha", "beta"])
    native = client.embed(model="tiny-embed:1m", input=["alpha", "beta"])
    assert [d.index for d in r.data] == [0, 1]
    assert r.data[0].embedding == pytest.approx(native.embeddings[0], rel=1e-6)
    f = oai.embeddings.create(model="tiny-embed:1m", input="alpha", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(native.embeddings[0], rel=1e-6)


def test_openai_models(oai: openai.OpenAI) -> None:
    """/v1/models lists installed models; /v1/models/{id} retrieves one or 404s."""
    ids = {m.id for m in oai.models.list()}
    assert "tiny:1m" in ids
    m = oai.models.retrieve("tiny:1m")
    assert m.owned_by == "library" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("ghost:1")


def test_openai_error_shape(http: httpx.Client, oai: openai.OpenAI) -> None:
    """/v1 errors are OpenAI-shaped with the native status code."""
    r = http.post("/v1/chat/completions", json={"model": "tiny:1m", "messages": []})
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": "[] is too short - 'messages'",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="ghost:1", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example.com", 403),
        ("evil.example.com:11434", 403),
        ("localhost:11434", 200),
        ("foo.localhost", 200),
        ("printer.local", 200),
        ("db.internal", 200),
        ("192.168.1.10:80", 200),
        ("10.0.0.1", 200),
        ("8.8.8.8", 403),
        (socket.gethostname(), 200),
    ],
)
def test_host_check(http: httpx.Client, host: str, status: int) -> None:
    """On a loopback listener, a non-local Host header gets 403 (allowedHostsMiddleware)."""
    r = http.get("/api/version", headers={"Host": host})
    assert r.status_code == status


def test_models_persist_across_restart(tmp_path: Path) -> None:
    """Pulls and deletes are recorded in OLLAMA_MODELS: a restarted simulator still has them."""
    env = {"OLLAMA_SIM_GPU": ""}
    with start_sim(tmp_path, env) as s:
        c = ollama.Client(host=s.url)
        c.pull("nomic-embed-text", stream=False)
        c.delete("tiny:2m")
        c.close()
    with start_sim(tmp_path, env) as s:
        c = ollama.Client(host=s.url)
        names = {m.model for m in c.list().models}
        c.close()
    assert "nomic-embed-text:latest" in names and "tiny:2m" not in names
