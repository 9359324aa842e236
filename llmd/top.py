"""`llmctl top`: a live view of llmd, refreshed every second, in the spirit of htop and nvtop.

Per GPU a bar of used memory (llmd's models, other programs, free); the backends; per model its
state, backend, requests running of its limit and queued, GPU memory, keep-alive left and its
basis, tokens generated per second, its latency against its quiet baseline (flagged when
contended) and its last event.
Keys: q quits, s changes the sort, up/down select a model, p pins or unpins the selected one
(after y to confirm). When stdout is not a terminal (or with --once) it
prints one plain frame and exits. Drawn with rich (python3-rich in Debian); keys are read from
the terminal in cbreak mode."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llmd.client import AdminClient, DaemonError, Unreachable

REFRESH_S = 1.0
BAR = 40
SORTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "name": lambda m: (m["name"], m["backend"] or ""),
    "priority": lambda m: (m["priority"], m["name"]),
    "vram": lambda m: (-(m["size_vram"] or 0), m["name"]),
    "busy": lambda m: (-(m["in_flight"] + (m.get("queue") or {}).get("waiting", 0)), m["name"]),
}
STATE_STYLE = {"loaded": "green", "loading": "yellow", "unloading": "yellow", "unloaded": "dim"}


@dataclass
class View:
    """What the screen shows and what the keys change."""

    status: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    sort: str = "name"
    selected: int = 0
    asking: str | None = None  # the model a pin/unpin waits for y on
    note: str = ""  # the last action's outcome
    updated: float = 0.0
    # Tokens generated per model: the last reading (time, count), and the rate between the
    # last two readings.
    tokens: dict[str, tuple[float, int]] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)

    def count_tokens(self, now: float) -> None:
        """Turn each model's token count into tokens per second since the last reading."""
        if self.status is None:
            return
        for m in self.status["models"]:
            n = m.get("eval_tokens")
            if n is None:
                continue
            last = self.tokens.get(m["name"])
            if last is not None and now > last[0] and n >= last[1]:
                self.rates[m["name"]] = (n - last[1]) / (now - last[0])
            self.tokens[m["name"]] = (now, n)

    def models(self) -> list[dict[str, Any]]:
        if self.status is None:
            return []
        return sorted(self.status["models"], key=SORTS[self.sort])

    def current(self) -> dict[str, Any] | None:
        models = self.models()
        if not models:
            return None
        self.selected = max(0, min(self.selected, len(models) - 1))
        return models[self.selected]


def _gib(n: float | None) -> str:
    return "-" if not n else f"{n / 1024**3:.1f} GiB"


def _time(e: dict[str, Any]) -> float:
    return float(e["time"])


