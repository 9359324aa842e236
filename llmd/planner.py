"""The allocation planner behind `llmctl plan`: which models fit in VRAM, which spill to RAM."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Model file sizes in GB by quantisation and parameter count (billions).
SIZE_TABLE_GB: dict[str, dict[int, float]] = {
    "Q4_K_M": {4: 2.3, 7: 4.2, 13: 7.9, 34: 20.0},
    "Q5_K_M": {4: 2.8, 7: 5.1, 13: 9.4, 34: 23.8},
    "Q8_0": {4: 4.0, 7: 7.7, 13: 13.5, 34: 35.0},
}
PARAM_SIZES = (4, 7, 13, 34)
# KV cache, compute graph and CUDA context on top of a table size; measured sizes already have it.
OVERHEAD = 0.18
# Other spellings of the table's quantisations (llama.cpp's quantize accepts Q4_K and Q5_K).
QUANT_ALIASES = {"Q8": "Q8_0", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
SPILL_WARNING = "does not fit in VRAM and spills to RAM; a RAM-spilled model runs 3-10x slower"
GB = 10**9


@dataclass(frozen=True)
class PlanModel:
    """A model to place: a table size (overhead added) or a measured size (used as is)."""

    name: str
    quant: str
    size_gb: float
    priority: int
    measured: bool = False

    @property
    def planned_gb(self) -> float:
        """Size the plan reserves, rounded to 2 decimals."""
        return round(self.size_gb if self.measured else self.size_gb * (1 + OVERHEAD), 2)


def normalize_quant(quant: str) -> str:
    """The table's spelling of a quantisation, case-insensitively; ValueError if unknown."""
    q = quant.strip().upper().replace("-", "_")
    q = QUANT_ALIASES.get(q, q)
    if q not in SIZE_TABLE_GB:
        valid = ", ".join(SIZE_TABLE_GB)
        raise ValueError(f"unknown quant {quant!r}: expected one of {valid} (or Q8 for Q8_0)")
    return q


def table_size_gb(params_b: str | float, quant: str) -> float:
    """The table's file size in GB (no overhead); ValueError naming the valid sizes or quants."""
    q = normalize_quant(quant)
    text = str(params_b).strip()
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*[bB]?", text)
    size = float(m.group(1)) if m else None
    if size is None or size not in PARAM_SIZES:
        valid = ", ".join(str(s) for s in PARAM_SIZES)
        raise ValueError(f"unknown size {text!r}: PARAMS_B must be one of {valid}")
    return SIZE_TABLE_GB[q][int(size)]


def table_footprint(parameter_size: str, quant: str) -> int | None:
    """Bytes from the table (+18%) for an Ollama details pair like ("8.0B", "Q4_K_M"), or None.

    Sizes between rows are scaled from the nearest row's GB per billion parameters.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([MB])\s*", parameter_size.upper())
    try:
        q = normalize_quant(quant)
    except ValueError:
        return None
    if m is None:
        return None
    params_b = float(m.group(1)) / (1000 if m.group(2) == "M" else 1)
    if params_b <= 0:
        return None
    row = min(PARAM_SIZES, key=lambda s: abs(s - params_b))
    gb = SIZE_TABLE_GB[q][row] * params_b / row
    return round(gb * (1 + OVERHEAD) * GB)


def parse_model_arg(text: str) -> PlanModel:
    """Parse `--model NAME,PARAMS_B,QUANT,PRIORITY` (an argparse type)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4 or not parts[0]:
        raise argparse.ArgumentTypeError(
            f"expected NAME,PARAMS_B,QUANT,PRIORITY (e.g. mistral,7,Q4_K_M,2), got {text!r}"
        )
    name, params_b, quant, priority = parts
    try:
        size_gb = table_size_gb(params_b, quant)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{name}: {e}") from None
    try:
        prio = int(priority)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{name}: PRIORITY must be an integer (lower = more important), got {priority!r}"
        ) from None
    return PlanModel(name, normalize_quant(quant), size_gb, prio)


