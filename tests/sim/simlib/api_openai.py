"""The OpenAI-compatible layer (/v1/*, middleware/openai.go + openai/openai.go)."""

from __future__ import annotations

import random
import time
from typing import Any

from aiohttp import web

from . import textgen
from .api_native import NativeApi, embed_vector
from .httputil import ApiError, SseStream, StreamAborted, field, json_response, read_json
from .inference import Session
from .store import Installed, parse_name

FINGERPRINT = "fp_ollama"


def openai_error(status: int, message: str) -> web.Response:
    """openai.NewError: the type follows the status code."""
    etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return json_response(
        {"error": {"message": message, "type": etype, "param": None, "code": None}}, status
    )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise ApiError(400, "invalid message format")
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, "invalid message format")
                parts.append(part["text"])
            elif part.get("type") != "image_url":
                raise ApiError(400, "invalid message format")
        return "".join(parts)
    if content is None:
        return ""
    raise ApiError(400, f"invalid message content type: {type(content).__name__}")


class OpenAiApi:
    """Handlers for /v1/*; they reuse the native engine with the OpenAI request and reply shapes."""

    def __init__(self, native: NativeApi) -> None:
        self.native = native
        self.engine = native.engine
        self.settings = native.settings
        self.store = native.store
        self.sched = native.sched

    def routes(self) -> list[web.RouteDef]:
        """The /v1 routes."""
        return [
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.post("/v1/embeddings", self.embeddings),
            web.get("/v1/models", self.models, allow_head=False),
            web.get("/v1/models/{model:.+}", self.model, allow_head=False),
        ]

    def _installed(self, model: str, *, chat: bool) -> Installed:
        name = parse_name(model)
        if name is None:
            if chat:
                raise ApiError(400, "model is required")
            raise ApiError(404, f"model '{model}' not found")
        m = self.engine.installed(name)
        if m is None:
            raise ApiError(404, f"model '{model}' not found")
        return m

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        started = time.monotonic()
        gt = "openai.ChatCompletionRequest"
        body = await read_json(request, gt)
        model = field(body, "model", (str,), gt, "string") or ""
        messages = field(body, "messages", (list,), gt, "[]openai.Message") or []
        if not messages:
            raise ApiError(400, "[] is too short - 'messages'")
        flat: list[dict[str, object]] = []
        for msg in messages:
            if not isinstance(msg, dict):
                raise ApiError(400, "invalid message format")
            flat.append({"role": msg.get("role", ""), "content": _message_text(msg.get("content"))})
        max_tokens = field(body, "max_tokens", (int,), gt, "int")
        stream = bool(field(body, "stream", (bool,), gt, "bool"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        m = self._installed(model, chat=True)
        if "completion" not in m.spec.caps:
            raise ApiError(400, f'"{model}" does not support chat')
        session = await self.engine.open(m, {}, None, started)
        try:
            tokens, reason = textgen.reply_tokens(m.display, textgen.chat_prompt(flat), max_tokens)
            p_count = textgen.chat_prompt_tokens(flat)
            cid = f"chatcmpl-{random.randrange(999)}"
            if not stream:
                await session.run(tokens, p_count, _noop)
                return json_response(
                    {
                        "id": cid,
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": model,
                        "system_fingerprint": FINGERPRINT,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "".join(tokens)},
                                "finish_reason": reason,
                            }
                        ],
                        "usage": _usage(p_count, len(tokens)),
                    }
                )
            return await self._chat_stream(
                request, session, model, cid, tokens, reason, p_count, include_usage
            )
        finally:
            session.close()

    async def _chat_stream(
        self,
        request: web.Request,
        session: Session,
        model: str,
        cid: str,
        tokens: list[str],
        reason: str,
        p_count: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        # v0.32.6+: role only in the first chunk, `created` pinned, a separate finish chunk,
        # then an optional usage chunk, then [DONE] (research/ollama-facts.md section 5).
        out = SseStream(request, self.settings.faults)
        await out.start()
        created = int(time.time())
        first = [True]

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            if first[0]:
                delta = {"role": "assistant", **delta}
                first[0] = False
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        async def emit(tok: str) -> None:
            await out.send(chunk({"content": tok}, None))

        try:
            await session.run(tokens, p_count, emit)
            await out.send(chunk({}, reason))
            if include_usage:
                await out.send(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "system_fingerprint": FINGERPRINT,
                        "choices": [],
                        "usage": _usage(p_count, len(tokens)),
                    }
                )
            await out.done()
        except StreamAborted:
            # A native error after streaming started becomes an empty content chunk; no [DONE].
            await out.send_raw(chunk({"content": ""}, None))
        return await out.finish()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        started = time.monotonic()
        gt = "openai.CompletionRequest"
        body = await read_json(request, gt)
        model = field(body, "model", (str,), gt, "string") or ""
        prompt = field(body, "prompt", (str,), gt, "string") or ""
        max_tokens = field(body, "max_tokens", (int,), gt, "int")
        stream = bool(field(body, "stream", (bool,), gt, "bool"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        m = self._installed(model, chat=False)
        if "completion" not in m.spec.caps:
            raise ApiError(400, f'"{model}" does not support generate')
        session = await self.engine.open(m, {}, None, started)
        try:
            if prompt:
                tokens, reason = textgen.reply_tokens(m.display, prompt, max_tokens)
            else:
                tokens, reason = [], "load"
            p_count = textgen.count_tokens(prompt) if prompt else 0
            cid = f"cmpl-{random.randrange(999)}"
            if not stream:
                await session.run(tokens, p_count, _noop)
                return json_response(
                    {
                        "id": cid,
                        "object": "text_completion",
                        "created": int(time.time()),
                        "model": model,
                        "system_fingerprint": FINGERPRINT,
                        "choices": [{"text": "".join(tokens), "index": 0, "finish_reason": reason}],
                        "usage": _usage(p_count, len(tokens)),
                    }
                )
            out = SseStream(request, self.settings.faults)
            await out.start()

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                c: dict[str, Any] = {
                    "id": cid,
                    "object": "text_completion",
                    "created": int(time.time()),
                    "choices": [{"text": text, "index": 0, "finish_reason": finish}],
                    "model": model,
                    "system_fingerprint": FINGERPRINT,
                }
                if include_usage:
                    c["usage"] = _usage(0, 0)
                return c

            async def emit(tok: str) -> None:
                await out.send(chunk(tok, None))

            try:
                await session.run(tokens, p_count, emit)
                await out.send(chunk("", reason))
                if include_usage:
                    usage = chunk("", None)
                    usage["choices"] = []
                    usage["usage"] = _usage(p_count, len(tokens))
                    await out.send(usage)
                await out.done()
            except StreamAborted:
                await out.send_raw(chunk("", None))
            return await out.finish()
        finally:
            session.close()

    async def embeddings(self, request: web.Request) -> web.Response:
        """POST /v1/embeddings (encoding_format float or base64, as the openai client asks)."""
        started = time.monotonic()
        gt = "openai.EmbedRequest"
        body = await read_json(request, gt)
        model = field(body, "model", (str,), gt, "string") or ""
        raw = body.get("input")
        if isinstance(raw, str) and raw:
            inputs = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(v, str) for v in raw):
            inputs = list(raw)
        else:
            raise ApiError(400, "invalid input")
        fmt = field(body, "encoding_format", (str,), gt, "string") or "float"
        dims = field(body, "dimensions", (int,), gt, "int") or 0
        m = await self.native._schedulable(model)
        session = await self.engine.open(m, {}, None, started)
        try:
            count = sum(textgen.count_tokens(s) for s in inputs)
            await session.embed_delay(count)
            data = []
            for i, text in enumerate(inputs):
                vec = embed_vector(m, text, dims)
                emb: Any = textgen.f32_base64(vec) if fmt.lower() == "base64" else vec
                data.append({"object": "embedding", "embedding": emb, "index": i})
            return json_response(
                {
                    "object": "list",
                    "data": data,
                    "model": model,
                    "usage": {"prompt_tokens": count, "total_tokens": count},
                }
            )
        finally:
            session.close()

    def _model_obj(self, model_id: str, m: Installed) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": m.modified_ns // 1_000_000_000,
            "owned_by": m.name.namespace,
        }

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models: `data` is null when nothing is installed."""
        data = [self._model_obj(m.display, m) for m in self.store.list()]
        return json_response({"object": "list", "data": data or None})

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model}."""
        model = request.match_info["model"]
        name = parse_name(model)
        m = None if name is None else self.store.get(name)
        if m is None:
            raise ApiError(404, f"model '{model}' not found")
        return json_response(self._model_obj(model, m))


async def _noop(_tok: str) -> None:
    return None
