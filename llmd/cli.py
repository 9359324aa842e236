"""llmctl: one subcommand, one admin request; tables for people, --json for scripts."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from llmd import __version__, planner
from llmd.client import AdminClient, DaemonError, Unreachable

EXIT_OK, EXIT_DAEMON, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_NOT_SAVED = 4  # done and in force, but not yet saved: a restart before it is would undo it


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**2:,.0f} MiB"


def _secs(s: float | None) -> str:
    if s is None:
        return "forever"
    if s >= 3600:
        return f"{s / 3600:.1f}h"
    if s >= 60:
        return f"{s / 60:.1f}m"
    return f"{s:.0f}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain, aligned text table."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def render_status(doc: dict[str, Any]) -> str:
    lines = [
        f"llmd {doc['version']} (pid {doc['pid']}, up {_secs(doc['uptime_s'])}): {doc['summary']}",
        f"proxy {doc['proxy']['listen']}   config {doc['config']}",
    ]
    store = doc.get("store") or {}
    if store.get("degraded"):
        lines.append(f"store DEGRADED: {store['degraded']}")
    for c in doc.get("contended") or []:
        lines.append(f"warning: model {c['model']} is CONTENDED: {c['reason']}")
    lines += [
        "",
        table(
            ["BACKEND", "STATE", "PID", "PORT", "RESTARTS", "ERROR"],
            [
                [b["name"], b["state"], b["pid"], b["port"], b["restarts"], b["error"] or ""]
                for b in doc["backends"]
            ],
        ),
    ]
    gpu = doc.get("gpu")
    if gpu:
        lines += [
            "",
            f"GPU probe: {gpu.get('probe')}"
            + (f" (error: {gpu['error']})" if gpu.get("error") else ""),
        ]
        devs = gpu.get("devices") or []
        if devs:
            lines.append(
                table(
                    ["GPU", "NAME", "USED", "TOTAL"],
                    [
                        [
                            d["index"],
                            d["name"],
                            _mib(d.get("used_bytes")),
                            _mib(d.get("total_bytes")),
                        ]
                        for d in devs
                    ],
                )
            )
    loaded = [
        m
        for m in doc["models"]
        if m["state"] != "unloaded" or (m.get("queue") or {}).get("waiting")
    ]
    if loaded:
        lines += ["", render_models(loaded)]
    return "\n".join(lines)


def render_models(models: list[dict[str, Any]]) -> str:
    rows = []
    for m in models:
        basis = m.get("keep_alive_source") or ""
        if m.get("keep_alive_samples"):
            basis += f", n={m['keep_alive_samples']}"
        if m.get("keep_alive_percentile") is not None:
            basis += f", p{m['keep_alive_percentile']:g}"
        rows.append(
            [
                m["name"],
                m["backend"],
                m["state"]
                + (f" (as {m['runner']})" if m.get("runner") not in (None, m["name"]) else ""),
                m["priority"],
                "yes" if m["pinned"] else "",
                _running(m),
                _queued(m),
                _mib(m["size_vram"] or None),
                f"{_secs(m['keep_alive_s'])} ({basis})",
                "-" if m.get("expires_in_s") is None else _secs(m["expires_in_s"]),
                ",".join(m.get("tasks") or ()) or "-",
            ]
        )
    return table(
        [
            "MODEL",
            "BACKEND",
            "STATE",
            "PRIO",
            "PINNED",
            "RUNNING",
            "QUEUED",
            "VRAM",
            "KEEP-ALIVE",
            "UNLOAD IN",
            "TASKS",
        ],
        rows,
    )


def _running(m: dict[str, Any]) -> str:
    """Requests in flight, and how many may run at once once llmd has queued for it."""
    limit = (m.get("queue") or {}).get("limit")
    return f"{m['in_flight']}/{limit}" if limit else str(m["in_flight"])


def _queued(m: dict[str, Any]) -> str:
    """Requests waiting in llmd's queue; whether it is making way for another model; what the
    queue turned away."""
    q = m.get("queue") or {}
    out = str(q.get("waiting", 0))
    if q.get("making_way"):
        out += " (making way)"
    rejected = sum((q.get("rejected") or {}).values())
    if rejected:
        out += f" ({rejected} refused)"
    return out


def render_events(events: list[dict[str, Any]]) -> str:
    import datetime as dt

    return table(
        ["TIME", "EVENT", "MODEL", "BACKEND", "REASON"],
        [
            [
                dt.datetime.fromtimestamp(e["time"]).strftime("%Y-%m-%d %H:%M:%S"),
                e["kind"],
                e.get("model"),
                e.get("backend"),
                e.get("reason", ""),
            ]
            for e in events
        ],
    )


BAR_WIDTH = 40


def _bar(value: float, top: float) -> str:
    """A horizontal bar of BAR_WIDTH at most, in eighths of a character."""
    eighths = round(BAR_WIDTH * 8 * value / top) if top > 0 else 0
    full, part = divmod(eighths, 8)
    return "\u2588" * full + ("" if part == 0 else chr(0x2590 - part))


def render_explain(doc: dict[str, Any]) -> str:
    """`llmctl explain`: the keep-alive decision, its inputs, the idle gaps and the cost curve."""
    d, learned, i = doc["decision"], doc["learned"], doc["inputs"]
    head = f"{doc['model']}: keep-alive {_secs(d['keep_alive_s'])} ({d['source']}"
    if d["source"] in ("adaptive", "fallback") and d["samples"]:
        head += f", from {d['samples']} idle gaps"
        if d["percentile"] is not None:
            head += f", {d['percentile']:.0f}% of them served warm"
    lines = [head + ")"]
    if d != learned:  # pinned or fixed
        lines.append(
            f"  the learned policy would choose {_secs(learned['keep_alive_s'])} "
            f"({learned['source']})"
        )
    if d["prewarm_after_s"] is not None:
        lines.append(
            f"  pre-warm: unload after {_secs(d['keep_alive_s'])}, reload "
            f"{_secs(d['prewarm_after_s'])} after going idle, unload again at "
            f"{_secs(d['prewarm_expire_s'])} if no request came"
        )
    else:
        lines.append(
            f"  pre-warm: {'none chosen' if i['prewarm'] else 'off ([keep_alive] prewarm)'}"
        )
    lines += [
        f"  inputs: load {i['load_s']:.1f} s, size {i['size_gb']:.1f} GB, priority "
        f"{i['priority']} (cold-start weight {doc['priority_weight']:.2f}), beta {i['beta']:g} "
        "per GB-s",
        f"  an idle second costs {doc['rent_per_idle_s']:.4g} latency-s, a reload "
        f"{doc['reload_cost']:.3g} latency-s: break-even {_secs(doc['break_even_s'])}; "
        f"timeouts up to {_secs(doc['cap_s'])} (the lesser of it and max "
        f"{_secs(i['max_s'])}), at least min {_secs(i['min_s'])}",
    ]
    if not doc["samples"]:
        lines.append(f"  no idle gaps recorded yet: the default {_secs(i['default_s'])} stands")
        return "\n".join(lines)
    lines += ["", f"idle gaps ({doc['samples']} recorded, {doc['oob']} of 4h or more)"]
    top = max(b["count"] for b in doc["histogram"]) if doc["histogram"] else 0
    for b in doc["histogram"]:
        span = f"{_secs(b['lo_s'])}-{_secs(b['hi_s'])}"
        lines.append(f"  {span:<13} {_bar(b['count'], top)} {b['count']:g}")
    lines += ["", "expected cost per idle gap, by keep-alive (latency-s; lower is better)"]
    top = max((c["cost_per_gap"] for c in doc["curve"]), default=0.0)
    chosen = d["keep_alive_s"] if d["source"] in ("adaptive", "fallback", "default") else None
    mark = None
    if chosen is not None and doc["curve"]:
        # The point the decision came from: the last one at or below it (the margin adds 10%).
        mark = max(
            (k for k, c in enumerate(doc["curve"]) if c["timeout_s"] <= chosen + 1e-9),
            default=None,
        )
    for k, c in enumerate(doc["curve"]):
        row = (
            f"  {_secs(c['timeout_s']):<8} {_bar(c['cost_per_gap'], top):<{BAR_WIDTH}} "
            f"{c['cost_per_gap']:.3g}  {c['warm_pct']:.0f}% warm"
        )
        if k == mark:
            row += f"  <- {_secs(chosen)}"
        lines.append(row)
    return "\n".join(lines)


async def _top(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    from llmd import top  # rich is needed by this command only

    raise _Exit(await top.run(c, once=a.once))


class _Exit(Exception):
    """A command that has printed what it prints, with its exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


