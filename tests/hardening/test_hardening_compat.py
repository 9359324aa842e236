"""What clients see through llmd is what Ollama (the simulator, checked against Ollama's source)
shows: names echoed as sent, Ollama's own error wording, compact JSON, 405s; and two names of one
model share one runner (issue 9, items 10 and 11)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llmdproc import Llmd, cleanup, make_llmd, pull, wait_for

from llmd.ollama_errors import json_syntax_error, keep_alive_seconds

TINY = "tiny:1m"
LLAMA = "llama3.2:latest"
LLAMA_3B = "llama3.2:3b"  # the same model (same digest) under another tag


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llmd]:
    """One llmd for the table: its child has nomic-embed-text and llama3.2 pulled."""
    d = make_llmd(tmp_path_factory.mktemp("compat"))
    d.start()
    try:
        pull(d, "nomic-embed-text")
        pull(d, "llama3.2")
        yield d
    finally:
        cleanup(d)


def send(
    base: str, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, str, bytes]:
    """One request: status, content type and the raw body bytes."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


# Volatile fields that differ between any two answers of Ollama itself.
VOLATILE = {
    "created_at",
    "created",
    "id",
    "total_duration",
    "load_duration",
    "prompt_eval_duration",
    "eval_duration",
    "expires_at",
}


def _stable(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _stable(v) for k, v in doc.items() if k not in VOLATILE}
    if isinstance(doc, list):
        return [_stable(v) for v in doc]
    return doc


def _lines(raw: bytes) -> list[Any]:
    return [_stable(json.loads(line)) for line in raw.splitlines() if line.strip()]


# (id, method, path, body or raw bytes, what Ollama's source says, as (status, body) or None
# where only "the same as the simulator" is checked).
CASES: list[tuple[str, str, str, Any, tuple[int, Any] | None]] = [
    # Names are echoed as sent (server/routes.go: Model: req.Model).
    ("embed short name", "POST", "/api/embed", {"model": "nomic-embed-text", "input": "x"}, None),
    (
        "generate short name",
        "POST",
        "/api/generate",
        {"model": "llama3.2", "prompt": "hi", "stream": False, "options": {"num_predict": 3}},
        None,
    ),
    (
        "generate short name streamed",
        "POST",
        "/api/generate",
        {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 3}},
        None,
    ),
    (
        "unload short name",
        "POST",
        "/api/generate",
        {"model": "nomic-embed-text", "keep_alive": 0},
        None,
    ),
    # Unknown models: GenerateHandler/ChatHandler say 'x', the embed paths handleScheduleError.
    (
        "generate unknown",
        "POST",
        "/api/generate",
        {"model": "nope", "prompt": "x"},
        (404, {"error": "model 'nope' not found"}),
    ),
    (
        "chat unknown",
        "POST",
        "/api/chat",
        {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        (404, {"error": "model 'nope' not found"}),
    ),
    (
        "embed unknown",
        "POST",
        "/api/embed",
        {"model": "nope", "input": "x"},
        (404, {"error": 'model "nope" not found, try pulling it first'}),
    ),
    (
        "embeddings unknown",
        "POST",
        "/api/embeddings",
        {"model": "nope", "prompt": "x"},
        (404, {"error": 'model "nope" not found, try pulling it first'}),
    ),
    (
        "unload unknown",
        "POST",
        "/api/generate",
        {"model": "nope", "keep_alive": 0},
        (404, {"error": "model 'nope' not found"}),
    ),
    (
        "openai chat unknown",
        "POST",
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        (
            404,
            {
                "error": {
                    "message": "model 'nope' not found",
                    "type": "not_found_error",
                    "param": None,
                    "code": None,
                }
            },
        ),
    ),
    (
        "openai embeddings unknown",
        "POST",
        "/v1/embeddings",
        {"model": "nope", "input": "x"},
        None,
    ),
    ("openai model unknown", "GET", "/v1/models/nope", None, None),
    # No model at all: GenerateHandler 404s with an empty name, ChatHandler says it is required.
    ("generate no model", "POST", "/api/generate", {"prompt": "x"}, None),
    ("chat no model", "POST", "/api/chat", {"messages": []}, None),
    ("generate model not a string", "POST", "/api/generate", {"model": 7}, None),
    # JSON syntax errors are Go's encoding/json messages (gin ShouldBindJSON).
    (
        "truncated JSON",
        "POST",
        "/api/generate",
        b'{"model": ',
        (400, {"error": "unexpected EOF"}),
    ),
    (
        "not JSON",
        "POST",
        "/api/generate",
        b"hello",
        (400, {"error": "invalid character 'h' looking for beginning of value"}),
    ),
    (
        "JSON array body",
        "POST",
        "/api/chat",
        b"[1, 2]",
        (400, {"error": "json: cannot unmarshal array into Go value of type api.ChatRequest"}),
    ),
    (
        "object key without colon",
        "POST",
        "/api/generate",
        b'{"model" "x"}',
        (400, {"error": "invalid character '\"' after object key"}),
    ),
    (
        "unquoted key",
        "POST",
        "/api/chat",
        b"{model: 1}",
        (400, {"error": "invalid character 'm' looking for beginning of object key string"}),
    ),
    (
        "missing comma",
        "POST",
        "/api/embed",
        b'{"model": "x" "input": 1}',
        (400, {"error": "invalid character '\"' after object key:value pair"}),
    ),
    ("null body", "POST", "/api/generate", b"null", (404, {"error": "model '' not found"})),
    ("openai empty body", "POST", "/v1/chat/completions", b"", None),
    ("openai array body", "POST", "/v1/chat/completions", b"[]", None),
    (
        "empty body",
        "POST",
        "/api/generate",
        b"",
        (400, {"error": "missing request body"}),
    ),
    # keep_alive: api.Duration.UnmarshalJSON and Go's time.ParseDuration.
    (
        "keep_alive without unit",
        "POST",
        "/api/generate",
        {"model": TINY, "keep_alive": "-1"},
        (400, {"error": 'time: missing unit in duration "-1"'}),
    ),
    (
        "keep_alive bool",
        "POST",
        "/api/generate",
        {"model": TINY, "keep_alive": True},
        (400, {"error": "Unsupported type: 'bool'"}),
    ),
    (
        "keep_alive object",
        "POST",
        "/api/chat",
        {"model": TINY, "keep_alive": {}},
        (400, {"error": "Unsupported type: 'map[string]interface {}'"}),
    ),
    # gin with HandleMethodNotAllowed: HEAD is only routed where Ollama registers it.
    ("HEAD /api/ps", "HEAD", "/api/ps", None, (405, None)),
    ("HEAD /v1/models", "HEAD", "/v1/models", None, (405, None)),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "ollama"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_client_sees_what_ollama_shows(
    d: Llmd, method: str, path: str, body: Any, ollama: tuple[int, Any] | None, figures: Any
) -> None:
    """Through llmd, a client gets the status, content type and body the child itself gives
    (bar times and ids), and where llmd answers itself, byte for byte in Ollama's compact JSON."""
    raw = body if isinstance(body, bytes) else None
    via = send(d.url, method, path, None if raw is not None else body, raw)
    direct = send(d.backend_url(0), method, path, None if raw is not None else body, raw)
    ok = False
    try:
        assert via[0] == direct[0], (via, direct)
        assert via[1].split(";")[0] == direct[1].split(";")[0], (via, direct)
        if direct[2].startswith((b"{", b"[")) and b"\n{" in direct[2].strip():
            assert _lines(via[2]) == _lines(direct[2])  # NDJSON stream
        elif direct[2].startswith((b"{", b"[")):
            assert _stable(json.loads(via[2])) == _stable(json.loads(direct[2]))
        else:
            assert via[2] == direct[2]
        if ollama is not None:
            status, doc = ollama
            assert direct[0] == status, direct  # the simulator is Ollama here
            if doc is not None:
                assert json.loads(direct[2]) == doc
                # Compact like Go's encoding/json, whoever wrote it.
                assert via[2].rstrip(b"\n") == direct[2].rstrip(b"\n")
        ok = True
    finally:
        figures.add("compat (llmd vs Ollama)", tried=1, handled=int(ok))


def events(d: Llmd) -> list[dict[str, Any]]:
    r = d.llmctl("events", "--json", "--limit", "100")
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout)["events"])


