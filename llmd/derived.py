"""Derived models: how /v1 requests, which cannot carry runner options, are served by the runner
a model is loaded with instead of making Ollama reload it with its defaults.

Ollama's OpenAI layer builds each request from its default options plus the model's own
Modelfile PARAMETERs (server/routes.go modelOptions), so a model loaded with num_ctx 8192 is
reloaded by the first /v1 request for it (server/sched.go needsReload compares runner options),
and again by the next native one. Ollama's own answer is a model with PARAMETER num_ctx: llmd
creates one on the child, hidden in its own namespace (`llmd-derived/...`), FROM the model with
the runner options as parameters (POST /api/create {"model", "from", "parameters"},
server/create.go CreateHandler: parseFromModel in server/model.go reuses the source's layers by
digest, setParameters merges the parameters over the source's), and sends /v1 requests to it.
Ollama keys runners by the model's GGUF file (server/sched.go schedulerModelKey: Model.ModelPath,
the blob path GetModel in server/images.go reads from the model layer), and needsReload compares
adapters, projectors and runner options only: the derived model is served by the runner already
loaded for its base. (A num_ctx among the model's parameters counts as set, as a request's does,
for the automatic-context exemption: server/routes.go usesAutomaticNumCtx.) A model without a
GGUF file is keyed by its digest instead, so it gets no derived model.

The derived name never reaches a client: answers are rewritten back (`Rewrite`), /api/tags,
/v1/models and llmd's own lists leave the namespace out, and a runner listed under a derived name
counts as its base's (`as_base`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmd.childapi import Runner
from llmd.config import normalize_model
from llmd.process import Child

log = logging.getLogger("llmd.derived")

# An Ollama namespace (types/model/name.go: letters, digits, '_' and '-') no user would pull from.
NAMESPACE = "llmd-derived"
# A failed create is tried again after this long; meanwhile /v1 requests go as they came.
RETRY_S = 300.0
# Ollama's limit on a name's tag (types/model/name.go isValidLen).
TAG_MAX = 80
HASH_LEN = 8

# How background work is started: a named task of the daemon's TaskGroup (backends.StartTask).
StartTask = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


def derived_name(base: str, runner: Mapping[str, int | bool]) -> str:
    """The derived model of `base` with these runner options: `llmd-derived/<model>:<tag>-<hash>`,
    the hash over the base's full name and the options, lower case as Ollama matches names."""
    base = normalize_model(base)
    path, _, tag = base.rpartition(":")
    model = path.rsplit("/", 1)[-1]
    canon = json.dumps({"from": base.lower(), "parameters": dict(sorted(runner.items()))})
    digest = hashlib.sha256(canon.encode()).hexdigest()[:HASH_LEN]
    tag = tag[: TAG_MAX - HASH_LEN - 1]
    return f"{NAMESPACE}/{model}:{tag}-{digest}".lower()


def is_derived(name: str) -> bool:
    """Whether a model name is in llmd's namespace (any host)."""
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2].lower() == NAMESPACE


def visible(entries: Iterable[Any], key: str) -> list[Any]:
    """A child's list (/api/tags models, /v1/models data) without derived models."""
    return [e for e in entries if not (isinstance(e, dict) and is_derived(str(e.get(key) or "")))]


class Rewrite:
    """Streams a child's answer back with the derived name replaced by the name the client sent,
    wherever it stands (the `model` field of a JSON answer, of each SSE event, of the objects
    /v1/responses and /v1/messages nest, an error message): chunk by chunk, holding back only
    a chunk's tail that could be the start of the name, never a whole line or answer."""

    def __init__(self, derived: str, shown: str) -> None:
        self._find = derived.encode()
        # The name goes inside a JSON string, as the derived one stood.
        self._put = json.dumps(shown)[1:-1].encode()
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """The part of the answer so far that can go out now, rewritten."""
        parts = (self._held + chunk).split(self._find)
        # After the last whole name, the end may be the start of one cut by the chunk boundary.
        tail = parts[-1]
        keep = _open_prefix(tail, self._find)
        parts[-1], self._held = tail[: len(tail) - keep], tail[len(tail) - keep :]
        return self._put.join(parts)

    def flush(self) -> bytes:
        """What is left at the end of the answer."""
        held, self._held = self._held, b""
        return held


