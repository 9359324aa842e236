"""The merged views across children: /healthz, /readyz, /api/tags, /api/ps and /v1/models."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from llmd.answers import format_time, json_response, no_backend, parse_time
from llmd.backends import Backends
from llmd.childapi import ChildAPIError, Pulled
from llmd.derived import visible
from llmd.lifecycle import Lifecycle
from llmd.models import MState
from llmd.process import RETRY_AFTER_S, Child

# Its lines are the proxy port's, under the name they had before proxy.py was split.
log = logging.getLogger("llmd.proxy")

# Names the backends a merged list (/api/tags, /api/ps, /v1/models) had to leave out.
WARNING_HEADER = "X-LLMD-Warning"
# How often a merged list looks whether a child it waits for has been found hung meanwhile.
GATHER_RECHECK_S = 0.25


class Merged:
    """The handlers that ask every running child and answer with one list."""

    def __init__(self, backends: Backends, lifecycle: Lifecycle) -> None:
        self.backends = backends
        self.lifecycle = lifecycle

    async def healthz(self, request: web.Request) -> web.Response:
        children = list(self.backends.children.values())
        states = {c.name: c.state.value for c in children}
        # "running" means answering its probes and taking requests: a hung child is not.
        answering = sum(c.running for c in children)
        status = "ok" if answering == len(children) else "degraded" if answering else "unavailable"
        return json_response(
            {"status": status, "backends": states},
            status=200 if answering else 503,
            headers=None if answering else {"Retry-After": str(RETRY_AFTER_S)},
        )

    async def readyz(self, request: web.Request) -> web.Response:
        """200 when every backend is running and its models are known, so that a load balancer
        may send traffic; else 503 naming each backend that is not ready and why."""
        children = list(self.backends.children.values())
        not_ready: dict[str, str] = {}
        for c in children:
            if not c.running:
                not_ready[c.name] = f"{c.state.value}: {c.error}" if c.error else c.state.value
            elif not self.backends.listed(c.name):
                not_ready[c.name] = "running, but its models are not listed yet"
        ready = bool(children) and not not_ready
        body: dict[str, Any] = {
            "ready": ready,
            "backends": {c.name: c.state.value for c in children},
        }
        if not ready:
            body["not_ready"] = not_ready
        # Requests waiting for a backend to come up (they are answered when it does).
        body["waiting"] = self.backends.waiting
        if ready:
            return json_response(body)
        waits = [c.retry_after_s() for c in children if c.name in not_ready]
        retry = str(min(waits, default=RETRY_AFTER_S))
        return json_response(body, status=503, headers={"Retry-After": retry})

    async def _gather(self, path: str) -> tuple[list[tuple[Child, Any]], dict[str, str]]:
        """Each answering child's JSON at path, and why each other child's is missing.

        503 when no child answered: an empty list would tell clients there are no models."""
        children = list(self.backends.children.values())
        missing = {c.name: c.state.value for c in children if not c.running}
        answers: dict[str, dict[str, Any]] = {}

        async def ask(c: Child) -> None:
            try:
                answers[c.name] = await c.api.get_json(path)
            except ChildAPIError as e:
                log.warning("%s from backend %s failed: %s", path, c.name, e)
                missing[c.name] = "no answer" if e.timed_out else "failed"

        async with asyncio.TaskGroup() as tg:  # this request's: cancelled with it
            asked = {
                tg.create_task(ask(c), name=f"gather-{c.name}"): c for c in children if c.running
            }
            pending = set(asked)
            while pending:
                _, pending = await asyncio.wait(pending, timeout=GATHER_RECHECK_S)
                for task in [t for t in pending if not asked[t].running]:
                    # Found hung (or draining) meanwhile: do not wait out the fetch's timeout.
                    task.cancel()
                    pending.discard(task)
                    missing[asked[task].name] = asked[task].state.value
        out = [
            (c, answers[c.name]) for c in children if c.name in answers and c.name not in missing
        ]
        if not out:
            raise no_backend(self.backends, None, missing)
        return out, missing

    def _partial(self, missing: dict[str, str]) -> dict[str, str] | None:
        """The header that names the backends a merged list left out, or None."""
        if not missing:
            return None
        names = ", ".join(f"{n} ({why})" for n, why in missing.items())
        return {WARNING_HEADER: f"incomplete: backends not answering: {names}"}

    async def tags(self, request: web.Request) -> web.Response:
        merged: dict[str, dict[str, Any]] = {}
        answers, missing = await self._gather("/api/tags")
        for child, doc in answers:
            listed = [e for e in doc.get("models") or [] if isinstance(e, dict)]
            self.backends.set_tags(child.name, [Pulled.from_json(e) for e in listed])
            for m in visible(doc.get("models") or [], "name"):  # llmd's own are hidden
                merged.setdefault(m.get("name"), m)
        models = sorted(merged.values(), key=lambda m: str(m.get("modified_at", "")), reverse=True)
        return json_response({"models": models}, headers=self._partial(missing))

    async def ps(self, request: web.Request) -> web.Response:
        entries = []
        answers, missing = await self._gather("/api/ps")
        for child, doc in answers:
            listed = [e for e in doc.get("models") or [] if isinstance(e, dict)]
            for e in await self.lifecycle.derived.as_base(child, listed):
                m = self.lifecycle.record_on(str(e.get("name", "")), child.name)
                if m is not None:
                    e = {**e, "expires_at": self._expires_at(m, e.get("expires_at"))}
                entries.append(e)
        entries.sort(key=lambda e: parse_time(e.get("expires_at")), reverse=True)
        return json_response({"models": entries}, headers=self._partial(missing))

    def _expires_at(self, m: Any, child_value: Any) -> Any:
        """llmd's own unload time: children are told never to unload, so theirs is meaningless."""
        if m.state is MState.UNLOADING:
            return format_time(time.time())
        if m.in_flight > 0 or m.deadline is None:
            return child_value  # forever, as far as anyone can tell now
        return format_time(time.time() + (m.deadline - time.monotonic()))

    async def v1_models(self, request: web.Request) -> web.Response:
        merged: dict[str, dict[str, Any]] = {}
        answers, missing = await self._gather("/v1/models")
        for _, doc in answers:
            for m in visible(doc.get("data") or [], "id"):
                merged.setdefault(m.get("id"), m)
        # Ollama answers "data": null rather than [] when there are no models (openai/openai.go).
        return json_response(
            {"object": "list", "data": list(merged.values()) or None},
            headers=self._partial(missing),
        )
