"""Tests for llmd.planner: placement, sizes, argument parsing, output and the pinned check."""

from __future__ import annotations

import argparse
import json

import pytest

from llmd.planner import (
    PlanModel,
    add_arguments,
    parse_model_arg,
    plan,
    render,
    table_footprint,
    table_size_gb,
)

GiB = 1 << 30


def _models(*args: str) -> list[PlanModel]:
    return [parse_model_arg(a) for a in args]


WORKED = ("codellama,7,Q5_K_M,1", "mistral,7,Q4_K_M,2", "phi3,4,Q4_K_M,3")


def test_worked_example() -> None:
    """codellama, mistral and phi3 take 6.02 + 4.96 + 2.71 = 13.69 GB of 24 GB VRAM, no spill."""
    p = plan(_models(*WORKED), vram_gb=24, ram_gb=64)
    assert p.to_json() == {
        "vram": [
            {"name": "codellama", "quant": "Q5_K_M", "vram_gb": 6.02},
            {"name": "mistral", "quant": "Q4_K_M", "vram_gb": 4.96},
            {"name": "phi3", "quant": "Q4_K_M", "vram_gb": 2.71},
        ],
        "ram_spillover": [],
        "total_vram_gb": 13.69,
        "total_ram_gb": 0,
    }


def test_priority_order_and_spill() -> None:
    """Most important models go first; one that does not fit spills; later small ones still fit."""
    models = _models(
        "small,4,Q4_K_M,3",  # 2.71
        "big,34,Q8_0,2",  # 41.3: spills
        "first,13,Q8_0,1",  # 15.93
        "mid,7,Q8_0,3",  # 9.09: after small, 18.64 + 9.09 > 24: spills
    )
    p = plan(models, vram_gb=24, ram_gb=64)
    doc = p.to_json()
    assert [m["name"] for m in doc["vram"]] == ["first", "small"]
    assert [(m["name"], m["ram_gb"]) for m in doc["ram_spillover"]] == [
        ("big", 41.3),
        ("mid", 9.09),
    ]
    assert doc["total_vram_gb"] == 18.64 and doc["total_ram_gb"] == 50.39
    assert all("3-10x slower" in m["warning"] for m in doc["ram_spillover"])
    assert "ram_warning" not in doc


def test_exact_fit_stays_in_vram() -> None:
    """A model that brings VRAM use to exactly the limit fits."""
    p = plan(_models(*WORKED), vram_gb=13.69, ram_gb=0)
    assert len(p.vram) == 3 and p.ram == []


def test_ties_keep_argument_order() -> None:
    """Models of equal priority are placed in the order given."""
    p = plan(_models("b,7,Q8_0,1", "a,7,Q8_0,1", "c,7,Q8_0,1"), vram_gb=10, ram_gb=64)
    assert [m.name for m in p.vram] == ["b"] and [m.name for m in p.ram] == ["a", "c"]


def test_ram_warning() -> None:
    """Spill-over beyond --ram-gb adds ram_warning to the JSON."""
    doc = plan(_models("x,34,Q8_0,1", "y,13,Q8_0,2"), vram_gb=8, ram_gb=32).to_json()
    assert doc["total_ram_gb"] == 57.23
    assert doc["ram_warning"] == "spill-over of 57.23 GB exceeds the 32.00 GB of RAM"


def test_json_shape() -> None:
    """The JSON has exactly the documented keys at each level."""
    doc = plan(_models("x,34,Q8_0,1", "y,4,Q8_0,2"), vram_gb=8, ram_gb=1).to_json()
    assert set(doc) == {"vram", "ram_spillover", "total_vram_gb", "total_ram_gb", "ram_warning"}
    assert set(doc["vram"][0]) == {"name", "quant", "vram_gb"}
    assert set(doc["ram_spillover"][0]) == {"name", "quant", "ram_gb", "warning"}
    assert json.loads(json.dumps(doc)) == doc


def test_measured_sizes_used_as_is() -> None:
    """A measured model's size gets no 18% overhead."""
    measured = PlanModel("llama3.1:8b", "Q4_K_M", 6.1234, 1, measured=True)
    p = plan([measured, *_models("phi3,4,Q4_K_M,2")], vram_gb=9, ram_gb=0)
    assert p.to_json()["vram"] == [
        {"name": "llama3.1:8b", "quant": "Q4_K_M", "vram_gb": 6.12},
        {"name": "phi3", "quant": "Q4_K_M", "vram_gb": 2.71},
    ]


