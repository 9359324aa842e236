"""Tests for llmd.forward's pure parts: the tail of an answer and the counters read from it."""

from __future__ import annotations

import json

import pytest

from llmd.forward import TAIL_BYTES, Tail, _counters

DONE = {
    "model": "m",
    "done": True,
    "load_duration": 1500000000,
    "prompt_eval_count": 12,
    "eval_count": 34,
}


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([], b""),
        ([b"abc"], b"abc"),
        ([b"a" * 10, b"b" * 10], b"a" * 10 + b"b" * 10),
        # Many small chunks: the last TAIL_BYTES of them, whatever the joins in between.
        ([bytes([65 + i % 26]) * 100 for i in range(200)], None),
        # One chunk larger than the tail, then small ones.
        ([b"x" * (3 * TAIL_BYTES), b"y" * 10], b"x" * (TAIL_BYTES - 10) + b"y" * 10),
    ],
)
def test_the_tail_is_the_last_tail_bytes_of_the_answer(
    chunks: list[bytes], expected: bytes | None
) -> None:
    tail = Tail()
    for c in chunks:
        tail.add(c)
    whole = b"".join(chunks)
    assert tail.bytes() == (expected if expected is not None else whole[-TAIL_BYTES:])
    assert tail.bytes() == whole[-TAIL_BYTES:]


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (b"", {}),
        # Native: the final done record (prompt_eval_count is not eval_count).
        (
            json.dumps(DONE).encode(),
            {"load_duration": 1500000000, "prompt_eval_count": 12, "eval_count": 34},
        ),
        # A stream: earlier lines' counts (none in Ollama's, but say a client's echo) lose to
        # the last record's.
        (
            b'{"eval_count": 1}\n' + json.dumps(DONE).encode() + b"\n",
            {"load_duration": 1500000000, "prompt_eval_count": 12, "eval_count": 34},
        ),
        # /v1: usage, with spaces as Python's json writes them.
        (
            b'data: {"usage": {"prompt_tokens": 5, "completion_tokens": 7}}\n\ndata: [DONE]\n\n',
            {"prompt_tokens": 5, "completion_tokens": 7},
        ),
        # Cut mid-UTF-8 and mid-record: what is whole still counts.
        (b'\xe2\x82{"x": "\xe2\x82\xac", "eval_count":9, "prompt_eval_c', {"eval_count": 9}),
    ],
)
def test_counters_come_from_the_last_record(tail: bytes, expected: dict[str, int]) -> None:
    assert _counters(tail) == expected


async def test_the_child_session_keeps_no_cookies_and_leaves_bodies_encoded() -> None:
    """A child's Set-Cookie (to one client) is not sent with the next request (another
    client's), and a gzip answer reaches the client as the child wrote it, with its
    Content-Length true. (llmd's children are at 127.0.0.1, where aiohttp's default jar keeps
    no cookies anyway; at a host name, as here, it would.)"""
    import gzip

    from aiohttp import web

    from llmd.forward import child_session

    seen: list[str | None] = []
    packed = gzip.compress(b'{"ok":true}')

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        return web.Response(
            body=packed,
            headers={"Set-Cookie": "session=secret", "Content-Encoding": "gzip"},
        )

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with child_session() as s:
            for _ in range(2):
                async with s.get(f"http://localhost:{port}/") as r:  # a name: jars keep its cookies
                    assert await r.read() == packed
                    assert r.content_length == len(packed)
        assert seen == [None, None]
    finally:
        await runner.cleanup()
