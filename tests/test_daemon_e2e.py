"""End to end: the real llmd subprocess, simulator children on PATH as `ollama`, real clients."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

import ollama
import openai
import psutil
import pytest
from llmdproc import Factory, Llmd, parse_metrics, pid_alive, pull, series, wait_for

TINY = "tiny:1m"
TINY2 = "tiny:2m"
EMBED = "tiny-embed:1m"


def post(url: str, body: Any, *, raw: bytes | None = None, timeout: float = 30) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def child_ps(d: Llmd, backend: int = 0) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in d.get("/api/ps", backend=backend)["models"]}


def test_status_json_has_the_documented_fields(daemon: Factory) -> None:
    """`llmctl status --json` carries version, backends[], models[] and gpu."""
    d = daemon(models=[{"name": TINY, "priority": 2, "aliases": ["small"]}]).start()
    st = d.status()
    assert st["version"] == "0.1.0"
    [b] = st["backends"]
    assert b["name"] == "b0" and b["state"] == "running" and b["port"] == d.backend_ports[0]
    assert pid_alive(b["pid"]) and b["restarts"] == 0
    m = next(m for m in st["models"] if m["name"] == TINY)
    assert {
        "name",
        "backend",
        "state",
        "priority",
        "pinned",
        "keep_alive_s",
        "in_flight",
        "size_vram",
    } <= m.keys()
    assert (m["backend"], m["state"], m["priority"], m["pinned"]) == ("b0", "unloaded", 2, False)
    assert m["keep_alive_s"] == 600
    assert "gpu" in st
    human = d.llmctl("status")
    assert human.returncode == 0 and "b0" in human.stdout and "running" in human.stdout


def test_official_ollama_client_through_proxy(daemon: Factory) -> None:
    """The ollama client works unchanged through llmd: generate, chat, embed, ps, show, pull."""
    d = daemon().start()
    with (
        closing(ollama.Client(host=d.backend_url(0))) as direct,
        closing(ollama.Client(host=d.url)) as c,
    ):
        ollama_session(c, direct)


def ollama_session(c: ollama.Client, direct: ollama.Client) -> None:
    assert c.pull("phi3:mini").status == "success"
    names = {m.model for m in c.list().models}
    assert {TINY, "phi3:mini"} <= names
    r = c.generate(model=TINY, prompt="why is the sky blue?", options={"num_predict": 8})
    assert r.done and r.response
    # Same answer as the child gives directly: llmd does not touch the body.
    assert (
        r.response
        == direct.generate(
            model=TINY, prompt="why is the sky blue?", options={"num_predict": 8}
        ).response
    )
    parts = list(
        c.generate(model=TINY, prompt="stream me", stream=True, options={"num_predict": 6})
    )
    assert len(parts) == 7 and parts[-1].done and parts[-1].done_reason
    chat = c.chat(model=TINY, messages=[{"role": "user", "content": "hi"}])
    assert chat.message.role == "assistant" and chat.message.content
    streamed = list(c.chat(model=TINY, messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(p.message.content for p in streamed) == chat.message.content
    e = c.embed(model=EMBED, input=["a", "b"])
    assert len(e.embeddings) == 2 and len(e.embeddings[0]) > 0
    ps = {m.model for m in c.ps().models}
    assert {TINY, EMBED} <= ps
    assert c.show(TINY).details.family == "llama"


def test_official_openai_client_through_proxy(daemon: Factory) -> None:
    """The openai client works unchanged against llmd's /v1, streamed and not."""
    d = daemon().start()
    with openai.OpenAI(base_url=d.url + "/v1", api_key="unused") as c:
        openai_session(c)