@pytest.mark.parametrize(
    ("arg", "quant", "size_gb"),
    [
        ("a,7,Q4_K_M,1", "Q4_K_M", 4.2),
        ("a,7,q4_k_m,1", "Q4_K_M", 4.2),
        ("a,7B,Q4_K,1", "Q4_K_M", 4.2),
        ("a,13,q5_k_m,1", "Q5_K_M", 9.4),
        ("a,34,Q8,1", "Q8_0", 35.0),
        ("a,4.0,q8_0,1", "Q8_0", 4.0),
        (" a , 7 , Q8-0 , 1 ", "Q8_0", 7.7),
    ],
)
def test_parse_model_arg(arg: str, quant: str, size_gb: float) -> None:
    """Quant spellings are accepted case-insensitively and sizes looked up in the table."""
    m = parse_model_arg(arg)
    assert (m.name, m.quant, m.size_gb, m.priority, m.measured) == ("a", quant, size_gb, 1, False)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("a,7,Q3_K_S,1", "a: unknown quant 'Q3_K_S': expected one of Q4_K_M, Q5_K_M, Q8_0"),
        ("a,8,Q4_K_M,1", "a: unknown size '8': PARAMS_B must be one of 4, 7, 13, 34"),
        ("a,7,Q4_K_M,high", "a: PRIORITY must be an integer"),
        ("a,7,Q4_K_M", "expected NAME,PARAMS_B,QUANT,PRIORITY"),
        (",7,Q4_K_M,1", "expected NAME,PARAMS_B,QUANT,PRIORITY"),
    ],
)
def test_parse_model_arg_errors(arg: str, message: str) -> None:
    """A bad --model value is an ArgumentTypeError naming the valid choices."""
    with pytest.raises(argparse.ArgumentTypeError) as e:
        parse_model_arg(arg)
    assert message in str(e.value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmctl plan")
    add_arguments(parser)
    return parser


def test_add_arguments() -> None:
    """add_arguments gives repeatable --model, --vram-gb, --ram-gb and --json."""
    args = _parser().parse_args(
        ["--model", WORKED[0], "--model", WORKED[1], "--vram-gb", "24", "--ram-gb", "64", "--json"]
    )
    assert [m.name for m in args.models] == ["codellama", "mistral"]
    assert (args.vram_gb, args.ram_gb, args.json) == (24.0, 64.0, True)
    args = _parser().parse_args([])
    assert (args.models, args.vram_gb, args.ram_gb, args.json) == ([], None, None, False)
    shared = argparse.ArgumentParser()
    shared.add_argument("--json", action="store_true")
    add_arguments(shared, json_flag=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "a,8,Q4_K_M,1"], "argument --model: a: unknown size '8'"),
        (["--vram-gb", "-1"], "argument --vram-gb: expected a number of GB"),
        (["--ram-gb", "lots"], "argument --ram-gb: expected a number of GB"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse reports bad plan arguments with the planner's message and exit status 2."""
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_render_worked_example() -> None:
    """The human table lists each model, where it goes and the totals."""
    text = render(plan(_models(*WORKED), vram_gb=24, ram_gb=64))
    lines = text.splitlines()
    assert lines[0].split() == ["PRIORITY", "NAME", "QUANT", "GB", "WHERE"]
    assert lines[1].split() == ["1", "codellama", "Q5_K_M", "6.02*", "VRAM"]
    assert lines[3].split() == ["3", "phi3", "Q4_K_M", "2.71*", "VRAM"]
    assert "VRAM     13.69 of 24.00 GB" in lines
    assert "RAM       0.00 of 64.00 GB spill-over" in lines
    assert "warning" not in text


def test_render_warnings() -> None:
    """Spilled models and RAM overflow are shown as warnings."""
    text = render(plan(_models("x,34,Q8_0,1"), vram_gb=8, ram_gb=16))
    assert text.splitlines()[1].split() == ["1", "x", "Q8_0", "41.30*", "RAM"]
    assert "warning: x does not fit in VRAM and spills to RAM; a RAM-spilled model runs" in text
    assert "warning: spill-over of 41.30 GB exceeds the 16.00 GB of RAM" in text
    assert "(no models)" in render(plan([], vram_gb=8, ram_gb=16))


def test_table_size_gb() -> None:
    """The table holds the documented GB per quant and size."""
    assert [table_size_gb(s, "Q4_K_M") for s in (4, 7, 13, 34)] == [2.3, 4.2, 7.9, 20.0]
    assert [table_size_gb(s, "Q5_K_M") for s in (4, 7, 13, 34)] == [2.8, 5.1, 9.4, 23.8]
    assert [table_size_gb(s, "Q8_0") for s in (4, 7, 13, 34)] == [4.0, 7.7, 13.5, 35.0]


@pytest.mark.parametrize(
    ("parameter_size", "quant", "expected_gb"),
    [
        ("7B", "Q4_K_M", 4.2 * 1.18),
        ("8.0B", "Q4_K_M", 4.2 * 8 / 7 * 1.18),  # scaled from the nearest row
        ("70.6B", "Q4_K_M", 20.0 * 70.6 / 34 * 1.18),
        ("494.03M", "Q8_0", 4.0 * 0.49403 / 4 * 1.18),
        ("7B", "F16", None),
        ("", "Q4_K_M", None),
    ],
)
def test_table_footprint(parameter_size: str, quant: str, expected_gb: float | None) -> None:
    """Ollama details map onto the table (+18%), scaled by parameter count; unknown quants None."""
    got = table_footprint(parameter_size, quant)
    assert got == (None if expected_gb is None else round(expected_gb * 10**9))
