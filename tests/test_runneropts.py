"""Fitting a request's runner options to the loaded runner's (llmd/runneropts.py)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fakes import Rig, make_config, rig

from llmd.runneropts import fit, ollama_defaults, runner_subset


@pytest.mark.parametrize(
    ("options", "runner", "sent", "overridden", "asked_ctx"),
    [
        # Nothing asked, nothing loaded: the body keeps having no options field.
        (None, {}, None, (), None),
        ({}, {}, {}, (), None),
        # Sampling options pass untouched.
        (
            {"temperature": 0.2, "num_predict": 5},
            {},
            {"temperature": 0.2, "num_predict": 5},
            (),
            None,
        ),
        # The same value is no override; a float is read as Go reads it, truncated to int.
        ({"num_ctx": 2048}, {"num_ctx": 2048}, {"num_ctx": 2048}, (), 2048),
        ({"num_ctx": 2048.9}, {"num_ctx": 2048}, {"num_ctx": 2048}, (), 2048),
        # Another value is replaced, and counted.
        ({"num_ctx": 8192}, {"num_ctx": 2048}, {"num_ctx": 2048}, ("num_ctx",), 8192),
        (
            {"num_ctx": 8192, "temperature": 0, "seed": 1},
            {"num_ctx": 2048},
            {"temperature": 0, "seed": 1, "num_ctx": 2048},
            ("num_ctx",),
            8192,
        ),
        # A runner option the load did not set is dropped (Ollama's default then applies).
        ({"num_batch": 256, "top_k": 3}, {}, {"top_k": 3}, ("num_batch",), None),
        # One the client left out is filled in, without counting as an override.
        (None, {"num_ctx": 8192}, {"num_ctx": 8192}, (), None),
        ({"temperature": 1}, {"num_ctx": 8192}, {"temperature": 1, "num_ctx": 8192}, (), None),
        # null is "not set", as Go decodes it.
        ({"num_ctx": None}, {}, {}, (), None),
        ({"num_ctx": None}, {"num_ctx": 4096}, {"num_ctx": 4096}, (), None),
        # Every runner option, ints and the bool.
        (
            {"num_gpu": 0, "main_gpu": 1, "use_mmap": False, "num_thread": 4, "num_batch": 512},
            {"num_gpu": 99, "main_gpu": 1, "use_mmap": True, "num_thread": 4},
            {"num_gpu": 99, "main_gpu": 1, "use_mmap": True, "num_thread": 4},
            ("num_batch", "num_gpu", "use_mmap"),
            None,
        ),
    ],
)
def test_fit(
    options: dict[str, Any] | None,
    runner: dict[str, int | bool],
    sent: dict[str, Any] | None,
    overridden: tuple[str, ...],
    asked_ctx: int | None,
) -> None:
    """A request is sent with exactly the runner's runner options and its own sampling options;
    the runner options it set to other values are named."""
    before = None if options is None else dict(options)
    f = fit(options, runner)
    assert f.options == sent
    assert f.overridden == overridden
    assert f.asked_ctx == asked_ctx
    assert options == before  # the request's own dict is not changed


@pytest.mark.parametrize(
    ("options", "subset"),
    [
        (None, {}),
        ({"temperature": 0.5}, {}),
        ({"num_ctx": 4096.0, "use_mmap": True, "stop": ["x"]}, {"num_ctx": 4096, "use_mmap": True}),
        ({"num_ctx": None, "num_gpu": 0}, {"num_gpu": 0}),
    ],
)
def test_runner_subset(options: dict[str, Any] | None, subset: dict[str, int | bool]) -> None:
    """The runner options of a request, as Ollama reads them; sampling options are not."""
    assert runner_subset(options) == subset


# -- the lifecycle's use of it: which runner options a request is sent with, and loads with ----

MODEL = "a:1b"


async def send(
    r: Rig, options: dict[str, Any] | None, *, native: bool = True
) -> dict[str, Any] | None:
    """One request through fit_options and a lease, as the proxy sends it; the options sent."""
    body: dict[str, Any] = {"model": MODEL}
    if options is not None:
        body["options"] = options
    load_with = r.lc.fit_options(MODEL, r.child, body, native=native)
    async with r.lc.lease(MODEL, r.child, load_with):
        pass
    return body.get("options")


async def test_the_first_load_decides_until_the_model_unloads() -> None:
    """Without configured options the first load's runner options stand while the model is
    loaded: a request asking others is sent with the loaded ones (counted); once unloaded, the
    next request's options decide the next load."""
    async with rig(make_config()) as r:
        r.add(MODEL, 2)
        assert await send(r, {"num_ctx": 2048}) == {"num_ctx": 2048}
        sent = await send(r, {"num_ctx": 8192, "temperature": 0})
        assert sent == {"temperature": 0, "num_ctx": 2048}
        assert await send(r, None) == {"num_ctx": 2048}  # filled in, not counted
        m = r.lc.models[MODEL]
        assert (m.options_overridden, m.runner_options) == (1, {"num_ctx": 2048})
        await r.lc.unload(MODEL, reason="test")
        assert await send(r, {"num_ctx": 8192}) == {"num_ctx": 8192}
        assert r.api.load_options == [(MODEL, {"num_ctx": 2048}), (MODEL, {"num_ctx": 8192})]
        assert m.options_overridden == 1


