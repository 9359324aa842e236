"""Derived models (llmd/derived.py): their names, the rewriting of answers, and making each one
once per backend, base digest and runner options."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any, cast

import pytest

from llmd.childapi import ChildAPIError
from llmd.derived import RETRY_S, Derived, Rewrite, derived_name, is_derived, visible
from llmd.process import Child

# types/model/name.go isValidPart: namespace without dots, model and tag with; 1-80 characters.
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$")
PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")


@pytest.mark.parametrize(
    ("base", "runner", "prefix"),
    [
        ("tiny:1m", {"num_ctx": 8192}, "llmd-derived/tiny:1m-"),
        ("llama3.2", {"num_ctx": 8192}, "llmd-derived/llama3.2:latest-"),
        ("Qwen2.5:7B", {"num_gpu": 20, "use_mmap": False}, "llmd-derived/qwen2.5:7b-"),
        ("hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M", {"num_ctx": 4096}, "llmd-derived/llama-3.2"),
        ("user/model:" + "t" * 80, {"num_batch": 256}, "llmd-derived/model:" + "t" * 71 + "-"),
    ],
)
def test_derived_names_are_valid_ollama_names(
    base: str, runner: dict[str, int | bool], prefix: str
) -> None:
    """A derived name is `llmd-derived/<model>:<tag>-<8 hex>`, lower case, and every part is
    valid as Ollama checks names (a long tag is cut to leave room for the hash)."""
    name = derived_name(base, runner)
    assert name.startswith(prefix) and name == name.lower()
    namespace, rest = name.split("/")
    model, tag = rest.split(":")
    assert NAMESPACE_RE.match(namespace) and PART_RE.match(model) and PART_RE.match(tag)
    assert re.fullmatch(r".*-[0-9a-f]{8}", tag)
    assert is_derived(name)


def test_derived_names_differ_by_base_and_options_only() -> None:
    """The name depends on the base's full name and the runner options, not on their order
    or the name's case; another namespace's model of the same name gets another name."""
    a = derived_name("tiny:1m", {"num_ctx": 8192, "num_batch": 256})
    assert a == derived_name("Tiny:1M", {"num_batch": 256, "num_ctx": 8192})
    assert a != derived_name("tiny:1m", {"num_ctx": 4096, "num_batch": 256})
    assert a != derived_name("someone/tiny:1m", {"num_ctx": 8192, "num_batch": 256})


@pytest.mark.parametrize(
    ("name", "derived"),
    [
        ("llmd-derived/tiny:1m-0123abcd", True),
        ("LLMD-DERIVED/tiny:1m-0123abcd", True),
        ("registry.ollama.ai/llmd-derived/tiny:1m-0123abcd", True),
        ("tiny:1m", False),
        ("llmd-derived:latest", False),
        ("someone/llmd-derived:1", False),
        ("", False),
    ],
)
def test_is_derived(name: str, derived: bool) -> None:
    """Derived models are the names in the llmd-derived namespace, on any host."""
    assert is_derived(name) is derived


def test_visible_leaves_derived_models_out() -> None:
    """A child's list without llmd's derived models (and untouched otherwise)."""
    entries = [{"name": "a:1"}, {"name": "llmd-derived/a:1-0123abcd"}, {"id": "b:1"}, 7]
    assert visible(entries, "name") == [{"name": "a:1"}, {"id": "b:1"}, 7]


DERIVED = "llmd-derived/tiny:1m-0123abcd"
SSE = (
    b'data: {"id":"chatcmpl-1","model":"llmd-derived/tiny:1m-0123abcd","choices":[]}\n\n'
    b'data: {"id":"chatcmpl-1","model":"llmd-derived/tiny:1m-0123abcd","choices":[{"delta":'
    b'{"content":"llmd"}}]}\n\ndata: [DONE]\n\n'
)


@pytest.mark.parametrize(
    ("answer", "shown"),
    [
        pytest.param(SSE, "tiny:1m", id="sse"),
        pytest.param(
            b'{"object":"list","data":[{"embedding":[0.1]}],"model":"llmd-derived/tiny:1m-0123abcd"}',
            "tiny:1m",
            id="json",
        ),
        pytest.param(
            b"event: response.created\n"
            b'data: {"response":{"model":"llmd-derived/tiny:1m-0123abcd"}}',
            "tiny:1m",
            id="nested",
        ),
        pytest.param(
            b'{"error":{"message":"model \'llmd-derived/tiny:1m-0123abcd\' not found"}}',
            "tiny:1m",
            id="error",
        ),
        pytest.param(b'"llmd-derived/tiny:1m-0123abc"', "tiny:1m", id="not-quite"),
        pytest.param(b"llmd-derived/tiny:1m-0123abcdllmd-derived/tiny:1m-0123abcd", "x", id="two"),
        pytest.param(b"llmd-llmd-derived/tiny:1m-0123abcd", "x", id="overlap"),
        pytest.param(b'"model":"llmd-derived/tiny:1m-0123abcd"', 'we"ird', id="escaped"),
        pytest.param(b"data: llmd-der", "x", id="cut-prefix-at-end"),
    ],
)
def test_rewrite_at_every_chunk_boundary(answer: bytes, shown: str) -> None:
    """The derived name is replaced by the name as sent (escaped for a JSON string) however
    the answer is cut into chunks, and what is not the name goes through unchanged."""
    put = json.dumps(shown)[1:-1].encode()
    want = answer.replace(DERIVED.encode(), put)
    for cut in range(len(answer) + 1):
        r = Rewrite(DERIVED, shown)
        got = r.feed(answer[:cut]) + r.feed(answer[cut:]) + r.flush()
        assert got == want, cut
    r = Rewrite(DERIVED, shown)
    assert b"".join(r.feed(answer[i : i + 1]) for i in range(len(answer))) + r.flush() == want


@pytest.mark.parametrize(
    ("chunk", "out", "held"),
    [
        (b'data: {"a":1}\n\n', b'data: {"a":1}\n\n', 0),  # an event's end never waits
        (b'{"model":"llmd-deri', b'{"model":"', 9),  # the start of the name waits
        (b'{"model":"tiny:1m"}', b'{"model":"tiny:1m"}', 0),
        (b"sell", b"se", 2),  # "ll" could start it
    ],
)
def test_rewrite_holds_back_only_a_possible_start(chunk: bytes, out: bytes, held: int) -> None:
    """A chunk goes out at once but for an end that could be the start of the name."""
    r = Rewrite(DERIVED, "tiny:1m")
    assert r.feed(chunk) == out
    assert len(r.flush()) == held


class FakeAPI:
    """A child's API as far as Derived uses it: create (counted, may fail), show, ps."""

    def __init__(self) -> None:
        self.created: list[tuple[str, str, dict[str, Any]]] = []
        self.fail = False
        self.gate: asyncio.Event | None = None
        self.parents: dict[str, str] = {}
        self.runners: list[dict[str, Any]] = []
        self.installed: list[str] = []
        self.format = "gguf"
        self.deleted: list[str] = []

    async def create(self, name: str, source: str, parameters: dict[str, Any]) -> None:
        self.created.append((name, source, parameters))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ChildAPIError("simulated create failure", 500)

    async def show(self, name: str) -> dict[str, Any]:
        return {"details": {"parent_model": self.parents.get(name, ""), "format": self.format}}

    async def tags(self) -> list[Any]:
        from llmd.childapi import Pulled

        return [Pulled.from_json({"name": n}) for n in self.installed]

    async def delete(self, name: str) -> None:
        self.deleted.append(name)

    async def ps(self) -> list[Any]:
        from llmd.childapi import Runner

        return [Runner.from_json(e) for e in self.runners]