def openai_session(c: openai.OpenAI) -> None:
    r = c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hello"}])
    assert r.choices[0].message.content
    chunks = list(
        c.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": "hello"}], stream=True
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    emb = c.embeddings.create(model=EMBED, input="hello")
    assert len(emb.data[0].embedding) > 0
    assert TINY in {m.id for m in c.models.list().data}
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_tags_and_ps_are_merged_and_requests_routed_to_owner(daemon: Factory) -> None:
    """Two children: /api/tags and /api/ps list both; each model runs on the child that has it."""
    d = daemon(backends=2).start()
    pull(d, "phi3:mini", backend=1)
    tags = {m["name"] for m in d.get("/api/tags")["models"]}
    assert {TINY, "phi3:mini"} <= tags
    for model in (TINY, "phi3:mini"):
        status, body = post(
            d.url + "/api/generate", {"model": model, "prompt": "x", "stream": False}
        )
        assert status == 200, body
    assert "phi3:mini" in child_ps(d, 1) and "phi3:mini" not in child_ps(d, 0)
    assert TINY in child_ps(d, 0)
    ps = {m["name"] for m in d.get("/api/ps")["models"]}
    assert {TINY, "phi3:mini"} <= ps
    v1 = {m["id"] for m in d.get("/v1/models")["data"]}
    assert {TINY, "phi3:mini"} <= v1


def test_alias_resolves_to_model(daemon: Factory) -> None:
    """A configured alias reaches its model."""
    d = daemon(models=[{"name": TINY, "aliases": ["small"]}]).start()
    status, body = post(d.url + "/api/generate", {"model": "small", "prompt": "x", "stream": False})
    assert status == 200 and body["model"] == TINY
    assert TINY in child_ps(d)


def test_error_shapes(daemon: Factory) -> None:
    """Unknown model 404, oversized body 413 and bad JSON 400, all as Ollama's {"error": ...}."""
    d = daemon(sections={"proxy": {"max_body_size": "1KiB"}}).start()
    status, body = post(d.url + "/api/generate", {"model": "nope", "prompt": "x"})
    assert (status, body) == (404, {"error": "model 'nope' not found"})  # as sent, as Ollama
    status, body = post(
        d.url + "/api/chat", {"model": TINY, "messages": [{"role": "user", "content": "x" * 2000}]}
    )
    assert status == 413 and "max_body_size" in body["error"]
    status, body = post(d.url + "/api/generate", None, raw=b'{"model": ')
    assert (status, body) == (400, {"error": "unexpected EOF"})  # Go's encoding/json
    status, body = post(d.url + "/api/generate", {"prompt": "x"})
    assert (status, body) == (404, {"error": "model '' not found"})  # Ollama's GenerateHandler
    status, body = post(d.url + "/api/generate", {"model": TINY, "keep_alive": "-1"})
    assert status == 400 and "missing unit" in body["error"]
    status, body = post(d.url + "/v1/chat/completions", {"model": "nope", "messages": []})
    assert status == 404 and body["error"]["type"] == "not_found_error"
    # Errors from the child pass through unchanged (embedding model cannot generate).
    status, body = post(d.url + "/api/generate", {"model": EMBED, "prompt": "x"})
    assert status == 400 and "does not support generate" in body["error"]


def test_client_keep_alive_does_not_shorten_llmds(daemon: Factory) -> None:
    """A client's keep_alive is rewritten: the model stays for llmd's keep-alive, not 1s."""
    d = daemon(sections={"keep_alive": {"default": "1h", "policy": "fixed"}}).start()
    status, _ = post(
        d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False, "keep_alive": "1s"}
    )
    assert status == 200
    time.sleep(2.5)
    assert TINY in child_ps(d)
    assert d.model(TINY)["state"] == "loaded"
    # The child itself was told -1 (forever); llmd reports its own unload time in /api/ps.
    assert child_ps(d)[TINY]["expires_at"] > "2200"
    proxied = {m["name"]: m for m in d.get("/api/ps")["models"]}
    assert proxied[TINY]["expires_at"] < "2200"


def test_fixed_keep_alive_expiry_unloads(daemon: Factory) -> None:
    """An idle model past its fixed keep-alive is unloaded from its child."""
    d = daemon(models=[{"name": TINY, "keep_alive": "1s"}]).start()
    status, _ = post(d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False})
    assert status == 200
    assert TINY in child_ps(d)
    wait_for(lambda: TINY not in child_ps(d), timeout=10, what="keep-alive unload")
    assert d.model(TINY)["state"] == "unloaded"
    events = json.loads(d.llmctl("events", "--json").stdout)["events"]
    assert any(
        e["kind"] == "unload" and e["model"] == TINY and "keep-alive" in e["reason"] for e in events
    )


def test_client_unload_is_honoured(daemon: Factory) -> None:
    """`keep_alive: 0` with an empty prompt (what `ollama stop` sends) unloads the model."""
    d = daemon().start()
    post(d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False})
    assert TINY in child_ps(d)
    status, body = post(d.url + "/api/generate", {"model": TINY, "keep_alive": 0})
    assert status == 200 and body["done_reason"] == "unload"
    wait_for(lambda: TINY not in child_ps(d), what="unload")