def _open_prefix(data: bytes, pattern: bytes) -> int:
    """The length of the longest end of `data` that is a proper start of `pattern`."""
    for n in range(min(len(pattern) - 1, len(data)), 0, -1):
        if data.endswith(pattern[:n]):
            return n
    return 0


@dataclass
class _Made:
    """One derived model on one child: created, being created, or failed."""

    name: str
    done: asyncio.Future[None]
    ok: bool = False
    failed_at: float | None = None


Key = tuple[str, str, str | None, tuple[tuple[str, int | bool], ...]]


class Derived:
    """The derived models llmd has made on its children, made once each and on demand."""

    def __init__(
        self,
        start_task: StartTask,
        digest_of: Callable[[str, str], str | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._start_task = start_task
        self._digest_of = digest_of  # (model, backend): its digest as /api/tags said
        self._clock = clock
        # (backend, base, base digest, runner options): the derived model made for them.
        self._made: dict[Key, _Made] = {}
        # (backend, derived name): its base, as llmd made it or the child's /api/show says.
        self._bases: dict[tuple[str, str], str] = {}
        self._told: set[tuple[str, str]] = set()  # (backend, base): a failure logged

    def _key(self, backend: str, base: str, runner: Mapping[str, int | bool]) -> Key:
        return (backend, base, self._digest_of(base, backend), tuple(sorted(runner.items())))

    def ready(self, backend: str, base: str, runner: Mapping[str, int | bool]) -> str | None:
        """The derived model of `base` with these runner options on a backend, if it has been
        made (from the base as it is now: a re-pulled base gets it made again)."""
        made = self._made.get(self._key(backend, base, runner))
        return made.name if made is not None and made.ok else None

    async def ensure(self, child: Child, base: str, runner: Mapping[str, int | bool]) -> bool:
        """Make the derived model unless it is made (or its creation failed less than RETRY_S
        ago); whether it is made. Concurrent callers share one creation, which a caller going
        away does not cancel."""
        key = self._key(child.name, base, runner)
        made = self._made.get(key)
        failed_at = made.failed_at if made is not None else None
        if made is None or (failed_at is not None and self._clock() - failed_at >= RETRY_S):
            made = self._start(child, key, base, runner)
            if made is None:
                return False
        if not made.done.done():
            await asyncio.shield(made.done)
        return made.ok

    def _start(
        self, child: Child, key: Key, base: str, runner: Mapping[str, int | bool]
    ) -> _Made | None:
        name = derived_name(base, runner)
        made = _Made(name, asyncio.get_running_loop().create_future())
        coro = self._create(child, key, made, base, dict(runner))
        try:
            self._start_task(coro, f"derive-{name}")
        except RuntimeError:  # the TaskGroup is shutting down: no request needs it now
            coro.close()
            return None
        # Entries for the base's older digests are done with: the name is made anew.
        for old in [k for k in self._made if k[:2] == key[:2] and k[3] == key[3]]:
            del self._made[old]
        self._made[key] = made
        return made

    async def _create(
        self, child: Child, key: Key, made: _Made, base: str, runner: dict[str, int | bool]
    ) -> None:
        """One creation (a task of the daemon's TaskGroup: never raises but for cancellation)."""
        try:
            details = (await child.api.show(base)).get("details")
            fmt = details.get("format") if isinstance(details, dict) else None
            if fmt != "gguf":
                # Ollama keys the runner of a model without a GGUF file (safetensors) by its
                # digest (schedulerModelKey): a derived model would be loaded a second time.
                raise ValueError(f"it is not a GGUF model (format {fmt!r})")
            await child.api.create(made.name, base, runner)
        except asyncio.CancelledError:
            made.done.cancel()
            if self._made.get(key) is made:
                del self._made[key]
            raise
        except Exception as e:  # ChildAPIError, or any surprise: /v1 requests go as they come
            made.failed_at = self._clock()
            if (child.name, base) not in self._told:
                self._told.add((child.name, base))
                log.warning(
                    "%s on %s: creating %s (its runner options %s, for /v1 requests) failed: "
                    "%s; /v1 requests for it go as they come, and Ollama reloads it with its "
                    "defaults for them (tried again every %.0fs, logged only this once)",
                    base,
                    child.name,
                    made.name,
                    runner,
                    e,
                    RETRY_S,
                )
            else:
                log.debug("creating %s on %s failed again: %s", made.name, child.name, e)
        else:
            made.ok = True
            self._bases[(child.name, made.name)] = base
            log.info(
                "created %s on %s: %s with %s, for /v1 requests",
                made.name,
                child.name,
                base,
                runner,
            )
        made.done.set_result(None)

    def forget(self, backend: str, name: str) -> None:
        """A derived model the child no longer has (removed there): made anew when needed."""
        for key in [k for k, made in self._made.items() if k[0] == backend and made.name == name]:
            del self._made[key]
            log.info("%s is gone from %s; made again when a /v1 request needs it", name, backend)

    def drop_base(self, child: Child, base: str) -> None:
        """Delete from the child the derived models of a model just deleted there, which would
        keep its file on disk: in the background, since the client that deleted it may be gone
        as soon as it has its answer."""
        coro = self._drop(child, base)
        try:
            self._start_task(coro, f"drop-derived-{base}")
        except RuntimeError:  # the TaskGroup is shutting down
            coro.close()

    async def _drop(self, child: Child, base: str) -> None:
        """drop_base's work (a task of the daemon's TaskGroup: never raises). Those made
        before a restart are found by the parent the child's /api/show names."""
        key = (child.name, base.lower())
        try:
            mine = [m for k, m in self._made.items() if (k[0], k[1].lower()) == key]
            names = {made.name for made in mine}
            for t in await child.api.tags():
                if is_derived(t.name) and t.name not in names:
                    parent = await self.base_of(child, t.name)
                    if parent is not None and parent.lower() == base.lower():
                        names.add(t.name)
            for name in sorted(names):
                await child.api.delete(name)
                self.forget(child.name, name)
                self._bases.pop((child.name, name), None)
                log.info("deleted %s from %s with %s", name, child.name, base)
        except Exception as e:  # a child's bad answer must not reach the TaskGroup
            log.warning("deleting the derived models of %s from %s failed: %s", base, child.name, e)

    async def base_of(self, child: Child, name: str) -> str | None:
        """The base of a derived model on a child: known if llmd made it since it started, else
        as the child's /api/show names its parent (one llmd made before a restart)."""
        base = self._bases.get((child.name, name))
        if base is None:
            details = (await child.api.show(name)).get("details")
            parent = details.get("parent_model") if isinstance(details, dict) else None
            if isinstance(parent, str) and parent:
                base = self._bases[(child.name, name)] = normalize_model(parent)
        return base

    async def as_base(
        self, child: Child, entries: list[dict[str, Any]], *, unknown: bool = False
    ) -> list[dict[str, Any]]:
        """A child's /api/ps entries with a runner loaded under a derived name shown under its
        base's name and digest; one whose base is not known is kept if `unknown`, else left
        out."""
        out = []
        for e in entries:
            name = str(e.get("name") or "")
            if is_derived(name):
                base = await self.base_of(child, name)
                if base is None:
                    if unknown:
                        out.append(e)
                    continue
                digest = self._digest_of(base, child.name) or e.get("digest")
                e = {**e, "name": base, "model": base, "digest": digest}
            out.append(e)
        return out

    async def runners(self, child: Child) -> list[Runner]:
        """The child's /api/ps, a runner loaded under a derived name counted as its base's.

        One whose base is not known keeps its name: llmd still unloads it when idle."""
        out = []
        for r in await child.api.ps():
            base = await self.base_of(child, r.name) if is_derived(r.name) else None
            if base is not None:
                digest = self._digest_of(base, child.name) or r.digest
                raw = {**r.raw, "name": base, "model": base, "digest": digest}
                r = Runner(base, digest, r.size, r.size_vram, raw)
            out.append(r)
        return out