class Rig:
    def __init__(self) -> None:
        self.api = FakeAPI()
        self.child = cast(Child, SimpleNamespace(name="b0", api=self.api))
        self.now = 0.0
        self.digests = {"tiny:1m": "d1"}
        self.tasks: list[asyncio.Task[None]] = []

        def start_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
            task = asyncio.get_running_loop().create_task(coro, name=name)
            self.tasks.append(task)
            return task

        self.derived = Derived(
            start_task, lambda model, backend: self.digests.get(model), lambda: self.now
        )


RUNNER = {"num_ctx": 8192}


async def test_concurrent_requests_share_one_creation() -> None:
    """Requests arriving while the derived model is being made wait for that one creation;
    one whose caller goes away does not cancel it for the others."""
    rig = Rig()
    rig.api.gate = asyncio.Event()
    d = rig.derived
    first = asyncio.get_running_loop().create_task(d.ensure(rig.child, "tiny:1m", RUNNER))
    others = [
        asyncio.get_running_loop().create_task(d.ensure(rig.child, "tiny:1m", RUNNER))
        for _ in range(4)
    ]
    await asyncio.sleep(0)
    first.cancel()
    assert d.ready("b0", "tiny:1m", RUNNER) is None
    rig.api.gate.set()
    assert await asyncio.gather(*others) == [True] * 4
    name = derived_name("tiny:1m", RUNNER)
    assert rig.api.created == [(name, "tiny:1m", RUNNER)]
    assert d.ready("b0", "tiny:1m", RUNNER) == name
    assert await d.ensure(rig.child, "tiny:1m", RUNNER) is True
    assert len(rig.api.created) == 1


