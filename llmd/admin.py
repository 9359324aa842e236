"""The admin API: HTTP/JSON on a Unix socket, versioned under /v1/, driven by llmctl; and the
views of the core it answers with (status, models, pins, the /metrics snapshot)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from llmd import __version__, derived, metrics
from llmd.backends import Backends
from llmd.config import Config
from llmd.connlimit import Connections, open_file_limit
from llmd.feed import Feed, Filter, aiter_events
from llmd.latency import LatencyWatch
from llmd.lifecycle import EventSink, Lifecycle
from llmd.models import LoadError, Model, MState, explain_keep_alive, policy_inputs
from llmd.process import Child
from llmd.proxy import Proxy
from llmd.scheduler import QueueStats, Scheduler
from llmd.store import Store

log = logging.getLogger("llmd.admin")

API_VERSION = 1
API_HEADER = "X-Llmd-Api-Version"
SOCKET_MODE = 0o660
# A follower's stream gets a blank line this often without an event (to notice a gone client).
HEARTBEAT_S = 15.0


class AdminError(Exception):
    """An error answered as {"error": {"code", "message"}} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except AdminError as e:
        resp = web.json_response({"error": {"code": e.code, "message": e.message}}, status=e.status)
    except web.HTTPException as e:
        code = "not_found" if e.status == 404 else "bad_request"
        resp = web.json_response(
            {"error": {"code": code, "message": f"{request.method} {request.path}: {e.reason}"}},
            status=e.status,
        )
    except Exception as e:
        log.exception("admin %s %s failed", request.method, request.path)
        resp = web.json_response(
            {"error": {"code": "internal", "message": f"{type(e).__name__}: {e}"}}, status=500
        )
    resp.headers[API_HEADER] = str(API_VERSION)
    return resp


class Control(Protocol):
    """What only the daemon can do: reload its config, restart a backend after draining it."""

    started_at: float

    async def reload(self) -> tuple[bool, list[str]]: ...

    def restart_backend(self, child: Child) -> int: ...


