"""Client of the admin API on the Unix socket, used by llmctl and the tests."""

from __future__ import annotations

import os
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
        if version != str(API_VERSION):
            raise DaemonError(
                "api_version",
                f"llmd at {self.socket} speaks admin API version {version}, this llmctl speaks "
                f"{API_VERSION}: use the llmctl that came with the running llmd",
            )
        if not isinstance(body, dict):
            raise DaemonError("bad_response", f"llmd answered {r.status} without a JSON object")
        if r.status >= 400:
            err = body.get("error") or {}
            raise DaemonError(
                str(err.get("code", "error")), str(err.get("message", body)), r.status
            )
        return body

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

    async def restart(self, backend: str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/backends/{quote(backend, safe='')}/restart")

    async def reload(self) -> dict[str, Any]:
        return await self.request("POST", "/v1/reload")

    async def events(self, limit: int = 50, model: str | None = None) -> dict[str, Any]:
        q = f"?limit={limit}" + (f"&model={quote(model, safe='')}" if model else "")
        return await self.request("GET", "/v1/events" + q)
