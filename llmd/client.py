"""Client of the admin API on the Unix socket, used by llmctl and the tests."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

DEFAULT_SOCKET = "/run/llmd/admin.sock"
API_VERSION = 1
API_HEADER = "X-Llmd-Api-Version"
TIMEOUT_S = 660.0  # a load may take minutes


class DaemonError(Exception):
    """The daemon answered with an error."""

    def __init__(self, code: str, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class Unreachable(Exception):
    """Nothing answers on the socket."""


def socket_path(explicit: str | None = None) -> str:
    """The socket to use: an explicit path, else $LLMD_SOCKET, else the default."""
    return explicit or os.environ.get("LLMD_SOCKET") or DEFAULT_SOCKET


class AdminClient:
    """One method per admin endpoint."""

    def __init__(self, socket: str | None = None, timeout: float = TIMEOUT_S) -> None:
        self.socket = socket_path(socket)
        self.timeout = timeout

    async def request(self, method: str, path: str) -> dict[str, Any]:
        """Send one request; return the JSON answer or raise DaemonError / Unreachable."""
        connector = aiohttp.UnixConnector(path=self.socket)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
                ) as s,
                s.request(method, "http://llmd" + path) as r,
            ):
                version = r.headers.get(API_HEADER)
                try:
                    body = await r.json(content_type=None)
                except ValueError:
                    body = None
        except aiohttp.ClientConnectorError as e:
            raise Unreachable(self._why(e.os_error)) from None
        except (aiohttp.ClientError, OSError) as e:
            raise Unreachable(f"cannot reach llmd at {self.socket}: {e}") from None
        return self._answer(r.status, version, body)

    def _answer(self, status: int, version: str | None, body: object) -> dict[str, Any]:
        """A JSON answer of llmd's, or the DaemonError it stands for."""
        if version != str(API_VERSION):
            raise DaemonError(
                "api_version",
                f"llmd at {self.socket} speaks admin API version {version}, this llmctl speaks "
                f"{API_VERSION}: use the llmctl that came with the running llmd",
            )
        if not isinstance(body, dict):
            raise DaemonError("bad_response", f"llmd answered {status} without a JSON object")
        if status >= 400:
            err = body.get("error") or {}
            raise DaemonError(str(err.get("code", "error")), str(err.get("message", body)), status)
        return body

    async def follow_events(
        self, limit: int = 10, model: str | None = None, kinds: Sequence[str] = ()
    ) -> AsyncIterator[dict[str, Any]]:
        """The last `limit` events, then each new one as llmd records it, until llmd stops
        (raises Unreachable when the stream ends)."""
        params = {"limit": str(limit)}
        if model:
            params["model"] = model
        if kinds:
            params["kind"] = ",".join(kinds)
        connector = aiohttp.UnixConnector(path=self.socket)
        # No total timeout: a quiet stream may last for days (llmd sends a blank line now and
        # then, so that either side notices the other going).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as s,
                s.get("http://llmd/v1/events/follow", params=params) as r,
            ):
                if r.status >= 400:
                    try:
                        body = await r.json(content_type=None)
                    except ValueError:
                        body = None
                    self._answer(r.status, r.headers.get(API_HEADER), body)
                self._answer(r.status, r.headers.get(API_HEADER), {})
                async for line in r.content:
                    if line.strip():
                        yield json.loads(line)
        except aiohttp.ClientConnectorError as e:
            raise Unreachable(self._why(e.os_error)) from None
        except (aiohttp.ClientError, OSError) as e:
            raise Unreachable(f"the stream from llmd at {self.socket} broke: {e}") from None
        raise Unreachable(f"llmd at {self.socket} ended the stream: it is stopping")

    def _why(self, e: OSError) -> str:
        if isinstance(e, PermissionError):
            return (
                f"permission denied on {self.socket}: add your user to the llmd group "
                "(sudo usermod -aG llmd $USER, then log in again) or use sudo"
            )
        return f"cannot reach llmd at {self.socket}: is it running? try: systemctl status llmd"

    async def status(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/status")

    async def models(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/models")

    async def load(self, model: str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/models/{quote(model, safe='')}/load")

    async def unload(self, model: str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/models/{quote(model, safe='')}/unload")

    async def pin(self, model: str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/models/{quote(model, safe='')}/pin")

    async def unpin(self, model: str) -> dict[str, Any]:
        return await self.request("DELETE", f"/v1/models/{quote(model, safe='')}/pin")

    async def explain(self, model: str, beta: float | None = None) -> dict[str, Any]:
        q = "" if beta is None else f"?beta={beta!r}"
        return await self.request("GET", f"/v1/models/{quote(model, safe='')}/explain{q}")

    async def restart(self, backend: str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/backends/{quote(backend, safe='')}/restart")

    async def reload(self) -> dict[str, Any]:
        return await self.request("POST", "/v1/reload")

    async def events(
        self, limit: int = 50, model: str | None = None, kinds: Sequence[str] | None = None
    ) -> dict[str, Any]:
        q = f"?limit={limit}" + (f"&model={quote(model, safe='')}" if model else "")
        q += f"&kind={quote(','.join(kinds), safe=',')}" if kinds else ""
        return await self.request("GET", "/v1/events" + q)