def models(d: Llmd) -> dict[str, dict[str, Any]]:
    r = d.llmctl("models", "--json")
    assert r.returncode == 0, r.stderr
    return {m["name"]: m for m in json.loads(r.stdout)["models"]}


def generate(d: Llmd, model: str) -> dict[str, Any]:
    status, _, raw = send(
        d.url,
        "POST",
        "/api/generate",
        {"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 3}},
    )
    assert status == 200, raw
    return dict(json.loads(raw))


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Llmd]:
    d = make_llmd(tmp_path)
    try:
        yield d
    finally:
        cleanup(d)


def test_two_tags_of_one_model_share_one_runner(fresh: Llmd) -> None:
    """After llama3.2:latest loaded, a request for llama3.2:3b (same digest) is served by the
    same runner: no unload, no second load, and `llmctl models` shows both names loaded under
    the runner's name, as Ollama's /api/ps lists it under the first name that loaded it."""
    d = fresh.start()
    pull(d, LLAMA)
    pull(d, LLAMA_3B)
    assert generate(d, LLAMA)["model"] == LLAMA
    assert generate(d, LLAMA_3B)["model"] == LLAMA_3B
    ps = d.get("/api/ps", backend=0)["models"]
    assert [e["name"] for e in ps] == [LLAMA]  # one runner, under the first name
    kinds = [(e["kind"], e.get("model")) for e in events(d)]
    assert kinds.count(("load", LLAMA)) == 1, kinds
    assert not [k for k in kinds if k[0] in ("spill", "unload", "evict", "load-failed")], kinds
    assert ("load", LLAMA_3B) not in kinds
    docs = models(d)
    assert docs[LLAMA]["state"] == "loaded" and docs[LLAMA]["runner"] == LLAMA
    assert docs[LLAMA_3B]["state"] == "loaded" and docs[LLAMA_3B]["runner"] == LLAMA
    human = d.llmctl("models").stdout
    assert f"loaded (as {LLAMA})" in human, human