async def _explain(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    doc = await c.explain(a.model, a.beta)
    return doc, render_explain(doc)


Command = Callable[[AdminClient, argparse.Namespace], Coroutine[Any, Any, tuple[Any, str]]]


async def _status(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    doc = await c.status()
    return doc, render_status(doc)


async def _models(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    doc = await c.models()
    return doc, render_models(doc["models"]) if doc["models"] else "no models"


async def _load(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    doc = await c.load(a.model)
    took = f" in {doc['load_s']:.1f}s" if doc.get("load_s") is not None else ""
    return doc, f"{doc['model']} loaded on {doc['backend']}{took}"


async def _unload(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    doc = await c.unload(a.model)
    return doc, f"{doc['model']}: {doc['outcome']}"


def _not_saved(doc: dict[str, Any], done: str) -> str:
    return (
        f"{doc['model']} {done} now; not yet saved: {doc['not_saved']}; retrying"
        " (a restart of llmd before it is saved undoes it)"
    )


async def _pin(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    doc = await c.pin(a.model)
    if doc.get("saved") is False:
        return doc, _not_saved(doc, "pinned")
    return doc, f"{doc['model']} pinned: once loaded, it stays loaded until unpinned"


async def _unpin(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    doc = await c.unpin(a.model)
    if doc.get("saved") is False:
        return doc, _not_saved(doc, "unpinned")
    return doc, f"{doc['model']} unpinned"


async def _restart(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    doc = await c.restart(a.backend)
    return doc, f"backend {doc['backend']}: {doc['outcome']}"


async def _reload(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    doc = await c.reload()
    return doc, "reloaded" + "".join(f"\n  {n}" for n in doc["changes"])


async def _events(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    if a.follow:
        await _follow(c, a)  # until llmd stops (Unreachable) or Ctrl-C
    doc = await c.events(limit=50 if a.limit is None else a.limit, model=a.model, kinds=a.kind)
    return doc, render_events(doc["events"]) if doc["events"] else "no events"


async def _follow(c: AdminClient, a: argparse.Namespace) -> None:
    """Print the last events, then each new one as it happens, a line each."""
    import datetime as dt

    limit = 10 if a.limit is None else a.limit
    if not a.json:
        print(f"{'TIME':<19}  {'EVENT':<12}  {'MODEL':<24}  {'BACKEND':<10}  REASON", flush=True)
    async for e in c.follow_events(limit, a.model, a.kind or ()):
        if a.json:
            line = json.dumps(e)
        elif e["kind"] == "gap":
            line = f"... {e['dropped']} events not shown (llmctl fell behind)"
        else:
            when = dt.datetime.fromtimestamp(e["time"]).strftime("%Y-%m-%d %H:%M:%S")
            line = (
                f"{when:<19}  {e['kind']:<12}  {e.get('model') or '-':<24}  "
                f"{e.get('backend') or '-':<10}  {e.get('reason', '')}".rstrip()
            )
        print(line, flush=True)


class UsageError(Exception):
    """Bad arguments found after parsing (exit 2)."""


async def _plan(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    """Offline from --model, or from the running daemon's models and GPUs."""
    models: list[planner.PlanModel] = list(a.models)
    vram, ram = a.vram_gb, a.ram_gb
    if not models:
        status = await c.status()
        for m in status["models"]:
            # A replicated model has a row per copy: the plan counts one.
            if not m.get("footprint_bytes") or any(p.name == m["name"] for p in models):
                continue
            models.append(
                planner.PlanModel(
                    m["name"],
                    m.get("quant") or "?",
                    m["footprint_bytes"] / planner.GB,
                    m["priority"],
                    measured=True,
                )
            )
        if vram is None:
            devices = (status.get("gpu") or {}).get("devices") or []
            vram = sum(d["total_bytes"] for d in devices) / planner.GB if devices else None
        if not models:
            raise UsageError("the daemon knows no model sizes yet: give --model arguments")
    if ram is None:
        import psutil

        ram = psutil.virtual_memory().total / planner.GB
    if vram is None:
        raise UsageError("--vram-gb is required (no GPU seen by the daemon)")
    plan = planner.plan(models, vram, ram)
    return plan.to_json(), planner.render(plan)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llmctl",
        description="Control a running llmd.",
        epilog="exit status: 0 ok, 1 error from llmd, 2 usage, 3 llmd unreachable, 4 pin or unpin"
        " in force but not yet saved (the database cannot be written; llmd retries)",
    )
    ap.add_argument(
        "--socket",
        metavar="PATH",
        help="admin socket (default $LLMD_SOCKET or /run/llmd/admin.sock)",
    )
    ap.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    ap.add_argument("--version", action="version", version=f"llmctl {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        # Accept --json after the subcommand too, as people type it.
        p.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        return p

    cmd("status", _status, "daemon, backends, GPU and loaded models")
    cmd("models", _models, "every known model with its state and keep-alive")
    for name, fn, help in (
        ("load", _load, "load a model now"),
        ("unload", _unload, "unload a model (once its requests finish)"),
        ("pin", _pin, "keep a model loaded until unpinned (survives restarts)"),
        ("unpin", _unpin, "let a pinned model unload again"),
    ):
        cmd(name, fn, help).add_argument("model", help="model name or alias")
    p = cmd(
        "explain",
        _explain,
        "why a model's keep-alive is what it is: inputs, idle gaps, the cost of each timeout",
    )
    p.add_argument("model", help="model name or alias")
    p.add_argument(
        "--beta",
        type=float,
        help="preview the decision with this [keep_alive] beta instead of the configured one",
    )
    p = cmd("top", _top, "a live view of GPUs, backends and models (q quits)")
    p.add_argument("--once", action="store_true", help="print one plain frame and exit")
    cmd("restart", _restart, "restart a backend (also retries a FATAL one)").add_argument(
        "backend", help="backend name"
    )
    cmd("reload", _reload, "re-read the config file (like systemctl reload llmd)")
    p = cmd(
        "plan",
        _plan,
        "which models fit in VRAM and which spill to RAM (offline with --model, else from the "
        "running daemon's models and GPUs)",
    )
    planner.add_arguments(p, json_flag=False)
    p = cmd("events", _events, "recent loads, unloads, evictions, crashes and reloads")
    p.add_argument("--limit", type=int, help="how many (default 50; 10 with --follow)")
    p.add_argument("--model", help="only this model's events")
    p.add_argument(
        "--kind",
        type=lambda v: [k for k in v.split(",") if k],
        help="only these kinds, comma-separated (load,unload,evict,load-failed,crash,...)",
    )
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="then print each new event as it happens, until Ctrl-C or llmd stops",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of `llmctl`."""
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) and EXIT_USAGE
    client = AdminClient(args.socket)
    try:
        doc, text = asyncio.run(args.fn(client, args))
    except Unreachable as e:
        print(f"llmctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except DaemonError as e:
        print(f"llmctl: {e.message}", file=sys.stderr)
        return EXIT_DAEMON
    except UsageError as e:
        print(f"llmctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except _Exit as e:
        return e.code
    except KeyboardInterrupt:
        # Ctrl-C is how a follow ends.
        return EXIT_OK if getattr(args, "follow", False) else 130
    print(json.dumps(doc, indent=2) if args.json else text)
    if isinstance(doc, dict) and doc.get("saved") is False:
        return EXIT_NOT_SAVED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
