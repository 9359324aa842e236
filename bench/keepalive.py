"""Keep-alive trace-replay benchmark: llmd's adaptive policy against fixed timeouts and oracles.

    .venv/bin/python -m bench.keepalive                       # all families, 7 days
    .venv/bin/python -m bench.keepalive --days 2 --families F1,F3 --json out.json
    .venv/bin/python -m bench.keepalive --trace t.csv --models m.toml --vram-gb 24
    .venv/bin/python -m bench.keepalive --plot bench/plots     # Pareto PNGs (matplotlib)

See bench/README.md for the cost model, the metrics and the latest results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `llmd` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.replay import FIXED_MINUTES, POLICIES, Params, Result, percentile, replay
from bench.traces import DAY, FAMILIES, Trace, TraceError, load_models, load_trace, make_family
from llmd.policy import (
    NBINS,
    Candidate,
    IdleHistogram,
    admission_wait_s,
    choose_victims,
    decide_keep_alive,
)

DEFAULT_BETA = 0.001
"""Latency-seconds per idle GB-s: one second of a weight-1 cold start is worth 1000 GB-s of
idle memory, i.e. keeping an 8B model (4.9 GB) loaded for 3.4 minutes, or a 70B one (43 GB) for
23 seconds."""
REFERENCE = "fixed-10m"
ORACLE = "oracle-reactive"


def run_trace(
    trace: Trace,
    policies: list[str],
    params: Params,
    warmup_days: float,
    vram_gb: float | None,
) -> tuple[dict[str, Any], list[Result]]:
    """Replay every policy (plus the reference and the oracle) over one trace."""
    budget = vram_gb if vram_gb is not None else trace.vram_gb
    if budget is not None:
        biggest = max(trace.models, key=lambda m: m.size_gb)
        if biggest.size_gb > budget:
            raise TraceError(
                f"{trace.family}: model {biggest.name!r} ({biggest.size_gb} GB) does not fit "
                f"in --vram-gb {budget}"
            )
    days = trace.end_s / DAY
    warmup_s = min(warmup_days, days / 4) * DAY
    names = list(dict.fromkeys([*policies, REFERENCE, ORACLE]))
    results = [replay(trace, p, params, warmup_s, budget) for p in names]
    summ = {r.policy: r.summary(params.beta) for r in results}
    ref_idle = summ[REFERENCE]["idle_gb_s"]
    opt = summ[ORACLE]["cost"]
    for s in summ.values():
        s["idle_gb_s_norm"] = 100 * s["idle_gb_s"] / ref_idle if ref_idle else 0.0
        s["cost_ratio_oracle"] = s["cost"] / opt if opt else 1.0
    run: dict[str, Any] = {
        "family": trace.family,
        "title": trace.title,
        "days": round(days, 3),
        "warmup_s": warmup_s,
        "vram_gb": budget,
        "requests": summ[ORACLE]["requests"],
        "models": [
            {"name": m.name, "size_gb": m.size_gb, "load_s": m.load_s, "priority": m.priority}
            for m in trace.models
        ],
        "policies": {p: summ[p] for p in names if p in policies},
    }
    for who in ("adaptive", "adaptive-prewarm"):
        if who in summ:
            key = "dominated_by" if who == "adaptive" else "dominated_by_prewarm"
            run[key] = dominated_by(summ, who)
    return run, results


def dominated_by(summ: dict[str, dict[str, float]], who: str) -> list[str]:
    """Fixed-timeout policies at least as good as `who` on both axes and better on one."""
    a = summ[who]
    out = []
    for m in FIXED_MINUTES:
        f = summ.get(f"fixed-{m}m")
        if f is None:
            f = None
            continue
        x, y = f["p75_model_cold_start_rate"], f["idle_gb_s"]
        ax, ay = a["p75_model_cold_start_rate"], a["idle_gb_s"]
        if x <= ax and y <= ay and (x < ax or y < ay):
            out.append(f"fixed-{m}m")
    return out


def format_table(run: dict[str, Any]) -> str:
    """A readable table of one family's results."""
    vram = "unlimited" if run["vram_gb"] is None else f"{run['vram_gb']:g} GB"
    lines = [
        f"{run['family']} {run['title']}: {len(run['models'])} models, {run['days']:g} days "
        f"({run['warmup_s'] / DAY:g} warm-up), {run['requests']} requests, VRAM {vram}",
        f"  {'policy':<17}{'cold%':>7}{'p75 cold%':>11}{'idle GB-s':>12}{'norm':>7}"
        f"{'cost J':>10}{'J/J*':>7}",
    ]
    for name, s in run["policies"].items():
        lines.append(
            f"  {name:<17}{100 * s['cold_start_rate']:>7.2f}"
            f"{100 * s['p75_model_cold_start_rate']:>11.2f}{s['idle_gb_s']:>12.0f}"
            f"{s['idle_gb_s_norm']:>7.1f}{s['cost']:>10.1f}{s['cost_ratio_oracle']:>7.3f}"
        )
    for key, who in (("dominated_by", "adaptive"), ("dominated_by_prewarm", "adaptive-prewarm")):
        if key in run:
            lines.append(f"  {who} dominated by: {', '.join(run[key]) or 'none'}")
    return "\n".join(lines)


