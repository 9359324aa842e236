"""Ollama's native API (server/routes.go): generate, chat, embed, models and pulls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from . import VERSION, textgen
from .catalog import show_parameters
from .durations import go_time, parse_keep_alive_json
from .httputil import (
    ApiError,
    NdjsonStream,
    StreamAborted,
    error_response,
    field,
    json_response,
    read_json,
)
from .inference import Engine, Session, num_predict
from .store import Installed, parse_name

# Simulated registry bandwidth for pulls (bytes/s at OLLAMA_SIM_SPEED=1).
PULL_BYTES_PER_S = 200e6
PULL_STEPS = 4


def _now() -> str:
    return go_time(utc=True)


def _keep_alive(body: dict[str, Any]) -> float | None:
    try:
        return parse_keep_alive_json(body.get("keep_alive"))
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _options(body: dict[str, Any], go_type: str) -> dict[str, Any]:
    opts = field(body, "options", (dict,), go_type, "map[string]interface {}")
    return opts or {}


def _stream(body: dict[str, Any]) -> bool:
    """Native endpoints stream unless "stream": false."""
    return body.get("stream") is not False


def _stream_error(e: StreamAborted | ApiError) -> str:
    if isinstance(e, ApiError):
        return e.message
    return "an error was encountered while running the model: simulated failure (OLLAMA_SIM_FAULTS)"


class NativeApi:
    """Handlers for /, /api/*."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.store = engine.store
        self.sched = engine.sched
        self.creates = 0

    def routes(self) -> list[web.RouteDef]:
        """The native routes."""
        return [
            web.get("/", self.root),
            web.get("/api/version", self.version),
            web.get("/api/tags", self.tags),
            web.get("/api/ps", self.ps, allow_head=False),
            web.post("/api/show", self.show),
            web.post("/api/pull", self.pull),
            web.post("/api/copy", self.copy),
            web.post("/api/create", self.create),
            web.delete("/api/delete", self.delete),
            web.post("/api/generate", self.generate),
            web.post("/api/chat", self.chat),
            web.post("/api/embed", self.embed),
            web.post("/api/embeddings", self.embeddings),
        ]

    # -- general -------------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        """GET/HEAD /: the health check."""
        return web.Response(text="Ollama is running", content_type="text/plain", charset="utf-8")

    async def version(self, request: web.Request) -> web.Response:
        """GET/HEAD /api/version."""
        return json_response({"version": VERSION})

    def tag_entry(self, m: Installed) -> dict[str, Any]:
        """One /api/tags model."""
        return {
            "name": m.display,
            "model": m.display,
            "modified_at": go_time(m.modified_ns),
            "size": m.spec.size,
            "digest": m.digest,
            "details": m.spec.details(),
            "capabilities": m.spec.caps,
        }

    async def tags(self, request: web.Request) -> web.Response:
        """GET/HEAD /api/tags: installed models, newest first."""
        return json_response({"models": [self.tag_entry(m) for m in self.store.list()]})

    async def ps(self, request: web.Request) -> web.Response:
        """GET /api/ps: loaded models, latest expiry first."""
        return json_response({"models": self.sched.ps()})

    # -- model management ----------------------------------------------------------------------

    async def show(self, request: web.Request) -> web.Response:
        """POST /api/show."""
        body = await read_json(request, "api.ShowRequest")
        model = field(body, "model", (str,), "api.ShowRequest", "string") or field(
            body, "name", (str,), "api.ShowRequest", "string"
        )
        if not model:
            raise ApiError(400, "model is required")
        name = parse_name(model)
        if name is None:
            raise ApiError(400, "invalid model name")
        m = self.store.get(name)
        if m is None:
            raise ApiError(404, f"model '{model}' not found")
        return json_response(self.show_body(m))

    def show_body(self, m: Installed) -> dict[str, Any]:
        """The /api/show object for an installed model."""
        spec = m.spec
        return {
            "license": "",
            "modelfile": spec.modelfile(m.display, m.parameters),
            "parameters": show_parameters(m.parameters),
            "template": spec.template,
            "details": {**spec.details(), "parent_model": m.parent},
            "model_info": spec.model_info(),
            "capabilities": spec.caps,
            "modified_at": go_time(m.modified_ns),
        }

    async def pull(self, request: web.Request) -> web.StreamResponse:
        """POST /api/pull: only catalog models can be pulled."""
        body = await read_json(request, "api.PullRequest")
        model = field(body, "model", (str,), "api.PullRequest", "string") or field(
            body, "name", (str,), "api.PullRequest", "string"
        )
        name = parse_name(model or "")
        if name is None:
            raise ApiError(400, "invalid model name")
        spec = self.store.catalog_spec(name)
        speed = self.settings.speed
        if not _stream(body):
            if spec is None:
                return error_response(500, "pull model manifest: file does not exist")
            await asyncio.sleep(spec.size / PULL_BYTES_PER_S / speed)
            self.store.write(name, spec)
            return json_response({"status": "success"})
        out = NdjsonStream(request)
        await out.start()
        await out.send({"status": "pulling manifest"})
        if spec is None:
            await out.send({"error": "pull model manifest: file does not exist"})
            return await out.finish()
        digest = "sha256:" + spec.blob_digest
        status = f"pulling {spec.blob_digest[:12]}"
        for step in range(PULL_STEPS + 1):
            done = spec.size * step // PULL_STEPS
            await out.send(
                {"status": status, "digest": digest, "total": spec.size, "completed": done}
            )
            if step < PULL_STEPS:
                await asyncio.sleep(spec.size / PULL_BYTES_PER_S / speed / PULL_STEPS)
        await out.send({"status": "verifying sha256 digest"})
        await out.send({"status": "writing manifest"})
        self.store.write(name, spec)
        await out.send({"status": "success"})
        return await out.finish()

    async def copy(self, request: web.Request) -> web.Response:
        """POST /api/copy: the copy shares the source's manifest (same digest)."""
        body = await read_json(request, "api.CopyRequest")
        source = field(body, "source", (str,), "api.CopyRequest", "string") or ""
        dest = field(body, "destination", (str,), "api.CopyRequest", "string") or ""
        src = parse_name(source)
        if src is None:
            raise ApiError(400, f'source "{source}" is invalid')
        dst = parse_name(dest)
        if dst is None:
            raise ApiError(400, f'destination "{dest}" is invalid')
        m = self.store.get(src)
        if m is None:
            raise ApiError(404, f'model "{source}" not found')
        self.store.copy(m, dst)
        return web.Response(status=200)

    async def create(self, request: web.Request) -> web.StreamResponse:
        """POST /api/create from an installed model (`from`), with `parameters` over its own:
        a new manifest (and digest) over the same model blob (server/create.go CreateHandler).
        Creating from files, adapters or with quantization is not simulated."""
        gt = "api.CreateRequest"
        body = await read_json(request, gt)
        model = field(body, "model", (str,), gt, "string") or field(
            body, "name", (str,), gt, "string"
        )
        name = parse_name(model or "")
        if name is None:
            raise ApiError(400, "invalid model name")
        existing = self.store.get(name)
        if existing is not None:
            name = existing.name  # getExistingName: the installed name's case wins
        source = field(body, "from", (str,), gt, "string") or ""
        params = field(body, "parameters", (dict,), gt, "map[string]interface {}")
        if not source:
            raise ApiError(400, "neither 'from' or 'files' was specified")
        src = parse_name(source)
        if src is None:
            raise ApiError(400, "invalid model name")
        self.creates += 1
        base = self.store.get(src)
        if base is None and self.store.catalog_spec(src) is None:
            # parseFromModel pulls a missing source first; the registry has no such model.
            why = "pull model manifest: file does not exist"
            if body.get("stream") is False:
                return error_response(500, why)
            out = NdjsonStream(request)
            await out.start()
            await out.send({"status": "pulling manifest"})
            await out.send({"error": why})
            return await out.finish()
        if self.settings.faults.fail_create == self.creates:
            # An error before any progress: streamResponse answers it as JSON with its status.
            return error_response(500, "simulated create failure (OLLAMA_SIM_FAULTS fail_create)")
        if base is None:
            spec = self.store.catalog_spec(src)
            assert spec is not None
            self.store.write(src, spec)
            base = self.store.get(src)
            assert base is not None
        merged = {**base.parameters, **(params or {})}
        self.store.write(name, base.spec, merged, parent=base.display)
        statuses = [f"using existing layer sha256:{base.spec.blob_digest}"]
        created = self.store.get(name)
        if created is not None and merged:
            statuses.append(f"creating new layer sha256:{created.digest}")
        statuses += ["writing manifest", "success"]
        if body.get("stream") is False:
            return json_response({"status": "success"})
        out = NdjsonStream(request)
        await out.start()
        for status in statuses:
            await out.send({"status": status})
        return await out.finish()

    async def delete(self, request: web.Request) -> web.Response:
        """DELETE /api/delete: 200 with an empty body."""
        body = await read_json(request, "api.DeleteRequest")
        model = field(body, "model", (str,), "api.DeleteRequest", "string") or field(
            body, "name", (str,), "api.DeleteRequest", "string"
        )
        name = parse_name(model or "")
        if name is None:
            raise ApiError(400, f'name "{model or ""}" is invalid')
        if not self.store.delete(name):
            raise ApiError(404, f"model '{model}' not found")
        return web.Response(status=200)

    # -- inference -----------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """POST /api/generate."""
        started = time.monotonic()
        gt = "api.GenerateRequest"
        body = await read_json(request, gt)
        model = field(body, "model", (str,), gt, "string") or ""
        prompt = field(body, "prompt", (str,), gt, "string") or ""
        keep_alive = _keep_alive(body)
        options = _options(body, gt)
        # server/routes.go GenerateHandler: an invalid or unknown name is a 404.
        m = self.engine.installed(parse_name(model))
        if m is None:
            raise ApiError(404, f"model '{model}' not found")
        if prompt == "" and keep_alive == 0:
            self.sched.expire(m)
            return json_response(
                {
                    "model": model,
                    "created_at": _now(),
                    "response": "",
                    "done": True,
                    "done_reason": "unload",
                }
            )
        if "completion" not in m.spec.caps:
            raise ApiError(400, f'"{model}" does not support generate')
        n_predict = num_predict(options)
        session = await self.engine.open(m, options, keep_alive, started)
        try:
            if prompt == "":
                return json_response(
                    {
                        "model": model,
                        "created_at": _now(),
                        "response": "",
                        "done": True,
                        "done_reason": "load",
                    }
                )
            tokens, reason = textgen.reply_tokens(m.display, prompt, n_predict)
            p_count = textgen.count_tokens(prompt)

            def final() -> dict[str, Any]:
                return {
                    "model": model,
                    "created_at": _now(),
                    "response": "",
                    "done": True,
                    "done_reason": reason,
                    "context": textgen.token_ids(prompt + "".join(tokens)),
                    **session.metrics(p_count, len(tokens)),
                }

            if not _stream(body):
                await session.run(tokens, p_count, _noop)
                out = final()
                out["response"] = "".join(tokens)
                return json_response(out)

            stream = NdjsonStream(request, self.settings.faults)
            await stream.start()

            async def emit(tok: str) -> None:
                await stream.send(
                    {"model": model, "created_at": _now(), "response": tok, "done": False}
                )

            try:
                await session.run(tokens, p_count, emit)
                await stream.send(final())
            except StreamAborted as e:
                await stream.send_raw({"error": _stream_error(e)})
            return await stream.finish()
        finally:
            session.close()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /api/chat."""
        started = time.monotonic()
        gt = "api.ChatRequest"
        body = await read_json(request, gt)
        model = field(body, "model", (str,), gt, "string") or ""
        messages = field(body, "messages", (list,), gt, "[]api.Message") or []
        for msg in messages:
            if not isinstance(msg, dict):
                raise ApiError(
                    400, "json: cannot unmarshal value into Go struct field ChatRequest.messages"
                )
            if msg.get("content") is not None and not isinstance(msg.get("content"), str):
                raise ApiError(
                    400,
                    "json: cannot unmarshal value into Go struct field Message.messages.content "
                    "of type string",
                )
        keep_alive = _keep_alive(body)
        options = _options(body, gt)
        name = parse_name(model)
        if name is None:
            raise ApiError(400, "model is required")
        m = self.engine.installed(name)
        if m is None:
            raise ApiError(404, f"model '{model}' not found")
        if not messages and keep_alive == 0:
            self.sched.expire(m)
            return json_response(
                {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": "unload",
                }
            )
        if "completion" not in m.spec.caps:
            raise ApiError(400, f'"{model}" does not support chat')
        n_predict = num_predict(options)
        session = await self.engine.open(m, options, keep_alive, started)
        try:
            if not messages:
                return json_response(
                    {
                        "model": model,
                        "created_at": _now(),
                        "message": {"role": "assistant", "content": ""},
                        "done": True,
                        "done_reason": "load",
                    }
                )
            tokens, reason = textgen.reply_tokens(
                m.display, textgen.chat_prompt(messages), n_predict
            )
            p_count = textgen.chat_prompt_tokens(messages)

            def final(content: str) -> dict[str, Any]:
                return {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": content},
                    "done": True,
                    "done_reason": reason,
                    **session.metrics(p_count, len(tokens)),
                }

            if not _stream(body):
                await session.run(tokens, p_count, _noop)
                return json_response(final("".join(tokens)))

            stream = NdjsonStream(request, self.settings.faults)
            await stream.start()

            async def emit(tok: str) -> None:
                await stream.send(
                    {
                        "model": model,
                        "created_at": _now(),
                        "message": {"role": "assistant", "content": tok},
                        "done": False,
                    }
                )

            try:
                await session.run(tokens, p_count, emit)
                await stream.send(final(""))
            except StreamAborted as e:
                await stream.send_raw({"error": _stream_error(e)})
            return await stream.finish()
        finally:
            session.close()

    async def embed(self, request: web.Request) -> web.Response:
        """POST /api/embed: normalised vectors for one or many inputs."""
        started = time.monotonic()
        gt = "api.EmbedRequest"
        body = await read_json(request, gt)
        model = field(body, "model", (str,), gt, "string") or ""
        inputs = embed_inputs(body.get("input"))
        keep_alive = _keep_alive(body)
        options = _options(body, gt)
        dims = field(body, "dimensions", (int,), gt, "int") or 0
        m = await self._schedulable(model)
        session = await self.engine.open(m, options, keep_alive, started)
        try:
            if not inputs:
                return json_response({"model": model, "embeddings": []})
            count = sum(textgen.count_tokens(s) for s in inputs)
            await session.embed_delay(count)
            vectors = [embed_vector(m, s, dims) for s in inputs]
            metrics = session.metrics(count, 0)
            return json_response(
                {
                    "model": model,
                    "embeddings": vectors,
                    "total_duration": metrics["total_duration"],
                    "load_duration": metrics["load_duration"],
                    "prompt_eval_count": count,
                }
            )
        finally:
            session.close()

    async def embeddings(self, request: web.Request) -> web.Response:
        """POST /api/embeddings (legacy): one vector for `prompt`."""
        started = time.monotonic()
        gt = "api.EmbeddingRequest"
        body = await read_json(request, gt)
        model = field(body, "model", (str,), gt, "string") or ""
        prompt = field(body, "prompt", (str,), gt, "string") or ""
        keep_alive = _keep_alive(body)
        options = _options(body, gt)
        m = await self._schedulable(model)
        session: Session = await self.engine.open(m, options, keep_alive, started)
        try:
            if not prompt:
                return json_response({"embedding": []})
            await session.embed_delay(textgen.count_tokens(prompt))
            return json_response({"embedding": embed_vector(m, prompt, 0)})
        finally:
            session.close()

    async def _schedulable(self, model: str) -> Installed:
        """Embed paths: errors come from scheduleRunner / handleScheduleError."""
        name = parse_name(model)
        if name is None:
            raise ApiError(400, "model is required")
        m = self.engine.installed(name)
        if m is None:
            raise ApiError(404, f'model "{model}" not found, try pulling it first')
        return m


async def _noop(_tok: str) -> None:
    return None


def embed_inputs(value: Any) -> list[str]:
    """/api/embed `input`: a string or a list of strings (else 400 invalid input type)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ApiError(400, "invalid input type")


def embed_vector(m: Installed, text: str, dims: int) -> list[float]:
    """The model's deterministic embedding, optionally truncated to `dims` and renormalised."""
    vec = textgen.embedding(m.display, text, m.spec.embedding_length)
    if 0 < dims < len(vec):
        cut = vec[:dims]
        norm = sum(v * v for v in cut) ** 0.5 or 1.0
        vec = [v / norm for v in cut]
    return vec
