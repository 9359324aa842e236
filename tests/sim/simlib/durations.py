"""Go-compatible durations and timestamps (time.ParseDuration, RFC3339Nano, api.Duration)."""

from __future__ import annotations

import datetime as dt
import math
import re
import time

# Go's time.Duration(math.MaxInt64): what Ollama stores for "forever" (api/types.go).
FOREVER_S = (2**63 - 1) / 1e9

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_NUM = re.compile(r"(\d*)(?:\.(\d*))?")


def _quote(s: str) -> str:
    """Quote like Go's strconv.Quote for the simple strings we meet."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_go_duration(s: str) -> float:
    """Parse a Go duration string ("10m", "1h30m", "-1.5s") into seconds, or raise ValueError."""
    orig = s
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"time: invalid duration {_quote(orig)}")
    total = 0.0
    while s:
        m = _NUM.match(s)
        assert m is not None
        whole, frac = m.group(1), m.group(2)
        if not whole and not frac:
            raise ValueError(f"time: invalid duration {_quote(orig)}")
        s = s[m.end() :]
        i = 0
        while i < len(s) and not (s[i] == "." or s[i].isdigit()):
            i += 1
        unit = s[:i]
        s = s[i:]
        if not unit:
            raise ValueError(f"time: missing unit in duration {_quote(orig)}")
        if unit not in _UNITS:
            raise ValueError(f"time: unknown unit {_quote(unit)} in duration {_quote(orig)}")
        value = float(f"{whole or '0'}.{frac or '0'}")
        total += value * _UNITS[unit]
    return -total if neg else total


def parse_keep_alive_json(value: object) -> float | None:
    """Decode a request's keep_alive like Ollama's api.Duration.UnmarshalJSON.

    Returns seconds (math.inf for forever), None when absent/null, or raises ValueError with
    Ollama's message.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("Unsupported type: 'bool'")
    if isinstance(value, int | float):
        return math.inf if value < 0 else float(value)
    if isinstance(value, str):
        secs = parse_go_duration(value)
        return math.inf if secs < 0 else secs
    if isinstance(value, dict):
        raise ValueError("Unsupported type: 'map[string]interface {}'")
    if isinstance(value, list):
        raise ValueError("Unsupported type: '[]interface {}'")
    raise ValueError(f"Unsupported type: '{type(value).__name__}'")


def parse_keep_alive_env(value: str | None, default_s: float = 300.0) -> float:
    """OLLAMA_KEEP_ALIVE: a Go duration, else integer seconds; invalid -> 5m; negative -> forever.

    Mirrors envconfig/config.go KeepAlive().
    """
    secs = default_s
    if value:
        try:
            secs = parse_go_duration(value)
        except ValueError:
            try:
                secs = float(int(value))
            except ValueError:
                secs = default_s
    return math.inf if secs < 0 else secs


def format_duration(secs: float) -> str:
    """Render seconds the way Go prints a Duration, roughly (for logs)."""
    if math.isinf(secs):
        return "2562047h47m16.854775807s"
    if secs == 0:
        return "0s"
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    out = ""
    if h:
        out += f"{int(h)}h"
    if h or m:
        out += f"{int(m)}m"
    return out + f"{s:g}s"


def go_time(epoch_ns: int | None = None, *, utc: bool = False) -> str:
    """Format a timestamp like Go's time.Time JSON encoding (RFC3339Nano, zeros trimmed)."""
    if epoch_ns is None:
        epoch_ns = time.time_ns()
    secs, nanos = divmod(epoch_ns, 1_000_000_000)
    if utc:
        d = dt.datetime.fromtimestamp(secs, tz=dt.UTC)
    else:
        d = dt.datetime.fromtimestamp(secs).astimezone()
    frac = f"{nanos:09d}".rstrip("0")
    base = d.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "")
    off = d.utcoffset() or dt.timedelta(0)
    if off == dt.timedelta(0):
        return base + "Z"
    total = int(off.total_seconds())
    sign = "+" if total >= 0 else "-"
    hh, mm = divmod(abs(total) // 60, 60)
    return f"{base}{sign}{hh:02d}:{mm:02d}"


def go_time_after(seconds: float) -> str:
    """Local RFC3339Nano time `seconds` from now; forever is about 292 years ahead like Go."""
    if math.isinf(seconds):
        seconds = FOREVER_S
    return go_time(time.time_ns() + int(seconds * 1e9))


def epoch_to_go_time(epoch_s: float) -> str:
    """Local RFC3339Nano for an epoch in seconds (may be far in the future)."""
    return go_time(int(epoch_s * 1e9))
