"""Memory's decisions (admission, victims, waiting, pressure relief, pinned fit) over a fake probe
and fake children: one 16 GiB GPU, high watermark 0.95 (15.2 GiB), low 0.85, no reserve."""

from __future__ import annotations

from typing import Any

import pytest
from fakes import Facts, GiB, Rig, make_config, rig

from llmd import policy
from llmd.childapi import Pulled
from llmd.memory import Admission
from llmd.models import Model, MState, NoRoom, policy_inputs
from llmd.policy import IdleHistogram


def resident(
    r: Rig,
    name: str,
    gib: float,
    *,
    idle_s: float = 0.0,
    in_flight: int = 0,
    state: MState = MState.LOADED,
    backend: str = "b0",
) -> Model:
    """A model record holding `gib` on the GPU (as the fake child and the probe see it too)."""
    size = int(gib * GiB)
    r.apis[backend].loaded[name] = (size, size)
    return Model(
        name,
        backend,
        state=state,
        size=size,
        size_vram=size,
        in_flight=in_flight,
        idle_since=None if in_flight else r.clock.now - idle_s,
    )


async def ask(
    r: Rig,
    name: str,
    gib: float,
    models: list[Model],
    *,
    waited_s: float = 0.0,
    may_evict: bool = True,
) -> Admission:
    """One look at a cold load of `name`, of measured size `gib`, on backend b0."""
    m = Model(name, "b0", size=int(gib * GiB))
    load = await r.memory.cold_load(m, r.child, {}, may_evict=may_evict)
    assert load is not None
    return r.memory.admit(load, models, waited_s=waited_s)


# Holders: (name, GiB, priority, idle seconds, in flight, pinned). The requester is new:1b.
Holder = tuple[str, float, int, float, int, bool]

VICTIM_CASES = [
    pytest.param([("a:1b", 6, 5, 600, 0, False)], 3, 5, False, (True, (), False), id="fits"),
    pytest.param(
        [("a:1b", 6, 5, 600, 0, False), ("b:1b", 6, 7, 10, 0, False)],
        6,
        5,
        False,
        (False, ("b:1b",), False),
        id="least-important-first",
    ),
    pytest.param(
        [("a:1b", 6, 5, 600, 0, False), ("b:1b", 6, 5, 60, 0, False)],
        6,
        5,
        False,
        (False, ("a:1b",), False),
        id="longest-idle-first",
    ),
    pytest.param(
        [("a:1b", 6, 7, 600, 0, True), ("b:1b", 6, 5, 60, 0, False)],
        6,
        5,
        False,
        (False, ("b:1b",), False),
        id="pinned-kept",
    ),
    pytest.param(
        [("a:1b", 6, 7, 0, 1, False), ("b:1b", 6, 5, 60, 0, False)],
        6,
        5,
        False,
        (False, ("b:1b",), False),
        id="busy-kept",
    ),
    pytest.param(
        [("a:1b", 6, 1, 600, 0, False), ("b:1b", 6, 5, 60, 0, False)],
        6,
        5,
        False,
        (False, ("b:1b",), False),
        id="more-important-kept",
    ),
    pytest.param(
        [("a:1b", 6, 0, 0, 1, False), ("b:1b", 6, 7, 0, 1, False)],
        6,
        3,
        True,
        (False, ("b:1b",), True),
        id="preempt-busy-less-important",
    ),
    pytest.param(
        [("a:1b", 6, 5, 600, 0, False), ("b:1b", 6, 5, 60, 0, False)],
        12,
        5,
        False,
        (False, ("a:1b", "b:1b"), False),
        id="needs-two",
    ),
]


@pytest.mark.parametrize(("holders", "gib", "priority", "preempt", "expected"), VICTIM_CASES)
async def test_admission_names_victims_by_priority_and_idleness(
    holders: list[Holder],
    gib: float,
    priority: int,
    preempt: bool,
    expected: tuple[bool, tuple[str, ...], bool],
) -> None:
    """A cold load is admitted when it fits, else memory names the least important, longest
    idle victims, never pinned, busy (unless preempting a less important one) or more
    important than the requester."""
    models: list[dict[str, Any]] = [
        {"name": n, "priority": p, "pin": pinned} for n, _, p, _, _, pinned in holders
    ]
    models.append({"name": "new:1b", "priority": priority, "preempt": preempt})
    async with rig(make_config(models)) as r:
        records = [
            resident(r, n, size, idle_s=idle, in_flight=busy)
            for n, size, _, idle, busy, _ in holders
        ]
        a = await ask(r, "new:1b", gib, records)
    assert (a.admitted, a.victims, a.preempt) == expected
    if a.victims:
        assert a.why.startswith(f"to make room for new:1b (needs {gib:.1f} GiB, measured; ")