def test_concurrent_cold_requests_share_one_load(daemon: Factory) -> None:
    """Several requests for a cold model cause one load, and all succeed."""
    d = daemon().start()
    results: list[int] = []

    def go() -> None:
        results.append(
            post(d.url + "/api/generate", {"model": TINY2, "prompt": "x", "stream": False})[0]
        )

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    assert d.model(TINY2)["loads"] == 1


def test_killed_child_is_restarted_and_serves_again(daemon: Factory) -> None:
    """A child killed with -9 is restarted; the next request succeeds."""
    d = daemon().start()
    [pid] = d.child_pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: (
            d.status()["backends"][0]["restarts"] >= 1
            and d.status()["backends"][0]["state"] == "running"
        ),
        timeout=20,
        what="restart",
    )
    assert d.child_pids() != [pid]
    status, _ = post(d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False})
    assert status == 200


def test_sigterm_lets_stream_finish_and_leaves_no_child(daemon: Factory) -> None:
    """SIGTERM with a stream in flight: the stream completes, llmd exits 0, no child remains."""
    # 20 tokens/s: the stream lasts most of a second.
    d = daemon(sim_env={"OLLAMA_SIM_SPEED": "0.1"}).start()
    status, _ = post(d.url + "/api/generate", {"model": TINY, "prompt": "", "stream": False})
    assert status == 200  # loaded
    kids = d.descendants()
    assert kids
    req = urllib.request.Request(
        d.url + "/api/generate",
        data=json.dumps({"model": TINY, "prompt": "long", "options": {"num_predict": 40}}).encode(),
    )
    lines: list[dict[str, Any]] = []
    with urllib.request.urlopen(req, timeout=60) as r:
        lines.append(json.loads(r.readline()))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        term_at = time.monotonic()
        for line in r:
            lines.append(json.loads(line))
        ended_after_term = time.monotonic() - term_at
    assert lines[-1]["done"] is True and len(lines) > 5
    assert ended_after_term > 0.1  # the stream really was still running at SIGTERM
    assert d.proc.wait(30) == 0
    for k in kids:
        assert not pid_alive(k.pid)


def test_second_llmd_on_the_same_config_leaves_the_first_alone(daemon: Factory) -> None:
    """A second llmd started by mistake fails to bind and stops none of the first one's children."""
    d = daemon().start()
    pids = d.child_pids()
    second = dataclasses.replace(d, proc=None).start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(30) == 1
    assert "already in use" in second.logs()
    assert all(pid_alive(p) for p in pids)
    assert d.status()["backends"][0]["state"] == "running"
    assert d.child_pids() == pids  # not restarted either


def test_kill9_of_llmd_leaves_no_child(daemon: Factory) -> None:
    """Children die with llmd even when it is killed with SIGKILL."""
    d = daemon(backends=2).start()
    kids = d.descendants()
    assert len(kids) >= 2
    assert d.proc is not None
    d.proc.kill()
    d.proc.wait()
    for k in kids:
        wait_for(lambda k=k: not pid_alive(k.pid), timeout=10, what=f"child {k.pid} to die")


def test_stale_child_of_earlier_llmd_is_stopped(daemon: Factory) -> None:
    """A child left on a backend port by an earlier llmd is stopped before the new one starts."""
    d = daemon()
    env = dict(
        d.env,
        OLLAMA_HOST=f"127.0.0.1:{d.backend_ports[0]}",
        LLMD_BACKEND=f"{d.socket}:b0",
        OLLAMA_MODELS=str(d.workdir / "stale-models"),
    )
    stale = subprocess.Popen(
        ["ollama", "serve"], env=env, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{d.backend_ports[0]}/"), what="stale up")
        d.start()
        assert stale.wait(10) is not None
        [pid] = d.child_pids()
        assert pid != stale.pid
    finally:
        if stale.poll() is None:
            stale.kill()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def test_reload_keeps_unchanged_backend(daemon: Factory) -> None:
    """SIGHUP applies a diff: an unchanged backend keeps its PID; a changed one restarts."""
    d = daemon(backends=2).start()
    before = {b["name"]: b["pid"] for b in d.status()["backends"]}
    d.arrays["backend"][1]["env"]["OLLAMA_NUM_PARALLEL"] = "2"
    d.write_config()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (
            {b["name"]: b["pid"] for b in d.status()["backends"]}["b1"] not in (None, before["b1"])
        ),
        timeout=20,
        what="b1 restarted",
    )
    after = {b["name"]: b["pid"] for b in d.status()["backends"]}
    assert after["b0"] == before["b0"]
    # An invalid config is refused and the running one kept.
    d.config_path.write_text('[proxy]\nlisten = "bad"\n')
    r = d.llmctl("reload")
    assert r.returncode == 1 and "proxy.listen" in r.stderr
    assert {b["name"]: b["pid"] for b in d.status()["backends"]}["b0"] == before["b0"]