async def test_configured_options_decide_every_load_and_request() -> None:
    """With `options` configured, every load uses them and every native request is sent with
    them, whatever it asked; sampling options pass."""
    cfg = make_config([{"name": MODEL, "options": {"num_ctx": 8192, "num_batch": 256}}])
    async with rig(cfg) as r:
        r.add(MODEL, 2)
        sent = await send(r, {"num_ctx": 2048, "top_k": 5})
        assert sent == {"top_k": 5, "num_ctx": 8192, "num_batch": 256}
        assert await send(r, {"num_ctx": 8192, "num_batch": 256}) == {
            "num_ctx": 8192,
            "num_batch": 256,
        }
        assert r.api.load_options == [(MODEL, {"num_ctx": 8192, "num_batch": 256})]
        assert r.lc.models[MODEL].options_overridden == 1


async def test_reload_on_options_leaves_requests_as_ollama_takes_them() -> None:
    """`reload_on_options = true`: requests keep their runner options (the child reloads)."""
    async with rig(make_config([{"name": MODEL, "reload_on_options": True}])) as r:
        r.add(MODEL, 2)
        assert await send(r, {"num_ctx": 2048}) == {"num_ctx": 2048}
        assert await send(r, {"num_ctx": 8192}) == {"num_ctx": 8192}
        m = r.lc.models[MODEL]
        assert (m.options_overridden, m.runner_options) == (0, {"num_ctx": 8192})


async def test_v1_requests_are_not_rewritten_and_load_as_configured() -> None:
    """A /v1 request keeps its body (it has no options for Ollama); a load it causes uses the
    configured options; options in a /v1 body never reach a load."""
    cfg = make_config([{"name": MODEL, "options": {"num_ctx": 8192}}])
    async with rig(cfg) as r:
        r.add(MODEL, 2)
        assert await send(r, {"num_ctx": 2048}, native=False) == {"num_ctx": 2048}
        assert r.api.load_options == [(MODEL, {"num_ctx": 8192})]
        # Ollama reloads it with its defaults for /v1 requests: llmd's record then says so.
        assert await send(r, None, native=False) is None
        assert r.api.load_options == [(MODEL, {"num_ctx": 8192})]
        assert r.lc.models[MODEL].runner_options == {}
        assert r.lc.models[MODEL].options_overridden == 0
    async with rig(make_config()) as r:
        r.add(MODEL, 2)
        await send(r, {"num_ctx": 2048}, native=False)
        assert r.api.load_options == [(MODEL, {})]


async def test_a_larger_num_ctx_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A client asking more context than the model has is logged once, at info."""
    caplog.set_level(logging.INFO, "llmd.lifecycle")
    async with rig(make_config([{"name": MODEL, "options": {"num_ctx": 4096}}])) as r:
        r.add(MODEL, 2)
        for ctx in (8192, 16384, 2048, 8192):
            await send(r, {"num_ctx": ctx})
        said = [rec for rec in caplog.records if "asked for num_ctx" in rec.getMessage()]
        assert [rec.levelno for rec in said] == [logging.INFO]
        assert "num_ctx 8192" in said[0].getMessage() and "4096" in said[0].getMessage()
        assert r.lc.models[MODEL].options_overridden == 4


@pytest.mark.parametrize(
    ("env", "defaults"),
    [
        ({}, {}),
        ({"OLLAMA_CONTEXT_LENGTH": "8192"}, {"num_ctx": 8192}),
        ({"OLLAMA_CONTEXT_LENGTH": " 2048 "}, {"num_ctx": 2048}),
        ({"OLLAMA_CONTEXT_LENGTH": "0"}, {}),  # 0: Ollama's automatic context
        ({"OLLAMA_CONTEXT_LENGTH": "8k"}, {}),
    ],
)
def test_ollama_defaults(env: dict[str, str], defaults: dict[str, int]) -> None:
    """The runner options a child gives a request without options (every /v1 request)."""
    assert ollama_defaults(env) == defaults