def plot(run: dict[str, Any], outdir: Path) -> Path:
    """One Pareto PNG: p75 per-model cold starts against normalised idle GB-s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = run["policies"]

    def xy(name: str) -> tuple[float, float]:
        s = pol[name]
        return 100 * s["p75_model_cold_start_rate"], s["idle_gb_s_norm"]

    fig, ax = plt.subplots(figsize=(7, 5))
    fixed = [f"fixed-{m}m" for m in FIXED_MINUTES if f"fixed-{m}m" in pol]
    if fixed:
        pts = [xy(f) for f in fixed]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="grey", label="fixed")
        for f, (x, y) in zip(fixed, pts, strict=True):
            ax.annotate(f[6:], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    styles = {
        "adaptive": ("*", "tab:red", 220),
        "adaptive-prewarm": ("P", "tab:purple", 140),
        "lru": ("s", "tab:brown", 80),
        "break-even": ("D", "tab:orange", 70),
        "oracle-fixed": ("X", "tab:olive", 90),
        "oracle-reactive": ("^", "tab:green", 90),
        "oracle-preload": ("v", "tab:blue", 90),
    }
    for name, (marker, color, size) in styles.items():
        if name in pol:
            x, y = xy(name)
            ax.scatter([x], [y], marker=marker, color=color, s=size, label=name, zorder=3)
    ax.set_xlabel("p75 per-model cold-start rate (%)")
    ax.set_ylabel("idle GB-s (fixed-10m = 100)")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_title(f"{run['family']} {run['title']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"{run['family']}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_summary(results: list[Result]) -> dict[str, float]:
    """Microseconds per adaptive keep-alive decision and victim choice over all runs."""
    dec = sorted(x for r in results for x in r.decision_us)
    vic = sorted(x for r in results for x in r.victim_us)
    return {
        "decisions": len(dec),
        "decision_mean_us": sum(dec) / len(dec) if dec else 0.0,
        "decision_p99_us": percentile(dec, 99),
        "decision_max_us": dec[-1] if dec else 0.0,
        "victim_choices": len(vic),
        "victim_mean_us": sum(vic) / len(vic) if vic else 0.0,
        "victim_max_us": vic[-1] if vic else 0.0,
    }


def policy_latency_us() -> dict[str, float]:
    """Best-of-5 microseconds per call on a worst case: every histogram bin filled."""
    hist = IdleHistogram(counts=[1 + (7 * i) % 50 for i in range(NBINS)], oob=10)
    kw: dict[str, Any] = {
        "load_s": 6.5,
        "size_gb": 4.9,
        "priority": 2,
        "beta": DEFAULT_BETA,
        "min_s": 0.0,
        "max_s": 14400.0,
        "default_s": 600.0,
    }
    cands = [
        Candidate(f"m{i}", 1 + i % 5, False, 0, 5 * 10**9, 300.0 * i, hist, 1800.0, 6.5)
        for i in range(16)
    ]
    calls: dict[str, Callable[[], object]] = {
        "decide_keep_alive": lambda: decide_keep_alive(hist, **kw),
        "decide_keep_alive_prewarm": lambda: decide_keep_alive(hist, prewarm=True, **kw),
        "choose_victims_16": lambda: choose_victims(cands, 40 * 10**9, requester_priority=3),
        "admission_wait_16": lambda: admission_wait_s(cands, 40 * 10**9, requester_priority=1),
    }
    return {k: 1e6 * min(timeit.repeat(f, number=100, repeat=5)) / 100 for k, f in calls.items()}


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.keepalive", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--days", type=float, default=7.0, help="trace length in days (default 7)")
    ap.add_argument("--seed", type=int, default=1, help="trace seed (default 1)")
    ap.add_argument("--families", type=_csv, default=list(FAMILIES), help="e.g. F1,F3")
    ap.add_argument("--policies", type=_csv, default=list(POLICIES), help=", ".join(POLICIES))
    ap.add_argument(
        "--beta",
        type=float,
        default=DEFAULT_BETA,
        help=f"latency-seconds per idle GB-s (default {DEFAULT_BETA})",
    )
    ap.add_argument("--vram-gb", type=float, help="memory budget for every trace")
    ap.add_argument("--warmup-days", type=float, default=1.0, help="discarded (max 1/4 of a trace)")
    ap.add_argument("--min-s", type=float, default=60.0, help="[keep_alive] min (1 min)")
    ap.add_argument("--max-s", type=float, default=4 * 3600.0, help="[keep_alive] max (4 h)")
    ap.add_argument("--default-s", type=float, default=600.0, help="[keep_alive] default (10 min)")
    ap.add_argument("--trace", type=Path, help="CSV trace (t,model[,duration_s]) instead")
    ap.add_argument("--models", type=Path, help="TOML [[model]] tables for --trace")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--plot", type=Path, help="write one Pareto PNG per family here")
    args = ap.parse_args(argv)

    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        ap.error(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        ap.error(f"unknown family {bad[0]!r}; choose from {', '.join(FAMILIES)}")
    if args.beta <= 0 or args.days <= 0:
        ap.error("--beta and --days must be positive")
    if (args.trace is None) != (args.models is None):
        ap.error("--trace and --models go together")
    params = Params(args.beta, args.min_s, args.max_s, args.default_s)

    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    all_results: list[Result] = []
    try:
        if args.trace is not None:
            traces = [load_trace(args.trace, load_models(args.models), None)]
        else:
            traces = [make_family(f, args.seed, args.days) for f in args.families]
        for trace in traces:
            run, results = run_trace(trace, args.policies, params, args.warmup_days, args.vram_gb)
            runs.append(run)
            all_results.extend(results)
            print(format_table(run), end="\n\n", flush=True)
    except TraceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    lat = latency_summary(all_results)
    micro = policy_latency_us()
    print(
        f"{len(runs)} traces in {elapsed:.1f} s. In the replay: {lat['decisions']} keep-alive "
        f"decisions, mean {lat['decision_mean_us']:.0f} us, p99 {lat['decision_p99_us']:.0f} us; "
        f"{lat['victim_choices']} victim choices, mean {lat['victim_mean_us']:.0f} us.\n"
        f"Worst case (all bins filled, best of 5): decide_keep_alive "
        f"{micro['decide_keep_alive']:.0f} us, with prewarm "
        f"{micro['decide_keep_alive_prewarm']:.0f} us; choose_victims over 16 models "
        f"{micro['choose_victims_16']:.0f} us, admission_wait_s "
        f"{micro['admission_wait_16']:.0f} us."
    )
    lat.update({f"{k}_worst_us": v for k, v in micro.items()})
    if args.json is not None:
        out = {
            "params": {
                "days": args.days,
                "seed": args.seed,
                "beta": args.beta,
                "vram_gb": args.vram_gb,
                "warmup_days": args.warmup_days,
                "min_s": args.min_s,
                "max_s": args.max_s,
                "default_s": args.default_s,
            },
            "elapsed_s": elapsed,
            "latency": lat,
            "runs": runs,
        }
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    if args.plot is not None:
        for run in runs:
            print(f"wrote {plot(run, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