def test_llmctl_exit_codes(daemon: Factory, tmp_path: Path) -> None:
    """llmctl exits 0 ok, 1 daemon error, 2 usage, 3 unreachable, with what to do."""
    d = daemon().start()
    assert d.llmctl("status").returncode == 0
    r = d.llmctl("load", "no-such-model")
    assert r.returncode == 1 and "not found" in r.stderr
    assert d.llmctl("frobnicate").returncode == 2
    assert d.llmctl().returncode == 2
    r = subprocess.run(
        [*__import__("llmdproc").llmctl_argv(), "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 3
    assert "is it running? try: systemctl status llmd" in r.stderr
    r = d.llmctl("load", TINY)
    assert r.returncode == 0 and "loaded" in r.stdout
    assert d.llmctl("unload", TINY).returncode == 0
    wait_for(lambda: TINY not in child_ps(d), what="unload")
    assert d.llmctl("restart", "nope").returncode == 1


def test_stream_is_not_buffered(daemon: Factory) -> None:
    """Chunks arrive through llmd as the child sends them: spread over time, not at the end."""
    d = daemon(sim_env={"OLLAMA_SIM_SPEED": "0.1"}).start()
    post(d.url + "/api/generate", {"model": TINY, "prompt": "", "stream": False})

    def arrivals(base: str) -> list[float]:
        req = urllib.request.Request(
            base + "/api/generate",
            data=json.dumps(
                {"model": TINY, "prompt": "pace", "options": {"num_predict": 10}}
            ).encode(),
        )
        t0 = time.monotonic()
        out = []
        with urllib.request.urlopen(req, timeout=60) as r:
            for _ in r:
                out.append(time.monotonic() - t0)
        return out

    direct = arrivals(d.backend_url(0))
    proxied = arrivals(d.url)
    assert len(proxied) == len(direct) >= 5
    spread_direct = direct[-2] - direct[0]
    spread_proxied = proxied[-2] - proxied[0]
    assert spread_direct > 0.2
    # Buffering would squeeze all chunks to the end; allow generous noise either way.
    assert spread_proxied > 0.6 * spread_direct
    assert proxied[0] < proxied[-1] * 0.5


def test_preload_loads_at_startup(daemon: Factory) -> None:
    """`preload = true` models are loaded once the backend is ready."""
    d = daemon(models=[{"name": TINY, "preload": True}]).start()
    wait_for(lambda: TINY in child_ps(d), what="preload")
    wait_for(lambda: d.model(TINY)["state"] == "loaded", what="state loaded")


def test_unload_outside_llmd_is_reconciled(daemon: Factory) -> None:
    """A model unloaded directly on the child is seen as unloaded by llmd."""
    d = daemon().start()
    post(d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False})
    assert d.model(TINY)["state"] == "loaded"
    post(d.backend_url(0) + "/api/generate", {"model": TINY, "keep_alive": 0})
    wait_for(lambda: d.model(TINY)["state"] == "unloaded", timeout=15, what="reconcile")


def test_missing_ollama_binary_is_reported(daemon: Factory) -> None:
    """A backend whose command is not installed is FATAL with a message saying what to do."""
    d = daemon(backend_extra=[{"command": ["ollama-not-installed", "serve"]}]).start()
    b = d.status()["backends"][0]
    assert b["state"] == "fatal"
    assert b["error"] == (
        "ollama-not-installed not found on PATH: install Ollama or set backend.command"
    )
    status, body = post(d.url + "/api/generate", {"model": TINY, "prompt": "x"})
    assert status == 404
    assert body["error"] == (
        f"model '{TINY}' not found (backend 'b0' is fatal, so its models are unknown)"
    )


def test_model_on_a_backend_still_starting_waits_for_it_then_404(daemon: Factory) -> None:
    """Until every backend has listed its models, a request for a model not found yet waits for
    the backend that may have it (no premature 404), then gets 404 once it is listed; `llmctl
    load` meanwhile says that backend may have it."""
    d = daemon(backends=2, backend_extra=[{}, {"env": {"OLLAMA_SIM_FAULTS": "slow_start=4"}}])
    d.start(wait=False)

    def states() -> list[str]:
        r = d.llmctl("status", "--json")  # fails until the admin socket is up
        return [b["state"] for b in json.loads(r.stdout)["backends"]] if r.returncode == 0 else []

    wait_for(lambda: states() == ["running", "starting"], what="b0 running while b1 starts")
    r = d.llmctl("load", "ghost:1b")
    assert r.returncode == 1 and "backend 'b1' may have it" in r.stderr
    status, body = post(d.url + "/api/generate", {"model": "ghost:1b", "prompt": "x"})
    assert states() == ["running", "running"]  # answered only once b1 was up
    assert (status, body["error"]) == (404, "model 'ghost:1b' not found")
    d.wait_ready()
    status, body = post(d.url + "/api/generate", {"model": "ghost:1b", "prompt": "x"})
    assert (status, body["error"]) == (404, "model 'ghost:1b' not found")


def test_children_are_not_left_after_clean_stop(daemon: Factory) -> None:
    """A clean stop takes every child and its process group with it."""
    d = daemon(backends=2).start()
    kids = d.descendants()
    assert d.stop() == 0
    for k in kids:
        assert not pid_alive(k.pid)
    assert not any(
        p.info["cmdline"] and str(d.workdir) in " ".join(p.info["cmdline"])
        for p in psutil.process_iter(["cmdline"])
    )


def test_backend_down_gives_503_with_retry_after(daemon: Factory) -> None:
    """A request for a model whose backend is not running gets 503 and Retry-After."""
    d = daemon(
        models=[{"name": TINY, "backend": "b0"}],
        backend_extra=[{"command": ["ollama-not-installed", "serve"]}],
    ).start()
    req = urllib.request.Request(
        d.url + "/api/generate", data=json.dumps({"model": TINY, "prompt": "x"}).encode()
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 503
    assert int(e.value.headers["Retry-After"]) >= 1
    assert "backend 'b0' is not running" in json.loads(e.value.read())["error"]


def test_admin_socket_is_group_only(daemon: Factory) -> None:
    """The admin socket is mode 0660: owner and group only."""
    d = daemon().start()
    assert d.socket.stat().st_mode & 0o777 == 0o660


def test_client_disconnect_cancels_upstream(daemon: Factory) -> None:
    """A client that goes away mid-stream releases the model at once, not when the child ends."""
    d = daemon(sim_env={"OLLAMA_SIM_SPEED": "0.05"}).start()  # 10 tokens/s
    post(d.url + "/api/generate", {"model": TINY, "prompt": "", "stream": False})
    req = urllib.request.Request(
        d.url + "/api/generate",
        data=json.dumps({"model": TINY, "prompt": "slow", "options": {"num_predict": 50}}).encode(),
    )
    r = urllib.request.urlopen(req, timeout=30)
    r.readline()
    assert d.model(TINY)["in_flight"] == 1
    r.close()
    # The full answer would take seconds more; the lease ends as soon as llmd notices.
    wait_for(lambda: d.model(TINY)["in_flight"] == 0, timeout=1.5, what="in_flight 0")


def test_systemd_notifications(daemon: Factory) -> None:
    """READY=1 and STATUS once serving, WATCHDOG=1 pings, RELOADING=1 on SIGHUP, STOPPING=1."""
    import socket as so

    path = Path(tempfile.mkdtemp(prefix="llmd-n-", dir="/tmp")) / "notify.sock"
    sock = so.socket(so.AF_UNIX, so.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.1)
    got: list[str] = []
    done = threading.Event()

    def reader() -> None:  # like systemd, read every message as it comes
        while not done.is_set():
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        d = daemon()
        d.env.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000")
        d.start()
        wait_for(lambda: any("READY=1" in m for m in got), what="READY=1")
        ready = next(m for m in got if "READY=1" in m)
        assert "STATUS=1/1 backends running" in ready
        wait_for(lambda: sum("WATCHDOG=1" in m for m in got) >= 3, what="watchdog pings")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any("RELOADING=1" in m for m in got), what="RELOADING=1")
        reload_at = next(i for i, m in enumerate(got) if "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in got[reload_at]
        wait_for(lambda: any("READY=1" in m for m in got[reload_at + 1 :]), what="READY again")
        d.stop()
        wait_for(lambda: any("STOPPING=1" in m for m in got), what="STOPPING=1")
    finally:
        done.set()
        t.join()
        sock.close()
        shutil.rmtree(path.parent, ignore_errors=True)


def test_metrics_are_per_model_prometheus(daemon: Factory) -> None:
    """/metrics on the proxy port counts requests, cold starts and loads per model."""
    d = daemon().start()
    for _ in range(2):
        assert (
            post(d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False})[0] == 200
        )
    with urllib.request.urlopen(d.url + "/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        s = parse_metrics(r.read().decode())
    assert s[series("llmd_requests_total", model=TINY, endpoint="/api/generate", status="200")] == 2
    assert s[series("llmd_cold_starts_total", model=TINY)] == 1
    assert s[series("llmd_model_events_total", event="load", model=TINY)] == 1
    assert s[series("llmd_model_loaded", model=TINY, backend="b0")] == 1
    assert s[series("llmd_request_duration_seconds_count", model=TINY)] == 2
    assert s[series("llmd_backend_up", backend="b0")] == 1
    assert series("llmd_gpu_memory_total_bytes", gpu="0") in s


def test_runtime_pin_survives_restart(daemon: Factory) -> None:
    """`llmctl pin` persists in the store: after a restart the model is still pinned."""
    d = daemon().start()
    assert d.llmctl("pin", TINY).returncode == 0
    m = d.model(TINY)
    assert m["pinned"] and m["keep_alive_source"] == "pinned" and m["keep_alive_s"] is None
    assert d.stop() == 0
    d.start()
    assert d.model(TINY)["pinned"]
    assert d.llmctl("unpin", TINY).returncode == 0
    assert not d.model(TINY)["pinned"]


def test_unwritable_store_degrades_but_keeps_serving(daemon: Factory, tmp_path: Path) -> None:
    """A database llmd cannot open never stops the proxy: status shows the store degraded."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    d = daemon(sections={"daemon": {"state_dir": str(blocker / "state")}}).start()
    status, _ = post(d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False})
    assert status == 200
    st = d.status()
    assert st["store"]["degraded"]
    assert "DEGRADED" in d.llmctl("status").stdout


def test_corrupt_database_is_moved_aside(daemon: Factory) -> None:
    """A corrupt llmd.db is set aside and a fresh one started; llmd serves as usual."""
    d = daemon()
    state = Path(d.sections["daemon"]["state_dir"])
    state.mkdir(parents=True)
    (state / "llmd.db").write_bytes(b"this is not a database" * 100)
    d.start()
    assert post(d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False})[0] == 200
    assert list(state.glob("llmd.db.corrupt-*"))
    assert d.status()["store"]["degraded"] is None


def test_root_and_head_answer_like_ollama(daemon: Factory) -> None:
    """GET / and HEAD / answer as Ollama does, for clients' health checks."""
    d = daemon().start()
    with urllib.request.urlopen(d.url + "/", timeout=10) as r:
        assert r.read() == b"Ollama is running"
    req = urllib.request.Request(d.url + "/", method="HEAD")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    assert d.get("/api/version")["version"]


def test_api_keys_are_required_when_configured(daemon: Factory) -> None:
    """With proxy.api_keys set, requests need `Authorization: Bearer KEY`; health checks don't."""
    d = daemon(sections={"proxy": {"api_keys": ["s3cret-key-1", "s3cret-key-2"]}}).start()
    status, body = post(d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False})
    assert status == 401 and "proxy.api_keys" in body["error"]
    with urllib.request.urlopen(d.url + "/", timeout=10) as r:
        assert r.status == 200
    with openai.OpenAI(base_url=d.url + "/v1", api_key="s3cret-key-2") as c:
        r = c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
    with (
        openai.OpenAI(base_url=d.url + "/v1", api_key="wrong-key-123") as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.models.list()
    with closing(ollama.Client(host=d.url, headers={"Authorization": "Bearer s3cret-key-1"})) as o:
        assert TINY in {m.model for m in o.list().models}


def test_port_held_by_ollama_says_what_to_do(daemon: Factory, tmp_path: Path) -> None:
    """If Ollama itself holds the proxy port, llmd exits saying how to make room for it."""
    from simproc import start_sim

    d = daemon()
    (tmp_path / "ollama-service").mkdir()
    with start_sim(tmp_path / "ollama-service", port=d.proxy_port):
        d.start(wait=False)
        assert d.proc is not None
        assert d.proc.wait(30) == 1
    assert "held by ollama" in d.logs()
    assert "systemctl disable --now ollama" in d.logs()
