"""Who may call what on the proxy port: API keys and the permission each request needs."""

from __future__ import annotations

import hmac

from aiohttp import web

from llmd.answers import ProxyError
from llmd.config import ProxyConfig

# Endpoints that run a model: they take a lease (load if cold, keep-alive after).
NATIVE_INFERENCE = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
OPENAI_INFERENCE = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
)
# Health checks answer GET and HEAD without an API key; any other method needs one.
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})
# Paths an inference key may use: they run or describe a model. Model management (pull, push,
# create, copy, delete, blobs) and any other write need a key from proxy.api_keys.
INFERENCE_PATHS = frozenset((*NATIVE_INFERENCE, *OPENAI_INFERENCE, "/api/show", "/infer"))
OPEN, INFERENCE, MANAGE = "open", "inference", "manage"


def authorize(p: ProxyConfig, request: web.Request) -> ProxyError | None:
    """None if the request's key (if any is needed) allows it, else the 401 or 403."""
    need = permission(request.method, request.path)
    if p.open_metrics and request.path == "/metrics" and request.method in ("GET", "HEAD"):
        need = OPEN
    if need == OPEN or not p.keyed:
        return None
    given = _bearer(request.headers.get("Authorization", ""))
    full = _key_in(given, p.api_keys)
    app = _key_in(given, p.inference_keys)
    if not (full or app):
        return ProxyError(
            401,
            "unauthorized: send `Authorization: Bearer KEY` with a key from proxy.api_keys "
            "or proxy.inference_keys",
            {"WWW-Authenticate": "Bearer"},
        )
    if need == MANAGE and not full:
        return ProxyError(
            403,
            f"forbidden: {request.method} {request.path} manages models and needs a key from "
            "proxy.api_keys; this key is from proxy.inference_keys (inference and listing)",
        )
    return None


def permission(method: str, path: str) -> str:
    """What a request needs: OPEN (no key), INFERENCE (any key) or MANAGE (an api_keys key)."""
    if path.startswith("/api/blobs"):
        return MANAGE  # blob uploads (and their HEAD check) are the first step of a create
    if method in ("GET", "HEAD"):
        return OPEN if path in OPEN_PATHS else INFERENCE
    return INFERENCE if path in INFERENCE_PATHS else MANAGE


def _bearer(header: str) -> bytes:
    """The token of `Authorization: Bearer TOKEN` as bytes, b"" for any other header."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return b""
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: this restores them exactly,
    # so a non-UTF-8 key is simply a wrong key, not an exception.
    return token.strip().encode("utf-8", "surrogateescape")


def _key_in(given: bytes, keys: tuple[str, ...]) -> bool:
    # Compare with every key, in constant time, so timing tells nothing about a key.
    return bool(given) and any([hmac.compare_digest(given, k.encode()) for k in keys])