def test_a_copy_shares_the_runner_of_its_source(fresh: Llmd) -> None:
    """A name made with /api/copy through llmd is the same model: a request for it while the
    source is loaded needs no load, and unloading it by either name unloads the one runner."""
    d = fresh.start()
    generate(d, TINY)
    status, _, raw = send(d.url, "POST", "/api/copy", {"source": TINY, "destination": "mine"})
    assert status == 200, raw
    assert generate(d, "mine")["model"] == "mine"
    assert [e["name"] for e in d.get("/api/ps", backend=0)["models"]] == [TINY]
    kinds = [(e["kind"], e.get("model")) for e in events(d)]
    assert kinds.count(("load", TINY)) == 1 and ("load", "mine:latest") not in kinds, kinds
    assert models(d)["mine:latest"]["runner"] == TINY
    r = d.llmctl("unload", "mine")
    assert r.returncode == 0 and "unloaded" in r.stdout, (r.stdout, r.stderr)
    wait_for(lambda: not d.get("/api/ps", backend=0)["models"], what="the runner to unload")
    assert models(d)[TINY]["state"] == "unloaded"


# encoding/json's scanner.go and time.ParseDuration, message for message.
GO_JSON = [
    ('{"model": ', "unexpected EOF"),
    ('{"a": "x', "unexpected EOF"),
    ("hello", "invalid character 'h' looking for beginning of value"),
    ('{"a" 1}', "invalid character '1' after object key"),
    ('{"a":1 "b":2}', "invalid character '\"' after object key:value pair"),
    ("{a:1}", "invalid character 'a' looking for beginning of object key string"),
    ('{"a":1,}', "invalid character '}' looking for beginning of object key string"),
    ("[1 2]", "invalid character '2' after array element"),
    ('{"a":[1,]}', "invalid character ']' looking for beginning of value"),
    ('{"a":tru}', "invalid character '}' in literal true (expecting 'e')"),
    ('{"a":nul}', "invalid character '}' in literal null (expecting 'l')"),
    ('{"a":-}', "invalid character '}' in numeric literal"),
    ('{"a":1.}', "invalid character '}' after decimal point in numeric literal"),
    ('{"a":1e}', "invalid character '}' in exponent of numeric literal"),
    ('{"a":01}', "invalid character '1' after object key:value pair"),
    ('{"a":NaN}', "invalid character 'N' looking for beginning of value"),
    ('{"a":"\\x"}', "invalid character 'x' in string escape code"),
    ('{"a":"\\u12g4"}', "invalid character 'g' in \\u hexadecimal character escape"),
    ('{"a":"line\nbreak"}', "invalid character '\\n' in string literal"),
    ("{'a':1}", "invalid character '\\'' looking for beginning of object key string"),
    ("{} x", "invalid character 'x' after top-level value"),
    ('{"a":1} \n', None),
    ('[{"a":[true,false,null,-1.5e+3,"\\u00e9\\n"]}]', None),
]


@pytest.mark.parametrize(("text", "message"), GO_JSON)
def test_json_syntax_errors_read_as_gos(text: str, message: str | None) -> None:
    """A body Go would refuse gets Go's message (what Ollama answers); one it reads gets none."""
    assert json_syntax_error(text) == message


GO_DURATIONS: list[tuple[Any, float | str]] = [
    ("10m", 600.0),
    ("1h30m", 5400.0),
    (".5s", 0.5),
    ("-1m", float("inf")),  # negative: forever
    (-1, float("inf")),
    (300, 300.0),
    ("0", 0.0),
    ("-1", 'time: missing unit in duration "-1"'),
    ("300", 'time: missing unit in duration "300"'),
    ("5x", 'time: unknown unit "x" in duration "5x"'),
    ("", 'time: invalid duration ""'),
    (" 5m", 'time: invalid duration " 5m"'),
    (".", 'time: invalid duration "."'),
    ("5m\u00e9", 'time: unknown unit "m\\xc3\\xa9" in duration "5m\\xc3\\xa9"'),
    (True, "Unsupported type: 'bool'"),
    ({}, "Unsupported type: 'map[string]interface {}'"),
    ([], "Unsupported type: '[]interface {}'"),
]


@pytest.mark.parametrize(("value", "expected"), GO_DURATIONS)
def test_keep_alive_read_as_ollama_reads_it(value: Any, expected: float | str) -> None:
    """keep_alive as api.Duration.UnmarshalJSON reads it, with Go's error messages."""
    if isinstance(expected, str):
        with pytest.raises(ValueError) as e:
            keep_alive_seconds(value)
        assert str(e.value) == expected
    else:
        assert keep_alive_seconds(value) == expected
