"""The child API client against a small stand-in server: typed answers and errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from llmdproc import free_port

from llmd import childapi
from llmd.childapi import ChildAPI, ChildAPIError, Pulled, Runner


class Stub:
    """An Ollama stand-in whose answers a test sets; it records the POST bodies."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, Any]] = {}
        self.posted: list[tuple[str, dict[str, Any]]] = []
        self.delay = 0.0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            self.posted.append((request.path, await request.json()))
        await asyncio.sleep(self.delay)
        status, body = self.answers.get(request.path, (404, {"error": "not found"}))
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)


@pytest.fixture
async def served() -> AsyncIterator[tuple[ChildAPI, Stub]]:
    stub = Stub()
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", stub.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with aiohttp.ClientSession() as session:
        yield ChildAPI(session, f"http://127.0.0.1:{port}"), stub
    await runner.cleanup()


async def test_ps_and_tags_are_typed(served: tuple[ChildAPI, Stub]) -> None:
    """/api/ps and /api/tags entries come back as Runner and Pulled, odd fields as defaults."""
    api, stub = served
    stub.answers["/api/ps"] = (
        200,
        {
            "models": [
                {"name": "a:1b", "digest": "d1", "size": 10, "size_vram": 7},
                {"name": "b:1b", "size": "junk"},
                "not an object",
            ]
        },
    )
    stub.answers["/api/tags"] = (
        200,
        {
            "models": [
                {
                    "name": "a:1b",
                    "digest": "d1",
                    "size": 5,
                    "details": {"parameter_size": "1B", "quantization_level": "Q4_K_M"},
                },
                {"name": "c:1b", "details": "odd"},
            ]
        },
    )
    assert await api.ps() == [Runner("a:1b", "d1", 10, 7), Runner("b:1b", None, 0, 0)]
    assert await api.tags() == [
        Pulled("a:1b", "d1", 5, "1B", "Q4_K_M"),
        Pulled("c:1b", None, 0, None, None),
    ]


@pytest.mark.parametrize(
    ("answer", "status", "message"),
    [
        pytest.param((500, {"error": "boom"}), 500, "500 Internal Server Error (GET /api/ps)"),
        pytest.param((200, [1, 2]), None, "not a JSON object (GET /api/ps)"),
        pytest.param((200, "{not json"), None, "(GET /api/ps)"),
    ],
)
async def test_a_bad_answer_is_one_error(
    served: tuple[ChildAPI, Stub], answer: tuple[int, Any], status: int | None, message: str
) -> None:
    """An error status, a non-object or unparseable body raise ChildAPIError naming the path."""
    api, stub = served
    stub.answers["/api/ps"] = answer
    with pytest.raises(ChildAPIError) as e:
        await api.ps()
    assert e.value.status == status and not e.value.timed_out
    assert message in e.value.message


async def test_a_slow_child_times_out(
    served: tuple[ChildAPI, Stub], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child slower than the list timeout raises ChildAPIError marked timed_out."""
    api, stub = served
    monkeypatch.setattr(childapi, "LIST_TIMEOUT_S", 0.1)
    stub.answers["/api/tags"] = (200, {"models": []})
    stub.delay = 1.0
    with pytest.raises(ChildAPIError) as e:
        await api.tags()
    assert e.value.timed_out and e.value.status is None


async def test_a_dead_child_is_an_error_without_status() -> None:
    """Nobody listening: ChildAPIError with no status; alive() says False."""
    async with aiohttp.ClientSession() as session:
        api = ChildAPI(session, f"http://127.0.0.1:{free_port()}")
        with pytest.raises(ChildAPIError) as e:
            await api.load("a:1b", {}, embedding=False)
        assert e.value.status is None and "(POST /api/generate)" in e.value.message
        assert not await api.alive(1.0)


async def test_load_falls_back_to_embed_for_an_embedding_model(
    served: tuple[ChildAPI, Stub],
) -> None:
    """A model that refuses generate is loaded with an empty embed, runner options kept."""
    api, stub = served
    stub.answers["/api/generate"] = (400, {"error": '"e:1" does not support generate'})
    stub.answers["/api/embed"] = (200, {"embeddings": []})
    assert await api.load("e:1", {"num_ctx": 8192}, embedding=False) is True
    assert stub.posted == [
        ("/api/generate", {"model": "e:1", "keep_alive": -1, "options": {"num_ctx": 8192}}),
        (
            "/api/embed",
            {"model": "e:1", "keep_alive": -1, "options": {"num_ctx": 8192}, "input": []},
        ),
    ]
    # Known to be an embedding model: straight to embed next time.
    stub.posted.clear()
    assert await api.load("e:1", {}, embedding=True) is True
    assert [p for p, _ in stub.posted] == ["/api/embed"]


async def test_a_refused_load_carries_the_childs_status_and_words(
    served: tuple[ChildAPI, Stub],
) -> None:
    """A load the child refuses raises with its status and its error message."""
    api, stub = served
    stub.answers["/api/generate"] = (500, {"error": "model requires more system memory"})
    with pytest.raises(ChildAPIError) as e:
        await api.load("a:1b", {}, embedding=False)
    assert (e.value.status, e.value.message) == (500, "model requires more system memory")


async def test_unload_tolerates_an_error_answer(served: tuple[ChildAPI, Stub]) -> None:
    """Unloading a model the child does not know is not an error: nothing is loaded."""
    api, stub = served
    stub.answers["/api/generate"] = (404, {"error": "model 'x' not found"})
    await api.unload("x")
    assert stub.posted == [("/api/generate", {"model": "x", "keep_alive": 0})]


async def test_show_and_version(served: tuple[ChildAPI, Stub]) -> None:
    """show() gives the document, or {} when the child has none; version() the version."""
    api, stub = served
    stub.answers["/api/version"] = (200, {"version": "0.12.0"})
    stub.answers["/api/show"] = (200, {"model_info": {"general.parameter_count": 1}})
    assert await api.version() == "0.12.0"
    assert await api.show("a:1b") == {"model_info": {"general.parameter_count": 1}}
    stub.answers["/api/show"] = (404, {"error": "not found"})
    assert await api.show("b:1b") == {}


async def test_create_sends_source_and_parameters(served: tuple[ChildAPI, Stub]) -> None:
    """create() posts one non-streamed /api/create from the source with the parameters; a
    refusal raises with the child's status and words."""
    api, stub = served
    stub.answers["/api/create"] = (200, {"status": "success"})
    await api.create("ns/a:1b-x", "a:1b", {"num_ctx": 8192})
    assert stub.posted == [
        (
            "/api/create",
            {
                "model": "ns/a:1b-x",
                "from": "a:1b",
                "parameters": {"num_ctx": 8192},
                "stream": False,
            },
        )
    ]
    stub.answers["/api/create"] = (500, {"error": "no space left on device"})
    with pytest.raises(ChildAPIError) as e:
        await api.create("ns/a:1b-x", "a:1b", {"num_ctx": 8192})
    assert (e.value.status, e.value.message) == (500, "no space left on device")


async def test_delete_tolerates_a_model_already_gone(served: tuple[ChildAPI, Stub]) -> None:
    """delete() of a model the child does not have is no error; another failure is."""
    api, stub = served
    stub.answers["/api/delete"] = (404, {"error": "model 'x' not found"})
    await api.delete("x")
    stub.answers["/api/delete"] = (500, {"error": "disk"})
    with pytest.raises(ChildAPIError) as e:
        await api.delete("x")
    assert e.value.status == 500