def _gb_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of GB (0 or more), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    """Add the plan options: --model, --vram-gb, --ram-gb and (unless the CLI shares one) --json."""
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        type=parse_model_arg,
        default=[],
        metavar="NAME,PARAMS_B,QUANT,PRIORITY",
        help=(
            f"a model to place (repeatable): PARAMS_B one of {', '.join(map(str, PARAM_SIZES))}, "
            f"QUANT one of {', '.join(SIZE_TABLE_GB)}, PRIORITY lower = more important"
        ),
    )
    parser.add_argument("--vram-gb", type=_gb_arg, default=None, help="GPU memory in GB")
    parser.add_argument("--ram-gb", type=_gb_arg, default=None, help="system RAM for spill-over")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print the plan as JSON")


@dataclass(frozen=True)
class Placement:
    """One model and where the plan puts it: "VRAM" or "RAM"."""

    model: PlanModel
    where: str


@dataclass(frozen=True)
class Plan:
    """Where each model goes, in placement (priority) order."""

    placements: list[Placement]
    vram_gb: float
    ram_gb: float

    @property
    def vram(self) -> list[PlanModel]:
        """Models placed in VRAM."""
        return [p.model for p in self.placements if p.where == "VRAM"]

    @property
    def ram(self) -> list[PlanModel]:
        """Models spilled to RAM."""
        return [p.model for p in self.placements if p.where == "RAM"]

    @property
    def total_vram_gb(self) -> float:
        """GB placed in VRAM."""
        return round(sum(m.planned_gb for m in self.vram), 2)

    @property
    def total_ram_gb(self) -> float:
        """GB spilled to RAM."""
        return round(sum(m.planned_gb for m in self.ram), 2)

    @property
    def ram_warning(self) -> str | None:
        """Set when the spill-over does not fit in RAM either."""
        if self.total_ram_gb <= self.ram_gb:
            return None
        return f"spill-over of {self.total_ram_gb:.2f} GB exceeds the {self.ram_gb:.2f} GB of RAM"

    def to_json(self) -> dict[str, Any]:
        """The `llmctl plan --json` document."""
        doc: dict[str, Any] = {
            "vram": [
                {"name": m.name, "quant": m.quant, "vram_gb": m.planned_gb} for m in self.vram
            ],
            "ram_spillover": [
                {"name": m.name, "quant": m.quant, "ram_gb": m.planned_gb, "warning": _spill(m)}
                for m in self.ram
            ],
            "total_vram_gb": self.total_vram_gb,
            "total_ram_gb": self.total_ram_gb,
        }
        if self.ram_warning is not None:
            doc["ram_warning"] = self.ram_warning
        return doc


def _spill(m: PlanModel) -> str:
    return f"{m.name} {SPILL_WARNING}"


def plan(models: Sequence[PlanModel], vram_gb: float, ram_gb: float) -> Plan:
    """Place models in priority order (ties keep their order), each in VRAM if it still fits."""
    placements = []
    used = 0.0
    for m in sorted(models, key=lambda m: m.priority):  # sorted() is stable
        size = m.planned_gb
        # Sizes are rounded to 2 decimals, so allow for float error in the sum.
        if used + size <= vram_gb + 1e-9:
            placements.append(Placement(m, "VRAM"))
            used += size
        else:
            placements.append(Placement(m, "RAM"))
    return Plan(placements, vram_gb, ram_gb)


def render(p: Plan) -> str:
    """The plan as a table for people."""
    rows = [("PRIORITY", "NAME", "QUANT", "GB", "WHERE")]
    for pl in p.placements:
        m = pl.model
        size = f"{m.planned_gb:.2f}" + ("" if m.measured else "*")
        rows.append((str(m.priority), m.name, m.quant, size, pl.where))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for r in rows:
        cells = [r[0].rjust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2])]
        cells += [r[3].rjust(widths[3]), r[4]]
        lines.append("  ".join(cells).rstrip())
    if not p.placements:
        lines.append("(no models)")
    lines.append("")
    lines.append(f"VRAM  {p.total_vram_gb:8.2f} of {p.vram_gb:.2f} GB")
    lines.append(f"RAM   {p.total_ram_gb:8.2f} of {p.ram_gb:.2f} GB spill-over")
    if any(not pl.model.measured for pl in p.placements):
        lines.append(f"* table size + {OVERHEAD:.0%} overhead; other sizes are measured")
    lines += [f"warning: {_spill(m)}" for m in p.ram]
    if p.ram_warning:
        lines.append(f"warning: {p.ram_warning}")
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"