def _gib0(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _ago(t: float, now: float) -> str:
    s = max(0.0, now - t)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def _left(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 60 else f"{s / 60:.0f}m" if s < 3600 else f"{s / 3600:.1f}h"


def _keep_alive(m: dict[str, Any]) -> str:
    ka = m.get("keep_alive_s")
    text = "forever" if ka is None else _left(ka)
    basis = m.get("keep_alive_source") or ""
    if m.get("keep_alive_samples"):
        basis += f", n={m['keep_alive_samples']}"
    return f"{text} ({basis})" if basis else text


def _latency(m: dict[str, Any]) -> Text:
    """The window's p99 against the model's quiet baseline (TTFT or time per token, the worse),
    red once llmd has found it contended (see llmd/contention.py)."""
    ratio = m.get("latency_ratio")
    if ratio is None:
        return Text("-", style="dim")
    text = f"{ratio:.1f}x {m.get('latency_ratio_kind') or ''}".rstrip()
    if m.get("contended"):
        return Text(text + " CONTENDED", style="bold red")
    return Text(text, style="yellow" if ratio > 1.5 else "")


def _telemetry(d: dict[str, Any]) -> Text:
    """'  87% 61°C 312/450 W' from what the probe reads (nothing for what it cannot)."""
    parts = []
    if d.get("util_pct") is not None:
        parts.append(f"{d['util_pct']:.0f}%")
    if d.get("temp_c") is not None:
        parts.append(f"{d['temp_c']:.0f}°C")
    if d.get("power_w") is not None:
        limit = f"/{d['power_limit_w']:.0f}" if d.get("power_limit_w") is not None else ""
        parts.append(f"{d['power_w']:.0f}{limit} W")
    hot = (d.get("temp_c") or 0) >= 85
    return Text(("  " + " ".join(parts)) if parts else "", style="bold red" if hot else "")


def gpu_bars(status: dict[str, Any]) -> list[Text]:
    """One line per GPU: a bar of llmd's models (cyan), other programs (magenta) and free."""
    gpu = status.get("gpu") or {}
    devices = gpu.get("devices") or []
    backends = {b["name"]: b for b in status["backends"]}
    lines = []
    for d in devices:
        total, used = d.get("total_bytes") or 0, d.get("used_bytes") or 0
        ours = 0.0
        for m in status["models"]:
            gpus = (backends.get(m["backend"] or "") or {}).get("gpus")
            if m.get("size_vram") and (gpus is None or d["index"] in gpus):
                ours += m["size_vram"] / (len(gpus) if gpus else len(devices))
        ours = min(ours, used)
        other = max(0.0, used - ours)
        cells = [round(BAR * x / total) if total else 0 for x in (ours, other)]
        bar = Text("[")
        bar.append("█" * cells[0], style="cyan")
        bar.append("▒" * min(cells[1], BAR - cells[0]), style="magenta")
        bar.append("░" * max(0, BAR - cells[0] - cells[1]), style="dim")
        bar.append("]")
        line = Text(f"GPU {d['index']} {d.get('name', ''):<24} ")
        line.append_text(bar)
        line.append(f" {_gib0(used)} / {_gib0(total)}  llmd {_gib0(ours)}  other {_gib0(other)}")
        line.append(_telemetry(d))
        lines.append(line)
    if not devices:
        why = gpu.get("error") or "none seen"
        lines.append(Text(f"GPU probe {gpu.get('probe', '?')}: {why}", style="dim"))
    return lines


def frame(v: View, now: float | None = None, interactive: bool = True) -> RenderableType:
    """The whole screen for the view's state (without the selection and the keys' line when
    not interactive)."""
    now = time.time() if now is None else now
    parts: list[RenderableType] = []
    if v.status is None:
        parts.append(Text(f"llmd: {v.error or 'connecting...'}", style="red"))
        return Group(*parts)
    st = v.status
    head = Text(f"llmd {st['version']}  up {_left(st['uptime_s'])}  {st['summary']}")
    if v.error:
        head.append(f"   ({v.error}; showing {_ago(v.updated, now)})", style="red")
    parts.append(head)
    store = st.get("store") or {}
    if store.get("degraded"):
        parts.append(Text(f"store DEGRADED: {store['degraded']}", style="bold red"))
    parts += gpu_bars(st)

    backends = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("BACKEND", "STATE", "PID", "RESTARTS", "GPUS", "ERROR"):
        backends.add_column(col)
    for b in st["backends"]:
        style = "green" if b["state"] == "running" else "red"
        gpus = "all" if b.get("gpus") is None else ",".join(map(str, b["gpus"]))
        backends.add_row(
            b["name"],
            Text(b["state"], style=style),
            str(b["pid"] or "-"),
            str(b["restarts"]),
            gpus,
            b["error"] or "",
        )
    parts += [Text(""), backends, Text("")]

    last: dict[tuple[str | None, str | None], dict[str, Any]] = {}
    for e in v.events:  # newest first
        last.setdefault((e.get("model"), e.get("backend")), e)
    models = Table(box=None, pad_edge=False, header_style="bold")
    for col in (
        " ",
        "MODEL",
        "BACKEND",
        "STATE",
        "PRIO",
        "PIN",
        "RUN",
        "QUEUED",
        "VRAM",
        "KEEP-ALIVE",
        "UNLOAD IN",
        "TOK/S",
        "P99/BASE",
        "LAST EVENT",
    ):
        models.add_column(col, no_wrap=col != "LAST EVENT")
    current = v.current() if interactive else None
    for m in v.models():
        q = m.get("queue") or {}
        limit = q.get("limit")
        run = f"{m['in_flight']}/{limit}" if limit else str(m["in_flight"])
        mine_ev, any_ev = last.get((m["name"], m["backend"])), last.get((m["name"], None))
        # Its copy's own last event, or a newer one for the whole model (a pin, say).
        ev = max((e for e in (mine_ev, any_ev) if e is not None), key=_time, default=None)
        event = ""
        if ev is not None:
            event = f"{ev['kind']} {_ago(ev['time'], now)}"
            if ev.get("reason"):
                event += f" ({ev['reason']})"
        mine = m is current
        models.add_row(
            ">" if mine else " ",
            m["name"],
            m["backend"] or "-",
            Text(m["state"], style=STATE_STYLE.get(m["state"], "")),
            str(m["priority"]),
            "yes" if m["pinned"] else "",
            run,
            str(q.get("waiting", 0) or ""),
            _gib(m["size_vram"]),
            _keep_alive(m),
            _left(m.get("expires_in_s")),
            f"{v.rates[m['name']]:.0f}" if m["name"] in v.rates else "-",
            _latency(m),
            event,
            style="reverse" if mine else None,
        )
    parts.append(models)
    if not interactive:
        return Group(*parts)
    keys = Text(f"\nq quit  s sort ({v.sort})  ↑/↓ select  p pin/unpin", style="dim")
    if v.asking is not None:
        keys = Text(f"\n{v.asking}? press y to confirm, any other key to cancel", style="bold")
    elif v.note:
        keys.append(f"   {v.note}", style="bold")
    parts.append(keys)
    return Group(*parts)


async def refresh(c: AdminClient, v: View) -> None:
    """Read the daemon's state into the view (keeping the last one on an error)."""
    try:
        status, events = await asyncio.gather(c.status(), c.events(limit=200))
    except (Unreachable, DaemonError) as e:
        v.error = str(e)
        return
    v.status, v.events, v.error, v.updated = status, events["events"], None, time.time()
    v.count_tokens(time.monotonic())


async def key(c: AdminClient, v: View, k: str) -> bool:
    """Act on one key; False to quit."""
    if v.asking is not None:
        model, v.asking = v.current(), None
        if k.lower() == "y" and model is not None:
            try:
                if model["pinned"]:
                    await c.unpin(model["name"])
                    v.note = f"{model['name']} unpinned"
                else:
                    await c.pin(model["name"])
                    v.note = f"{model['name']} pinned"
            except (Unreachable, DaemonError) as e:
                v.note = f"failed: {e}"
            await refresh(c, v)
        else:
            v.note = "cancelled"
        return True
    if k in ("q", "Q"):
        return False
    if k == "s":
        names = list(SORTS)
        v.sort = names[(names.index(v.sort) + 1) % len(names)]
    elif k in ("\x1b[A", "k"):
        v.selected -= 1
    elif k in ("\x1b[B", "j"):
        v.selected += 1
    elif k == "p":
        model = v.current()
        if model is not None:
            verb = "unpin" if model["pinned"] else "pin"
            v.asking = f"{verb} {model['name']}"
    v.current()  # keep the selection in range
    return True


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """Keys one at a time, not echoed; the terminal restored at the end."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run(c: AdminClient, once: bool = False) -> int:
    """The live view until q (0); one plain frame when stdout is not a terminal or `once`
    (3 if llmd cannot be reached)."""
    v = View()
    if once or not sys.stdout.isatty() or not sys.stdin.isatty():
        await refresh(c, v)
        if v.status is None:
            print(f"llmctl: {v.error}", file=sys.stderr)
            return 3
        Console(width=200, no_color=True, highlight=False).print(frame(v, interactive=False))
        return 0
    keys: asyncio.Queue[str] = asyncio.Queue()
    fd = sys.stdin.fileno()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, lambda: keys.put_nowait(os.read(fd, 32).decode(errors="replace")))
    console = Console(highlight=False)
    try:
        with cbreak(fd), Live(console=console, screen=True, auto_refresh=False) as live:
            next_poll = 0.0
            while True:
                if time.monotonic() >= next_poll:
                    await refresh(c, v)
                    next_poll = time.monotonic() + REFRESH_S
                live.update(frame(v), refresh=True)
                try:
                    async with asyncio.timeout(max(0.0, next_poll - time.monotonic())):
                        pressed = await keys.get()
                except TimeoutError:
                    continue
                for k in _split_keys(pressed):
                    if not await key(c, v, k):
                        return 0
    finally:
        loop.remove_reader(fd)


def _split_keys(data: str) -> list[str]:
    """Keys from what one read returned: arrow keys are three characters (ESC [ A)."""
    out = []
    i = 0
    while i < len(data):
        if data.startswith("\x1b[", i) and i + 2 < len(data):
            out.append(data[i : i + 3])
            i += 3
        else:
            out.append(data[i])
            i += 1
    return out