async def test_a_prewarm_that_does_not_fit_raises_no_room() -> None:
    """A pre-warm (may_evict=False) takes free memory only: it raises NoRoom rather than evict."""
    async with rig(make_config()) as r:
        records = [resident(r, "a:1b", 12, idle_s=600)]
        assert (await ask(r, "small:1b", 2, records, may_evict=False)).admitted
        with pytest.raises(NoRoom) as e:
            await ask(r, "new:1b", 6, records, may_evict=False)
    assert (e.value.message, e.value.retry_after_s) == ("new:1b does not fit in free GPU memory", 1)


@pytest.mark.parametrize("spill", [True, False])
async def test_a_model_allowed_to_spill_is_admitted_without_room(spill: bool) -> None:
    """With allow_cpu_spill a load that nothing can make room for is admitted at once; without,
    it waits."""
    cfg = make_config(
        [{"name": "pin:1b", "pin": True}, {"name": "new:1b", "allow_cpu_spill": spill}]
    )
    async with rig(cfg) as r:
        a = await ask(r, "new:1b", 6, [resident(r, "pin:1b", 12, idle_s=600)])
    assert a == (Admission(True) if spill else Admission(False, wait_s=1.0))


async def test_a_load_blocked_by_more_important_idle_models_waits_then_evicts() -> None:
    """Only a more important idle model could make room: the load waits policy.admission_wait_s,
    then evicts it."""
    cfg = make_config([{"name": "vip:1b", "priority": 2}, {"name": "new:1b", "priority": 3}])
    async with rig(cfg) as r:
        r.history.facts["vip:1b"] = Facts(load_s=1.0)
        vip = resident(r, "vip:1b", 12, idle_s=60)
        cand = policy.candidate(
            "vip:1b",
            policy_inputs(r.cfg, r.history, "vip:1b", vip),
            in_flight=0,
            size_bytes=vip.size,
            idle_s=60.0,
            hist=IdleHistogram(),
            beta=r.cfg.keep_alive.beta,
        )
        wait = policy.admission_wait_s([cand], 1, requester_priority=3)
        assert wait is not None and 0 < wait < r.cfg.gpu.admission_timeout
        assert await ask(r, "new:1b", 6, [vip]) == Admission(False, wait_s=1.0)
        a = await ask(r, "new:1b", 6, [vip], waited_s=wait * 0.99)
        assert (a.admitted, a.victims) == (False, ())
        a = await ask(r, "new:1b", 6, [vip], waited_s=wait)
        assert (a.admitted, a.victims) == (False, ("vip:1b",))


async def test_no_room_after_the_admission_timeout_names_the_holders() -> None:
    """When only pinned and busy models and other programs hold the memory, the load waits
    gpu.admission_timeout, then gets NoRoom naming each holder."""
    cfg = make_config([{"name": "pin:1b", "pin": True}])
    async with rig(cfg) as r:
        r.probe.other = 2 * GiB
        records = [resident(r, "busy:1b", 6, in_flight=1), resident(r, "pin:1b", 6, idle_s=600)]
        assert await ask(r, "new:1b", 6, records, waited_s=29.5) == Admission(False, wait_s=0.5)
        with pytest.raises(NoRoom) as e:
            await ask(r, "new:1b", 6, records, waited_s=30)
    assert e.value.retry_after_s == 30
    assert e.value.message == (
        "not enough GPU memory for new:1b: it needs 6.0 GiB (measured) and 1.2 GiB is free on "
        "GPU 0 under gpu.high_watermark 0.95 and gpu.reserve; held by busy:1b (6.0 GiB, "
        "priority 5, 1 request(s) in flight), pin:1b (6.0 GiB, priority 5, pinned), other "
        "programs (2.0 GiB); waited 30s"
    )


# Who holds 4 GiB of the 16 when a 10.5 GiB model asks: it fits under the high watermark
# (11.2 GiB) but not within Ollama's pre-flight 80% of free memory (9.6 GiB).
PREFLIGHT_CASES = [
    pytest.param(None, None, (True, ()), id="other-programs"),
    pytest.param(MState.LOADED, "b0", (False, ("a:1b",)), id="loaded-in-same-child"),
    pytest.param(MState.LOADING, "b0", (False, ()), id="loading-in-same-child"),
    pytest.param(MState.LOADED, "b1", (True, ()), id="loaded-in-another-child"),
]


@pytest.mark.parametrize(("state", "backend", "expected"), PREFLIGHT_CASES)
async def test_admission_keeps_within_ollamas_preflight_limit(
    state: MState | None, backend: str | None, expected: tuple[bool, tuple[str, ...]]
) -> None:
    """With another model resident in the same child, a newcomer must fit in 80% of the free
    memory (else Ollama would evict on its own); other programs and other children do not
    count for that."""
    async with rig(make_config(backends=("b0", "b1"))) as r:
        if state is None or backend is None:
            r.probe.other = 4 * GiB
            records = []
        else:
            records = [resident(r, "a:1b", 4, idle_s=600, state=state, backend=backend)]
        a = await ask(r, "new:1b", 10.5, records)
    assert (a.admitted, a.victims) == expected


