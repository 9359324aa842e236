"""Issue 9 items 4 and 5: exposure without keys, permissions per key, the auth matrix, and what
a child sees of a client's headers."""

from __future__ import annotations

import http.client
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
from llmdproc import Llmd, cleanup, llmd_argv, make_llmd, render_toml

ADMIN = "admin-key-0123456789"
APP = "app-key-0123456789"
TINY = "tiny:1m"


@pytest.fixture
def made(tmp_path: Path) -> Iterator[list[Llmd]]:
    daemons: list[Llmd] = []
    yield daemons
    for d in daemons:
        cleanup(d)


def check_config(tmp_path: Path, proxy: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.toml"
    path.write_text(render_toml({"proxy": proxy}, {}))
    return subprocess.run(
        [*llmd_argv(), "--check-config", str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("proxy", "ok", "says"),
    [
        ({"listen": "127.0.0.1:11434"}, True, ""),
        ({"listen": "localhost:11434"}, True, ""),
        ({"listen": "[::1]:11434"}, True, ""),
        ({"listen": "127.0.0.2:11434"}, True, ""),
        ({"listen": "0.0.0.0:11434"}, False, "proxy.listen"),
        ({"listen": "[::]:11434"}, False, "proxy.api_keys"),
        ({"listen": "192.168.1.5:11434"}, False, "allow_unauthenticated"),
        ({"listen": "llm.example.com:11434"}, False, "proxy.listen"),
        ({"listen": "0.0.0.0:11434", "api_keys": [ADMIN]}, True, ""),
        ({"listen": "0.0.0.0:11434", "inference_keys": [APP]}, True, ""),
        ({"listen": "0.0.0.0:11434", "allow_unauthenticated": True}, True, ""),
    ],
)
def test_check_config_refuses_exposure_without_keys(
    tmp_path: Path, proxy: dict[str, Any], ok: bool, says: str
) -> None:
    """A non-loopback listen without keys fails --check-config naming the keys and the fix."""
    r = check_config(tmp_path, proxy)
    assert (r.returncode == 0) is ok, r.stderr
    assert says in r.stderr


def test_start_refuses_exposure_without_keys(tmp_path: Path, made: list[Llmd]) -> None:
    """llmd will not start on 0.0.0.0 without keys: exit 78 with the reason, nothing bound."""
    d = make_llmd(tmp_path)
    made.append(d)
    d.sections["proxy"]["listen"] = f"0.0.0.0:{d.proxy_port}"
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 78
    assert "proxy.api_keys" in d.logs() and "allow_unauthenticated" in d.logs()


def test_allow_unauthenticated_warns_at_every_start(tmp_path: Path, made: list[Llmd]) -> None:
    """With the explicit opt-in, llmd serves 0.0.0.0 without keys and warns at each start."""
    d = make_llmd(tmp_path)
    made.append(d)
    d.sections["proxy"].update(listen=f"0.0.0.0:{d.proxy_port}", allow_unauthenticated=True)
    for _ in range(2):
        d.start()
        status, _, _ = call(d, "GET", "/api/tags")
        assert status == 200
        assert "WARNING" in d.logs() and "without API keys" in d.logs()
        assert d.stop() == 0


def call(
    d: Llmd, method: str, path: str, key: str | bytes | None = None, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection, with the key as raw header bytes if given."""
    conn = http.client.HTTPConnection("127.0.0.1", d.proxy_port, timeout=60)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        if key is not None:
            raw = key if isinstance(key, bytes) else key.encode()
            conn.putheader("Authorization", b"Bearer " + raw)
        data = b"" if body is None else json.dumps(body).encode()
        if body is not None or method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data or None)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


NON_ASCII = "ключ-0123456789".encode()
KEYS: dict[str, str | bytes | None] = {
    "none": None,
    "wrong": "wrong-key-0123456789",
    "non-ascii": NON_ASCII,
    "latin1": b"\xe9t\xe9-0123456789",
    "app": APP,
    "admin": ADMIN,
}
GEN = {"model": TINY, "prompt": "hi", "stream": False}
CHAT = {"model": TINY, "messages": [{"role": "user", "content": "hi"}]}
BLOB = "/api/blobs/sha256:" + "0" * 64
# (method, path, body, permission): "open" needs no key, "read" any key, "manage" an api_keys key.
ROUTES: list[tuple[str, str, Any, str]] = [
    ("GET", "/", None, "open"),
    ("HEAD", "/", None, "open"),
    ("GET", "/healthz", None, "open"),
    ("HEAD", "/healthz", None, "open"),
    ("GET", "/readyz", None, "open"),
    ("HEAD", "/readyz", None, "open"),
    *[
        (m, p, None, "manage")
        for p in ("/", "/healthz", "/readyz")
        for m in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS")
    ],
    ("GET", "/api/tags", None, "read"),
    ("HEAD", "/api/tags", None, "read"),
    ("OPTIONS", "/api/tags", None, "manage"),
    ("GET", "/api/ps", None, "read"),
    ("GET", "/api/version", None, "read"),
    ("GET", "/metrics", None, "read"),
    ("GET", "/v1/models", None, "read"),
    ("GET", f"/v1/models/{TINY}", None, "read"),
    ("POST", "/api/show", {"model": TINY}, "read"),
    ("POST", "/api/generate", GEN, "read"),
    ("POST", "/api/chat", {**CHAT, "stream": False}, "read"),
    ("POST", "/api/embed", {"model": "tiny-embed:1m", "input": "hi"}, "read"),
    ("POST", "/v1/chat/completions", CHAT, "read"),
    ("POST", "/v1/embeddings", {"model": "tiny-embed:1m", "input": "hi"}, "read"),
    # The task router's API (no task configured here: served as a 404 naming none).
    ("POST", "/infer", {"prompt": "hi", "task": "code"}, "read"),
    ("POST", "/api/pull", {"model": TINY, "stream": False}, "manage"),
    ("POST", "/api/push", {"model": TINY, "stream": False}, "manage"),
    ("POST", "/api/create", {"model": "new:1", "from": TINY, "stream": False}, "manage"),
    ("POST", "/api/copy", {"source": TINY, "destination": "copy:1"}, "manage"),
    ("DELETE", "/api/delete", {"model": "copy:1"}, "manage"),
    ("HEAD", BLOB, None, "manage"),
    ("POST", BLOB, None, "manage"),
    ("POST", "/api/unknown", {}, "manage"),
]


def expected(permission: str, key: str) -> int | None:
    """401 without a valid key, 403 for an inference key on management, else None (served)."""
    if permission == "open":
        return None
    if key not in ("app", "admin"):
        return 401
    if permission == "manage" and key == "app":
        return 403
    return None


def test_auth_matrix(tmp_path: Path, made: list[Llmd], figures: Any) -> None:
    """Every method x path x key answers as its permission says: 401 without a valid key (also
    for non-ASCII keys), 403 for an inference key on model management, in the caller's shape."""
    d = make_llmd(tmp_path, sections={"proxy": {"api_keys": [ADMIN], "inference_keys": [APP]}})
    made.append(d)
    d.start()
    wrong = []
    tried = 0
    for method, path, body, permission in ROUTES:
        for key_name, key in KEYS.items():
            tried += 1
            status, headers, raw = call(d, method, path, key, body)
            want = expected(permission, key_name)
            case = f"{method} {path} key={key_name}: {status} {raw[:200]!r}"
            if want is None:
                ok = status not in (401, 403) and status < 500
            else:
                ok = status == want and _error_shape_ok(path, method, headers, raw, status)
            if not ok:
                wrong.append(f"{case} (wanted {want or 'served'})")
    figures.add("auth matrix", tried=tried, handled=tried - len(wrong), failures=len(wrong))
    assert not wrong, "\n".join(wrong)
    assert "Traceback" not in d.logs()


def _error_shape_ok(path: str, method: str, headers: dict[str, str], raw: bytes, st: int) -> bool:
    if st == 401 and headers.get("www-authenticate") != "Bearer":
        return False
    if method == "HEAD":
        return raw == b""
    body = json.loads(raw)
    if path == "/infer":  # FastAPI's shape, as the router it stands in for answered
        return isinstance(body["detail"], str) and body["detail"]
    if path.startswith("/v1/"):
        err = body["error"]
        return isinstance(err["message"], str) and err["type"] in (
            "authentication_error",
            "permission_error",
        )
    return isinstance(body["error"], str) and body["error"]


def test_api_keys_alone_keep_full_access(tmp_path: Path, made: list[Llmd]) -> None:
    """A config with only api_keys (as before inference_keys existed) manages and infers."""
    d = make_llmd(tmp_path, sections={"proxy": {"api_keys": [ADMIN]}})
    made.append(d)
    d.start()
    assert call(d, "POST", "/api/copy", ADMIN, {"source": TINY, "destination": "c:1"})[0] == 200
    assert call(d, "POST", "/api/generate", ADMIN, GEN)[0] == 200
    assert call(d, "POST", "/api/generate", APP, GEN)[0] == 401


def test_inference_key_cannot_manage_models(tmp_path: Path, made: list[Llmd]) -> None:
    """An inference key runs models and lists them, but pull, copy and delete are 403 and do
    nothing; the official clients raise on it."""
    d = make_llmd(tmp_path, sections={"proxy": {"api_keys": [ADMIN], "inference_keys": [APP]}})
    made.append(d)
    d.start()
    v1 = d.url + "/v1"
    with (
        ollama.Client(host=d.url, headers={"Authorization": f"Bearer {APP}"}) as app,
        openai.OpenAI(base_url=v1, api_key=APP, max_retries=0) as oa,
        openai.OpenAI(base_url=v1, api_key="nope-nope-nope", max_retries=0) as stranger,
    ):
        assert app.generate(model=TINY, prompt="hi").response
        assert TINY in [m.model for m in app.list().models]
        with pytest.raises(ollama.ResponseError) as e:
            app.delete(TINY)
        assert e.value.status_code == 403 and "proxy.api_keys" in e.value.error
        with pytest.raises(ollama.ResponseError):
            app.copy(TINY, "stolen:1")
        names = [m.model for m in app.list().models]
        assert TINY in names and "stolen:1" not in names
        assert oa.chat.completions.create(model=TINY, messages=CHAT["messages"]).choices
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()


def test_child_sees_no_client_credentials(tmp_path: Path, made: list[Llmd]) -> None:
    """The child does not receive Authorization, Proxy-Authorization, Cookie, X-Forwarded-* or
    the headers a client named in Connection; ordinary headers pass through."""
    log = tmp_path / "headers.jsonl"
    d = make_llmd(
        tmp_path,
        sections={"proxy": {"api_keys": [ADMIN]}},
        sim_env={"OLLAMA_SIM_HEADER_LOG": str(log)},
    )
    made.append(d)
    d.start()
    log.write_text("")
    conn = http.client.HTTPConnection("127.0.0.1", d.proxy_port, timeout=60)
    for path in ("/api/version", "/api/tags", "/api/generate"):
        body = json.dumps(GEN).encode() if path == "/api/generate" else None
        conn.request(
            "POST" if body else "GET",
            path,
            body=body,
            headers={
                "Authorization": f"Bearer {ADMIN}",
                "Proxy-Authorization": "Basic c2VjcmV0",
                "Cookie": "session=secret",
                "Connection": "keep-alive, X-Hop-Secret",
                "X-Hop-Secret": "secret",
                "X-Forwarded-For": "10.0.0.1",
                "Forwarded": "for=10.0.0.1",
                "X-Custom": "kept",
                "User-Agent": "probe/1.0",
            },
        )
        r = conn.getresponse()
        r.read()
        assert r.status == 200, path
    conn.close()
    seen = [json.loads(x) for x in log.read_text().splitlines()]
    ours = [x for x in seen if ["User-Agent", "probe/1.0"] in x["headers"]]
    # /api/tags is llmd's own merged answer: only the other two reach the child.
    assert {x["path"] for x in ours} == {"/api/version", "/api/generate"}
    for x in seen:
        names = {k.lower(): v for k, v in x["headers"]}
        leaked = set(names) & {
            "authorization",
            "proxy-authorization",
            "cookie",
            "x-hop-secret",
            "x-forwarded-for",
            "forwarded",
        }
        assert not leaked, (x["path"], leaked)
        assert not any(ADMIN in v for v in names.values())
    for x in ours:
        assert ["X-Custom", "kept"] in x["headers"]