class Admin:
    """Routes of the admin API, and the views of the core they answer with (status, models,
    pins; the /metrics snapshot)."""

    def __init__(
        self,
        cfg: Config,
        *,
        backends: Backends,
        lifecycle: Lifecycle,
        scheduler: Scheduler,
        store: Store,
        proxy: Proxy,
        connections: Connections,
        events: EventSink,
        feed: Feed,
        control: Control,
        latency: LatencyWatch | None = None,
        counters: metrics.Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.backends = backends
        self.lifecycle = lifecycle
        self.scheduler = scheduler
        self.store = store
        self.proxy = proxy
        self.connections = connections
        self._events = events
        self._feed = feed
        self._control = control
        self._latency = latency
        self._counters = counters  # the /metrics counters: tokens generated per model
        # The node's model sets as /metrics last showed them, and since when (unix time).
        self._models_seen: tuple[tuple[str, ...], tuple[str, ...], int] | None = None
        self._models_since = 0.0

    def configure(self, cfg: Config) -> None:
        """Take a reloaded config."""
        self.cfg = cfg

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors])
        r = app.router
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{name:.+}/explain", self.explain)
        r.add_post("/v1/models/{name:.+}/load", self.load)
        r.add_post("/v1/models/{name:.+}/unload", self.unload)
        r.add_post("/v1/models/{name:.+}/pin", self.pin)
        r.add_delete("/v1/models/{name:.+}/pin", self.unpin)
        r.add_post("/v1/backends/{name}/restart", self.restart)
        r.add_post("/v1/reload", self.reload)
        r.add_get("/v1/events", self.events)
        r.add_get("/v1/events/follow", self.follow)
        return app

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status_doc())

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": self.models_doc()})

    def _name(self, request: web.Request) -> str:
        return self.proxy.resolve(request.match_info["name"])

    async def explain(self, request: web.Request) -> web.Response:
        """Why a model's keep-alive is what it is: the policy's inputs, the idle-gap histogram,
        the cost of each candidate timeout and the decision (`?beta=` previews another beta)."""
        name = self._name(request)
        beta: float | None = None
        if "beta" in request.query:
            try:
                beta = float(request.query["beta"])
            except ValueError:
                beta = -1.0
            if not 0 <= beta < math.inf:
                raise AdminError(
                    400, "bad_request", f"beta must be a number >= 0, got {request.query['beta']!r}"
                )
        m = self.lifecycle.runner_of(name) or next(
            (r for r in self.lifecycle.models.values() if r.name == name), None
        )
        if m is None:
            child = await self.backends.locate(name)
            if child is None:
                raise not_found(self.backends, name)
            m = Model(name, child.name)  # never used yet: a read, nothing recorded
        doc = explain_keep_alive(self.cfg, self.store, m, beta=beta)
        return web.json_response({"model": name, "state": m.state.value, **doc})

    async def load(self, request: web.Request) -> web.Response:
        name = self._name(request)
        child = await self.backends.locate(name)
        if child is None:
            raise not_found(self.backends, name)
        if not child.running:
            raise AdminError(
                503, "backend_unavailable", f"backend {child.name!r} is {child.state.value}"
            )
        try:
            m = await self.lifecycle.load(name, child, reason="llmctl load")
        except LoadError as e:
            # No room in GPU memory keeps its 503 (try again later); a child's failure is 502.
            status = e.status if e.status < 500 or e.retry_after_s else 502
            code = "no_room" if e.retry_after_s else "load_failed"
            raise AdminError(status, code, e.message) from None
        return web.json_response(
            {"model": name, "backend": child.name, "state": m.state.value, "load_s": m.last_load_s}
        )

    async def unload(self, request: web.Request) -> web.Response:
        name = self._name(request)
        if name not in self.lifecycle.models and await self.backends.locate(name) is None:
            raise not_found(self.backends, name)
        outcome = await self.lifecycle.unload(name, reason="llmctl unload")
        return web.json_response({"model": name, "outcome": outcome})

    async def pin(self, request: web.Request) -> web.Response:
        return web.json_response(await self.set_pin(self._name(request), True))

    async def unpin(self, request: web.Request) -> web.Response:
        return web.json_response(await self.set_pin(self._name(request), False))

    async def restart(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        child = self.backends.children.get(name)
        if child is None:
            known = ", ".join(self.backends.children) or "none"
            raise AdminError(404, "not_found", f"no backend named {name!r} (backends: {known})")
        # Its requests in flight finish first (up to daemon.shutdown_timeout); new ones get 503.
        n = self._control.restart_backend(child)
        outcome = f"restarting once its {n} request(s) in flight finish" if n else "restarting"
        return web.json_response({"backend": name, "outcome": outcome, "in_flight": n})

    async def reload(self, request: web.Request) -> web.Response:
        ok, changes = await self._control.reload()
        if not ok:
            raise AdminError(400, "invalid_config", changes[0])
        return web.json_response({"reloaded": True, "changes": changes})

    async def events(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            raise AdminError(400, "bad_request", "limit must be an integer") from None
        model = request.query.get("model")
        events = await self.store.events(
            limit=limit,
            model=self.proxy.resolve(model) if model else None,
            kinds=_kinds(request),
        )
        return web.json_response({"events": events})

    async def follow(self, request: web.Request) -> web.StreamResponse:
        """The last `limit` events (default 10), oldest first, then each new one as it happens,
        one JSON object per line, until the client goes or llmd stops; `model` and `kind`
        (comma-separated) filter. A blank line every HEARTBEAT_S without an event; a
        {"kind": "gap", "dropped": N} line if the client fell FOLLOWER_BACKLOG events behind."""
        try:
            limit = int(request.query.get("limit", "10"))
        except ValueError:
            raise AdminError(400, "bad_request", "limit must be an integer") from None
        model = request.query.get("model")
        wanted = Filter(self.proxy.resolve(model) if model else None, _kinds(request))
        resp = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson", API_HEADER: str(API_VERSION)}
        )
        with self._feed.follow(wanted) as f:  # before the backlog: nothing falls in between
            backlog = await self.store.events(limit, wanted.model, kinds=wanted.kinds)
            await resp.prepare(request)
            shown = [_line(e) for e in reversed(backlog)]
            try:
                for line in shown:
                    await resp.write(line)
                seen = set(shown)  # published while the backlog was read: already sent
                async for event in aiter_events(f, HEARTBEAT_S):
                    line = b"\n" if event is None else _line(event)
                    if line in seen:
                        continue
                    seen.clear()  # past what the backlog covered
                    await resp.write(line)
            except ConnectionResetError:  # the follower went away (Ctrl-C): nothing to say
                log.debug("an events follower went away")
        return resp

    # -- pins -------------------------------------------------------------------------------------

    async def set_pin(self, name: str, pinned: bool) -> dict[str, Any]:
        """Pin or unpin a model at run time, saved for restarts as soon as the store can."""
        mc = self.cfg.model(name)
        if not pinned and mc is not None and mc.pin:
            i = self.cfg.models.index(mc)
            raise AdminError(
                409,
                "pinned_in_config",
                f"{name} is pinned in {self.cfg.path} (model[{i}].pin): set pin = false there "
                "and run llmctl reload",
            )
        if pinned and mc is None and await self.backends.locate(name) is None:
            raise not_found(self.backends, name)
        if pinned:
            err = await self.lifecycle.pinned_fit_error(self.cfg, extra=name)
            if err is not None:
                raise AdminError(409, "does_not_fit", f"cannot pin {name}: {err}")
        saved = await self.store.set_pin(name, pinned)
        self._events.record_event("pin" if pinned else "unpin", model=name, reason="llmctl")
        self.lifecycle.rearm()  # a pinned model never times out; an unpinned one learns again
        # In force either way; while the store is degraded it is saved when the disk heals, and
        # the caller is told so, since a restart before then would lose it.
        return {
            "model": name,
            "pinned": pinned,
            "saved": saved,
            "not_saved": None if saved else self.store.degraded or "the store is closed",
        }

    # -- views ------------------------------------------------------------------------------------

    def summary(self) -> str:
        """One line for systemd's STATUS= and the log."""
        children = self.backends.children.values()
        running = sum(c.running for c in children)
        loaded = sum(m.state is MState.LOADED for m in self.lifecycle.models.values())
        queued = sum(q.waiting for q in self.scheduler.stats())
        return (
            f"{running}/{len(children)} backends running, {loaded} models loaded, "
            f"{self.proxy.in_flight} requests in flight, {queued} queued"
        )

    def status_doc(self) -> dict[str, Any]:
        """Everything `llmctl status` shows."""
        return {
            "api_version": API_VERSION,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self._control.started_at, 1),
            "config": str(self.cfg.path),
            # daemon.event_loop as it came out: "uvloop" or "asyncio".
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "proxy": {
                "listen": self.cfg.proxy.listen,
                "in_flight": self.proxy.in_flight,
                "connections": self.connections.snapshot(),
                "open_file_limit": open_file_limit(),
            },
            "admin_socket": str(self.cfg.daemon.admin_socket),
            "summary": self.summary(),
            "backends": [
                {
                    "name": s.name,
                    "state": s.state,
                    "pid": s.pid,
                    "port": s.port,
                    "restarts": s.restarts,
                    "error": s.error,
                    "retry_in_s": None if s.backoff_s is None else round(s.backoff_s, 1),
                    "gpus": None if c.cfg.gpus is None else list(c.cfg.gpus),
                }
                for c in self.backends.children.values()
                for s in [c.status()]
            ],
            "models": self.models_doc(),
            "contended": self._latency.contended() if self._latency else [],
            "gpu": self._gpu_doc(),
            "store": self.store.status(),
        }

    def _queue(self, name: str, backend: str | None) -> dict[str, Any]:
        """A model's queue in llmd: waiting, running and their limits, what it turned away.
        For a copy of a replicated model, running, limit and making_way are the copy's own;
        waiting requests may go to any copy."""
        q = self.scheduler.of(name)
        mq = self.scheduler.max_queue(name)
        if q is None:
            return {"queue": {"waiting": 0, "running": 0, "max_queue": mq}}
        doc: dict[str, Any] = {
            "waiting": q.waiting,
            "running": q.running,
            "limit": q.limit,
            "max_queue": mq,
            "oldest_wait_s": round(q.oldest_wait_s, 3),
            "making_way": q.yielding,
            "started": q.started,
            "rejected": q.rejected,
            "swaps": q.swaps,
            "service_s": None if q.service_s is None else round(q.service_s, 3),
        }
        mc = self.cfg.model(name)
        if mc is not None and mc.replicated:
            copy = next((r for r in q.replicas if r.backend == backend), None)
            doc.update(
                running=copy.running if copy else 0,
                limit=copy.limit if copy else None,
                making_way=bool(copy and copy.yielding),
            )
        return {"queue": doc}

    def _footprint(self, name: str, m: Model | None, backend: str | None) -> dict[str, Any]:
        """A model's known GPU footprint for `llmctl plan`, and its quantisation."""
        fp = self.lifecycle.memory.known_footprint(name, m, backend)
        pulled = self.backends.pulled(backend or "", name)
        return {
            "footprint_bytes": fp.bytes if fp else None,
            "footprint_basis": fp.basis if fp else None,
            "quant": pulled.quantization_level if pulled is not None else None,
        }

    def _gpu_doc(self) -> dict[str, Any] | None:
        snap = self.lifecycle.memory.snapshot
        if snap is None:
            return {"probe": self.cfg.gpu.probe, "devices": [], "error": "not read yet"}
        doc = snap.to_dict()
        ours = sum(m.size_vram for m in self.lifecycle.models.values())
        doc["llmd_bytes"] = ours
        doc["other_programs_bytes"] = max(0, snap.used_bytes - ours) if snap.devices else 0
        return doc

    def models_doc(self) -> list[dict[str, Any]]:
        """Every configured, pulled or seen model with its state and keep-alive."""
        # One row per model record: (name, backend) by the record's key (see Lifecycle.key).
        rows: dict[str, tuple[str, str | None]] = {}
        for conf in self.cfg.models:
            for placed in conf.backends or (self.cfg.backends[0].name,):
                rows[self.lifecycle.key(conf.name, placed)] = (conf.name, placed)
        for b in self.cfg.backends:
            for t in self.backends.tags(b.name):
                if self.cfg.model(t.name) is None:
                    rows.setdefault(t.name, (t.name, b.name))
        for known in self.lifecycle.models.values():
            rows[known.key] = (known.name, known.backend)
        out = []
        now = time.monotonic()
        for key, (name, backend) in sorted(rows.items(), key=lambda kv: (kv[1][0], kv[0])):
            if not name:
                continue
            mc = self.cfg.model(name)
            m = self.lifecycle.models.get(key)
            # Another name of the same model (same digest) may be what its runner loaded as.
            runner = self.lifecycle.runner_of(name, backend)
            if runner is not None:
                m = runner
            # A model never used yet: what its keep-alive would be, without recording it.
            ka = self.lifecycle.keep_alive_of(m if m is not None else Model(name, backend or ""))
            inputs = policy_inputs(self.cfg, self.store, name, m)
            out.append(
                {
                    "name": name,
                    "backend": backend,
                    "state": m.state.value if m else MState.UNLOADED.value,
                    "runner": runner.name if runner is not None else None,
                    "priority": inputs.priority,
                    "pinned": inputs.pinned,
                    "aliases": list(mc.aliases) if mc else [],
                    "tasks": list(mc.tasks) if mc else [],
                    "keep_alive_s": ka.keep_alive_s if ka else None,
                    "keep_alive_source": ka.source if ka else None,
                    "keep_alive_samples": ka.samples if ka else 0,
                    "keep_alive_percentile": ka.percentile if ka else None,
                    "expires_in_s": (
                        round(max(0.0, m.deadline - now), 1)
                        if m is not None and m.deadline is not None
                        else None
                    ),
                    "in_flight": m.in_flight if m else 0,
                    # Generated since llmd started, over every copy (top turns it into a rate).
                    "eval_tokens": (
                        self._counters.tokens[(name, "eval")] if self._counters else None
                    ),
                    "replica": bool(mc and mc.replicated),
                    **self._queue(name, backend),
                    "size": m.size if m else 0,
                    "size_vram": m.size_vram if m else 0,
                    "loads": m.loads if m else 0,
                    "last_load_s": m.last_load_s if m else None,
                    "runner_options": m.runner_options if m and m.resident else None,
                    "context_length": m.context_length if m and m.resident else None,
                    "options_overridden": m.options_overridden if m else 0,
                    **self._footprint(name, m, backend),
                    **(self._latency.doc(name) if self._latency else {}),
                }
            )
        return out

    def metrics_snapshot(self) -> metrics.Snapshot:
        """The gauges /metrics shows, as plain data."""
        models = sorted(self.lifecycle.models.values(), key=lambda m: m.name)
        queues = self.scheduler.stats()
        snap = self.lifecycle.memory.snapshot
        lat = self._latency
        return metrics.Snapshot(
            models=[
                metrics.ModelGauges(
                    name=m.name,
                    backend=m.backend,
                    loaded=m.state is MState.LOADED,
                    in_flight=m.in_flight,
                    vram_bytes=m.size_vram,
                    keep_alive_s=ka.keep_alive_s,
                    keep_alive_source=ka.source,
                    options_overridden=m.options_overridden,
                    contended=bool(lat and lat.tracker.contended(m.name)),
                    baseline_ttft_s=lat.tracker.baseline(m.name, "ttft") if lat else None,
                    baseline_tpot_s=lat.tracker.baseline(m.name, "tpot") if lat else None,
                )
                for m in models
                for ka in [self.lifecycle.keep_alive_of(m)]
            ],
            backends=[
                metrics.BackendGauges(c.name, c.running, c.restarts)
                for c in self.backends.children.values()
            ],
            gpus=[
                metrics.GpuGauges(
                    d.index,
                    d.used_bytes,
                    d.total_bytes,
                    d.util_pct,
                    d.temp_c,
                    d.power_w,
                    d.power_limit_w,
                )
                for d in (snap.devices if snap is not None else [])
            ],
            queues=[
                metrics.QueueGauges(
                    q.name,
                    q.waiting,
                    q.running,
                    q.limit,
                    q.yielding,
                    q.rejected,
                    q.swaps,
                    self.scheduler.max_queue(q.name),
                )
                for q in queues
            ],
            queue_waits=self.scheduler.waits,
            batches=self.scheduler.batches,
            store_degraded=self.store.degraded is not None,
            node=self._node(queues),
        )

    def _names(self, name: str) -> list[str]:
        """The names a request may give for a model: its own, its aliases, and the name without
        a ":latest" tag (what the endpoint picker matches a request's `model` against)."""
        mc = self.cfg.model(name)
        names = [name, *(mc.aliases if mc else ())]
        if name.endswith(":latest"):
            names.append(name.removesuffix(":latest"))
        return names

    def _node(self, queues: list[QueueStats]) -> metrics.NodeGauges:
        """The node's gauges for the model-server protocol (metrics.NodeGauges)."""
        records = [m for m in self.lifecycle.models.values() if not derived.is_derived(m.name)]
        resident = {m.name for m in records if m.state is MState.LOADED}
        loading = {m.name for m in records if m.state is MState.LOADING} - resident
        awaited = {q.name for q in queues if q.waiting} - resident
        running = tuple(sorted({n for name in resident for n in self._names(name)}))
        waiting = tuple(
            sorted({n for name in loading | awaited for n in self._names(name)} - set(running))
        )
        # Another model fits if one configured, not resident, would be admitted now.
        candidates = [
            (conf.name, placed)
            for conf in self.cfg.models
            if conf.name not in resident
            for placed in conf.backends or (self.cfg.backends[0].name,)
        ]
        spare = bool(candidates) and self.lifecycle.memory.fits_another(records, candidates)
        most = len(running) + len(waiting) + int(spare)
        seen = (running, waiting, most)
        if seen != self._models_seen:
            self._models_seen, self._models_since = seen, time.time()
        warm = resident | loading
        slots = sum(q.limit for q in queues if q.name in warm)
        busy = sum(q.running for q in queues)
        return metrics.NodeGauges(
            waiting=sum(q.waiting for q in queues),
            running=busy,
            cache_usage=min(1.0, busy / slots) if slots else 0.0,
            running_models=running,
            waiting_models=waiting,
            max_models=most,
            changed_at=self._models_since,
        )


def _kinds(request: web.Request) -> frozenset[str]:
    """The event kinds a request asks for (?kind=load,evict); empty: all."""
    return frozenset(k for k in request.query.get("kind", "").split(",") if k)


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def not_found(backends: Backends, name: str) -> AdminError:
    """404, or 503 while a backend that may have the model has not listed its models yet."""
    child, why = backends.missing(name)
    if child is None:
        return AdminError(404, "not_found", why)
    return AdminError(503, "backend_unavailable", why)


def prepare_socket(path: Path) -> None:
    """Create the socket's directory and clear a stale socket; refuse a live one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by an llmd that did not exit cleanly
        return
    finally:
        probe.close()
    raise OSError(f"another llmd is already serving {path}: stop it first (systemctl stop llmd)")


def secure_socket(path: Path) -> None:
    """Owner and group may talk to the daemon; nobody else."""
    path.chmod(SOCKET_MODE)
