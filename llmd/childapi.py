"""The one client of a child's Ollama API: what llmd itself asks an `ollama serve`, with typed
answers and every timeout in one place. (The proxy forwards clients' requests byte for byte
on its own; this is for llmd's questions.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp

# Listing and probing answer from memory in Ollama: a slow answer means a stuck child.
LIST_TIMEOUT_S = 5.0
# /api/show reads the model's file header.
SHOW_TIMEOUT_S = 10.0
# A load reads gigabytes from disk into GPU memory.
LOAD_TIMEOUT_S = 600.0
# Ollama answers an unload at once; a hung child must not stall keep-alive timers.
UNLOAD_TIMEOUT_S = 30.0
# A create from an installed model writes a manifest after reading the model file's header (a
# request waits for it); one whose source went missing would pull it: the timeout ends that.
CREATE_TIMEOUT_S = 60.0


class ChildAPIError(Exception):
    """A child's answer was an error (`status` set) or never came (`status` None)."""

    def __init__(self, message: str, status: int | None = None, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.timed_out = timed_out


@dataclass(frozen=True)
class Runner:
    """One loaded model as /api/ps lists it."""

    name: str
    digest: str | None
    size: int  # the whole model, wherever its layers sit
    size_vram: int  # the part in GPU memory
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, e: dict[str, Any]) -> Runner:
        return cls(
            name=str(e.get("name") or ""),
            digest=e["digest"] if isinstance(e.get("digest"), str) else None,
            size=_int(e.get("size")),
            size_vram=_int(e.get("size_vram")),
            raw=e,
        )


@dataclass(frozen=True)
class Pulled:
    """One pulled model as /api/tags lists it."""

    name: str
    digest: str | None
    size: int  # of the model file
    parameter_size: str | None  # "7.6B"
    quantization_level: str | None  # "Q4_K_M"

    @classmethod
    def from_json(cls, e: dict[str, Any]) -> Pulled:
        details = e.get("details")
        if not isinstance(details, dict):
            details = {}
        ps, quant = details.get("parameter_size"), details.get("quantization_level")
        return cls(
            name=str(e.get("name") or ""),
            digest=e["digest"] if isinstance(e.get("digest"), str) else None,
            size=_int(e.get("size")),
            parameter_size=ps if isinstance(ps, str) else None,
            quantization_level=quant if isinstance(quant, str) else None,
        )


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


class ChildAPI:
    """llmd's questions to one child at `url` (http://127.0.0.1:PORT)."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self._session = session
        self.url = url

    async def alive(self, timeout: float) -> bool:
        """Whether the child answers its root path (`Ollama is running`) within `timeout`."""
        try:
            async with self._session.get(
                self.url + "/", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def version(self) -> str:
        """The child's Ollama version."""
        return str((await self.get_json("/api/version")).get("version") or "")

    async def ps(self) -> list[Runner]:
        """The models loaded now."""
        doc = await self.get_json("/api/ps")
        return [Runner.from_json(e) for e in doc.get("models") or [] if isinstance(e, dict)]

    async def tags(self) -> list[Pulled]:
        """The models pulled."""
        doc = await self.get_json("/api/tags")
        return [Pulled.from_json(e) for e in doc.get("models") or [] if isinstance(e, dict)]

    async def show(self, name: str) -> dict[str, Any]:
        """A model's /api/show document ({} when the child has none to give)."""
        try:
            status, doc = await self._post("/api/show", {"model": name}, SHOW_TIMEOUT_S)
        except ChildAPIError:
            return {}
        return doc if status == 200 else {}

    async def load(self, name: str, options: dict[str, Any], *, embedding: bool) -> bool:
        """Load a model to stay until unloaded; returns whether it is an embedding model.

        Ollama loads with an empty request: a generate, or for an embedding model (which
        refuses generate) an embed with no input."""
        body: dict[str, Any] = {"model": name, "keep_alive": -1}
        if options:
            body["options"] = options
        if not embedding:
            status, doc = await self._post("/api/generate", body, LOAD_TIMEOUT_S)
            if status == 400 and "does not support generate" in str(doc.get("error", "")):
                embedding = True
            else:
                _check(status, doc, "load")
                return False
        status, doc = await self._post("/api/embed", {**body, "input": []}, LOAD_TIMEOUT_S)
        _check(status, doc, "load")
        return True

    async def unload(self, name: str) -> None:
        """Ask the child to unload a model; it does so asynchronously (see ps()). An error
        answer (not found, say) means there is nothing to unload."""
        await self._post("/api/generate", {"model": name, "keep_alive": 0}, UNLOAD_TIMEOUT_S)

    async def create(self, name: str, source: str, parameters: dict[str, Any]) -> None:
        """Create (or re-create) model `name` from installed model `source` with `parameters`
        over its own: a new manifest over the source's files (server/create.go)."""
        body = {"model": name, "from": source, "parameters": parameters, "stream": False}
        status, doc = await self._post("/api/create", body, CREATE_TIMEOUT_S)
        _check(status, doc, "create")

    async def delete(self, name: str) -> None:
        """Delete a model; one already gone is no error."""
        try:
            async with self._session.delete(
                self.url + "/api/delete",
                json={"model": name},
                timeout=aiohttp.ClientTimeout(total=LIST_TIMEOUT_S),
            ) as r:
                if r.status not in (200, 404):
                    raise ChildAPIError(
                        f"delete failed with {r.status}: {await r.text()}", r.status
                    )
        except (aiohttp.ClientError, TimeoutError) as e:
            why = f"{_why(e)} (DELETE /api/delete)"
            raise ChildAPIError(why, timed_out=isinstance(e, TimeoutError)) from e

    async def get_json(self, path: str) -> dict[str, Any]:
        """GET a JSON object from the child."""
        try:
            async with self._session.get(
                self.url + path, timeout=aiohttp.ClientTimeout(total=LIST_TIMEOUT_S)
            ) as r:
                r.raise_for_status()
                doc = await r.json(content_type=None)
        except aiohttp.ClientResponseError as e:
            why = f"{e.status} {e.message} (GET {path})"
            raise ChildAPIError(why, e.status) from e
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            why = f"{_why(e)} (GET {path})"
            raise ChildAPIError(why, timed_out=isinstance(e, TimeoutError)) from e
        if not isinstance(doc, dict):
            raise ChildAPIError(f"not a JSON object (GET {path})")
        return doc

    async def _post(self, path: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
        try:
            async with self._session.post(
                self.url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r:
                try:
                    doc = await r.json(content_type=None)
                except ValueError:
                    doc = {"error": (await r.text())[:200]}
                return r.status, doc if isinstance(doc, dict) else {}
        except (aiohttp.ClientError, TimeoutError) as e:
            why = f"{_why(e)} (POST {path})"
            raise ChildAPIError(why, timed_out=isinstance(e, TimeoutError)) from e


def _check(status: int, doc: dict[str, Any], what: str) -> None:
    if status != 200:
        raise ChildAPIError(str(doc.get("error") or f"{what} failed with {status}"), status)


def _why(e: BaseException) -> str:
    """An exception as a reason: aiohttp's TimeoutError has an empty message."""
    return str(e) or type(e).__name__
