"""Ollama-style logging to stderr: slog text lines and gin access lines."""

from __future__ import annotations

import datetime as dt
import sys


def _quote(v: object) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' ="\n\t'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def log(level: str, source: str, msg: str, **attrs: object) -> None:
    """Write one slog-style line: time=... level=INFO source=routes.go:1 msg="..." k=v."""
    now = dt.datetime.now().astimezone()
    stamp = now.isoformat(timespec="milliseconds")
    parts = [f"time={stamp}", f"level={level}", f"source={source}", f"msg={_quote(msg)}"]
    parts += [f"{k}={_quote(v)}" for k, v in attrs.items()]
    try:
        sys.stderr.write(" ".join(parts) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def info(source: str, msg: str, **attrs: object) -> None:
    """Log at INFO."""
    log("INFO", source, msg, **attrs)


def warn(source: str, msg: str, **attrs: object) -> None:
    """Log at WARN."""
    log("WARN", source, msg, **attrs)


def error(source: str, msg: str, **attrs: object) -> None:
    """Log at ERROR."""
    log("ERROR", source, msg, **attrs)


def gin(status: int, elapsed_s: float, client: str, method: str, path: str) -> None:
    """Write one gin access-log line like `[GIN] 2024/06/01 - 10:00:00 | 200 | 1.2ms | ...`."""
    now = dt.datetime.now()
    if elapsed_s >= 1:
        took = f"{elapsed_s:.6f}s"
    elif elapsed_s >= 1e-3:
        took = f"{elapsed_s * 1e3:.6f}ms"
    else:
        took = f"{elapsed_s * 1e6:.3f}\u00b5s"
    line = (
        f"[GIN] {now:%Y/%m/%d - %H:%M:%S} | {status:3d} | {took:>13} | {client:>15} | "
        f'{method:<7} "{path}"'
    )
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
