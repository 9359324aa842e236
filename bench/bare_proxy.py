#!/usr/bin/env python3
"""A bare aiohttp pass-through proxy, as a user writes one in twenty lines: the yardstick
bench/proxy_overhead.py holds llmd against (everything llmd adds on top of this should cost
nothing). No routing, auth, queue, recording or metrics: the request's method, path, headers
and body go to one upstream, its status, content type and body come back as they arrive. One
change from aiohttp's defaults: no cap on connections to the upstream (the default, 100, would
hold 256 concurrent streams to 100 and measure the child at a lighter load than the other
fronts put on it).

    python bench/bare_proxy.py PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web

HOP = {"host", "content-length", "transfer-encoding", "connection"}


async def session(app: web.Application):  # type: ignore[no-untyped-def]
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app["session"].close()


async def forward(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    body = await request.read()
    url = request.app["upstream"] + request.path_qs
    async with request.app["session"].request(
        request.method, url, data=body, headers=headers
    ) as up:
        resp = web.StreamResponse(status=up.status)
        resp.content_type = up.content_type
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def main() -> None:
    app = web.Application()
    app["upstream"] = sys.argv[2].rstrip("/")
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