async def test_an_admitted_load_holds_its_memory_until_released() -> None:
    """A load admitted but not yet seen by the probe keeps its memory reserved, so a second
    cold load is not admitted into it until release()."""
    async with rig(make_config()) as r:
        assert (await ask(r, "a:1b", 8, [])).admitted
        assert await ask(r, "b:1b", 8, []) == Admission(False, wait_s=1.0)
        assert (await ask(r, "a:1b", 8, [])).admitted  # its own reservation is not in its way
        r.memory.release("a:1b")
        assert (await ask(r, "b:1b", 8, [])).admitted


# Idle a:1b (idle 10 min) and b:1b (idle 1 min), busy c:1b and pinned d:1b (sizes in GiB) and
# other programs hold 15.5 GiB: relief brings the GPU down to 13.6 GiB if it can.
RELIEF_CASES = [
    pytest.param({"a": 1, "b": 1, "c": 5, "d": 5}, 3.5, ("a:1b", "b:1b"), id="two-needed"),
    pytest.param({"a": 2, "b": 2, "c": 4, "d": 4}, 3.5, ("a:1b",), id="one-enough"),
    pytest.param({"a": 1, "c": 5, "d": 5}, 4.5, ("a:1b",), id="not-enough-frees-what-it-can"),
    pytest.param({"c": 5, "d": 5}, 5.5, None, id="nothing-may-go"),
]
IDLE_S = {"a": 600.0, "b": 60.0, "d": 6000.0}


@pytest.mark.parametrize(("sizes", "other_gib", "victims"), RELIEF_CASES)
async def test_relief_evicts_idle_models_down_to_the_low_watermark(
    sizes: dict[str, float], other_gib: float, victims: tuple[str, ...] | None
) -> None:
    """Above the high watermark, relief names idle models (longest idle first) to bring the GPU
    down to the low watermark, or as near as it can, never a pinned or busy one."""
    async with rig(make_config([{"name": "d:1b", "pin": True}])) as r:
        r.probe.other = int(other_gib * GiB)
        records = [
            resident(r, f"{n}:1b", gib, idle_s=IDLE_S.get(n, 0.0), in_flight=int(n == "c"))
            for n, gib in sizes.items()
        ]
        assert [d.index for d in await r.memory.over_watermark()] == [0]
        device = (await r.memory.read()).devices[0]
        relief = r.memory.relief(device, records)
    assert (relief.victims if relief else None) == victims
    if relief is not None:
        assert relief.why == (
            f"GPU 0 at 97% of 16.0 GiB, above gpu.high_watermark 0.95 "
            f"(other programs hold {other_gib:.1f} GiB)"
        )


@pytest.mark.parametrize(("other_gib", "over"), [(0, False), (15.2 * 0.99, False), (15.3, True)])
async def test_over_watermark_lists_gpus_above_the_high_watermark(
    other_gib: float, over: bool
) -> None:
    """over_watermark lists the GPUs whose used memory is above gpu.high_watermark."""
    async with rig(make_config()) as r:
        r.probe.other = int(other_gib * GiB)
        assert bool(await r.memory.over_watermark()) is over


PINNED_CASES = [
    pytest.param(False, None, None, True, None, id="one-pin"),
    pytest.param(True, None, None, True, ["p1:1b", "p2:1b"], id="two-pins"),
    pytest.param(False, None, "p2:1b", True, ["p1:1b", "p2:1b"], id="one-pin-and-extra"),
    pytest.param(False, "h:1b", None, True, ["h:1b", "p1:1b"], id="config-and-runtime-pin"),
    pytest.param(True, None, None, False, None, id="unknown-size-left-out"),
]


@pytest.mark.parametrize(("pin_p2", "runtime_pin", "extra", "p2_known", "named"), PINNED_CASES)
async def test_pinned_fit_error_says_when_pinned_models_cannot_stay_together(
    pin_p2: bool,
    runtime_pin: str | None,
    extra: str | None,
    p2_known: bool,
    named: list[str] | None,
) -> None:
    """The pinned models (config, `llmctl pin`, plus an extra one) that together exceed the GPUs
    under the high watermark are named with their sizes; models of unknown size are left out."""
    cfg = make_config(
        [
            {"name": "p1:1b", "pin": True, "backend": "b0"},
            {"name": "p2:1b", "pin": pin_p2, "backend": "b0"},
        ]
    )
    async with rig(cfg) as r:
        for name in ("p1:1b", "h:1b") + (("p2:1b",) if p2_known else ()):
            r.history.facts[name] = Facts(size=8 * GiB)
        if runtime_pin is not None:
            r.history.pinned.add(runtime_pin)
            r.backends.set_tags("b0", [Pulled.from_json({"name": runtime_pin})])
        error = await r.memory.pinned_fit_error(r.cfg, {}, extra)
    if named is None:
        assert error is None
    else:
        listed = ", ".join(f"{n} (8.0 GiB)" for n in named)
        assert error == (
            "pinned models need 16.0 GiB together but the GPUs hold 15.2 GiB under "
            f"gpu.high_watermark and gpu.reserve: {listed}; unpin one or add GPU memory"
        )