async def test_made_again_for_a_new_digest_or_other_options_or_when_gone() -> None:
    """A re-pulled base (another digest) gets its derived model made again under the same
    name; other runner options make another; one gone from the child (forget) is made again."""
    rig = Rig()
    d = rig.derived
    assert await d.ensure(rig.child, "tiny:1m", RUNNER)
    rig.digests["tiny:1m"] = "d2"
    assert d.ready("b0", "tiny:1m", RUNNER) is None
    assert await d.ensure(rig.child, "tiny:1m", RUNNER)
    assert await d.ensure(rig.child, "tiny:1m", {"num_ctx": 4096})
    name = derived_name("tiny:1m", RUNNER)
    d.forget("b0", name)
    assert d.ready("b0", "tiny:1m", RUNNER) is None
    assert d.ready("b0", "tiny:1m", {"num_ctx": 4096}) is not None
    assert await d.ensure(rig.child, "tiny:1m", RUNNER)
    assert [c[0] for c in rig.api.created] == [
        name,
        name,
        derived_name("tiny:1m", {"num_ctx": 4096}),
        name,
    ]


async def test_failed_creation_is_logged_once_and_tried_again_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed create: not ready (requests go as they came), one warning, no new attempt
    until RETRY_S have passed; then a success makes it ready."""
    rig = Rig()
    rig.api.fail = True
    d = rig.derived
    with caplog.at_level(logging.DEBUG, logger="llmd.derived"):
        assert await d.ensure(rig.child, "tiny:1m", RUNNER) is False
        assert await d.ensure(rig.child, "tiny:1m", RUNNER) is False
        assert len(rig.api.created) == 1
        rig.now += RETRY_S
        assert await d.ensure(rig.child, "tiny:1m", RUNNER) is False
        assert len(rig.api.created) == 2
        rig.api.fail = False
        rig.now += RETRY_S
        assert await d.ensure(rig.child, "tiny:1m", RUNNER) is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "simulated create failure" in warnings[0].getMessage()
    assert d.ready("b0", "tiny:1m", RUNNER) == derived_name("tiny:1m", RUNNER)


async def test_runners_under_a_derived_name_count_as_the_base() -> None:
    """A /api/ps entry under a derived name is shown under its base's name and digest: one
    llmd made, or one the child's /api/show names the parent of (made before a restart); one
    whose base is unknown is left out of what clients see but kept for the lifecycle."""
    rig = Rig()
    d = rig.derived
    await d.ensure(rig.child, "tiny:1m", RUNNER)
    made = derived_name("tiny:1m", RUNNER)
    older = "llmd-derived/tiny:1m-ffffffff"
    unknown = "llmd-derived/ghost:1-00000000"
    rig.api.parents[older] = "tiny:1m"
    entries = [
        {"name": made, "model": made, "digest": "x", "size": 1},
        {"name": older, "model": older, "digest": "y", "size": 2},
        {"name": unknown, "model": unknown, "digest": "z", "size": 3},
        {"name": "other:1", "model": "other:1", "digest": "o", "size": 4},
    ]
    shown = await d.as_base(rig.child, entries)
    assert [(e["name"], e["model"], e["digest"], e["size"]) for e in shown] == [
        ("tiny:1m", "tiny:1m", "d1", 1),
        ("tiny:1m", "tiny:1m", "d1", 2),
        ("other:1", "other:1", "o", 4),
    ]
    rig.api.runners = entries
    rig.api.parents[unknown] = ""
    assert [r.name for r in await d.runners(rig.child)] == [
        "tiny:1m",
        "tiny:1m",
        unknown,
        "other:1",
    ]


async def test_deleting_a_base_deletes_its_derived_models() -> None:
    """drop_base deletes the derived models of a deleted base: those llmd made and those the
    child's /api/show names it the parent of; others stay, and the base's is made anew."""
    rig = Rig()
    d = rig.derived
    await d.ensure(rig.child, "tiny:1m", RUNNER)
    made = derived_name("tiny:1m", RUNNER)
    older, other = "llmd-derived/tiny:1m-ffffffff", "llmd-derived/tiny:2m-eeeeeeee"
    rig.api.parents.update({older: "Tiny:1m", other: "tiny:2m"})
    rig.api.installed = ["tiny:2m", made, older, other]
    d.drop_base(rig.child, "tiny:1m")
    await asyncio.gather(*rig.tasks)
    assert sorted(rig.api.deleted) == sorted([made, older])
    assert d.ready("b0", "tiny:1m", RUNNER) is None


async def test_no_derived_model_for_a_model_without_a_gguf_file(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A model whose /api/show format is not gguf (safetensors) gets no derived model: Ollama
    keys its runner by digest, so a derived one would load a second copy."""
    rig = Rig()
    rig.api.format = "safetensors"
    with caplog.at_level(logging.WARNING, logger="llmd.derived"):
        assert await rig.derived.ensure(rig.child, "tiny:1m", RUNNER) is False
    assert rig.api.created == []
    assert "not a GGUF model" in caplog.text
