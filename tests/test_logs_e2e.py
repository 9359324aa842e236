"""Request ids and JSON logs end to end: a real llmd, the simulator, plain HTTP."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from llmdproc import Llmd

from llmd import logs

TINY = "tiny:1m"
Factory = Callable[..., Llmd]


def generate(d: Llmd, headers: dict[str, str], **body: Any) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps({"model": TINY, "prompt": "hi", "stream": False, **body}).encode()
    req = urllib.request.Request(
        d.url + "/api/generate", data=data, headers={"Content-Type": "application/json", **headers}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, dict(r.headers), r.read()


def events(d: Llmd) -> list[dict[str, Any]]:
    return list(json.loads(d.llmctl("events", "--json").stdout)["events"])


def test_a_request_id_is_kept_or_made_answered_and_carried_into_logs_and_events(
    daemon: Factory,
) -> None:
    d = daemon().start()
    status, headers, _ = generate(d, {"X-Request-Id": "client-req-42"})
    assert status == 200 and headers["X-Request-Id"] == "client-req-42"
    # The load it caused: its log lines and its event carry the id.
    log = d.logs()
    assert re.search(r"loaded tiny:1m on b0 in .* \[req client-req-42\]$", log, re.M), log
    load = next(e for e in events(d) if e["kind"] == "load")
    assert load["request_id"] == "client-req-42"
    # Without one, or with one that is not a sane token, llmd makes its own.
    _, h1, _ = generate(d, {})
    _, h2, _ = generate(d, {"X-Request-Id": "has spaces and\ttabs"})
    _, h3, _ = generate(d, {}, stream=True)  # a streamed answer has it too
    for h in (h1, h2, h3):
        assert re.fullmatch(r"[0-9a-f]{16}", h["X-Request-Id"]), h
    assert len({h1["X-Request-Id"], h2["X-Request-Id"], h3["X-Request-Id"]}) == 3
    # llmd's own pages too.
    with urllib.request.urlopen(d.url + "/api/tags", timeout=10) as r:
        assert re.fullmatch(r"[0-9a-f]{16}", r.headers["X-Request-Id"])


def test_json_logs_are_one_object_per_line_with_the_request_id(daemon: Factory) -> None:
    d = daemon(sections={"daemon": {"log_format": "json"}}).start()
    generate(d, {"X-Request-Id": "json-req-1"})
    lines = [ln for ln in d.logs().splitlines() if ln.strip()]
    docs = [json.loads(ln) for ln in lines]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(doc) for doc in docs)
    loaded = [doc for doc in docs if doc["message"].startswith("loaded tiny:1m on b0")]
    assert len(loaded) == 1 and loaded[0]["request_id"] == "json-req-1"
    assert loaded[0]["level"] == "INFO" and loaded[0]["logger"] == "llmd.lifecycle"
    assert not any(doc.get("request_id") for doc in docs if "ready" in doc["message"])


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("abc-123", True),
        ("0f8fad5b-d9cb-469f-a165-70867728950e", True),
        ("trace:span/1+2=3", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("two words", False),
        ("new\nline", False),
        ("ünïcode", False),
        (None, False),
    ],
)
def test_new_id_keeps_a_sane_token_only(incoming: str | None, kept: bool) -> None:
    rid = logs.new_id(incoming)
    assert (rid == incoming) is kept
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{16}", rid)
