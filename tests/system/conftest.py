"""Fixtures of the system test: the built deb and a booted Debian 12 container."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from machine import (
    TIMINGS,
    Machine,
    apt_archives,
    cache_dir,
    prepare_debs,
    rootfs_tarball,
    step,
    unpack_rootfs,
)

ROOT = Path(__file__).resolve().parents[2]
SIM_DIR = ROOT / "tests" / "sim"
SIM_IN_ROOT = "usr/local/lib/llmd-sim"


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package, built from this tree by the documented command."""
    out = tmp_path_factory.mktemp("dist")
    with step("build the deb"):
        r = subprocess.run(
            [str(ROOT / "packaging/build-deb"), "--out", str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip())


@pytest.fixture(scope="module")
def machine(deb: Path) -> Iterator[Machine]:
    """A booted bookworm container holding the deb (not installed) and the simulator."""
    cache = cache_dir()
    with step("rootfs tarball (debootstrap when not cached)"):
        tarball = rootfs_tarball(cache)
    with step("unpack the rootfs"):
        root = unpack_rootfs(cache, tarball)
    try:
        shutil.copy(deb, root / "root" / deb.name)
        # The simulator plays `ollama` and `nvidia-smi`, found on the unit's default PATH.
        shutil.copytree(
            SIM_DIR, root / SIM_IN_ROOT, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        for tool in ("ollama", "nvidia-smi"):
            link = root / "usr/local/bin" / tool
            link.symlink_to(f"/{SIM_IN_ROOT}/{tool}")
        archives = apt_archives(cache)
        with step("download the deb's dependencies (apt cache)"):
            prepare_debs(root, archives, f"/root/{deb.name}")
        m = Machine(root, f"llmd-test-{os.getpid()}", binds=[f"{archives}:/var/cache/apt/archives"])
        try:
            with step("boot the container"):
                m.boot()
            yield m
        finally:
            with step("power off the container"):
                m.shutdown()
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    # The steps of an incremental class build on each other: after one fails, skip the rest
    # rather than bury the first failure under its consequences.
    failed = call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception)
    independent = item.name in getattr(item.cls, "independent", ())
    if failed and getattr(item.cls, "incremental", False) and not independent:
        item.parent._failed_step = item.name  # type: ignore[union-attr]


def pytest_runtest_setup(item: pytest.Item) -> None:
    failed = getattr(item.parent, "_failed_step", None)
    if failed is not None and getattr(item.cls, "incremental", False):
        pytest.skip(f"an earlier step failed: {failed}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("system test steps")
        for name, took in TIMINGS:
            terminalreporter.write_line(f"{took:7.1f}s  {name}")
        terminalreporter.write_line(f"{sum(t for _, t in TIMINGS):7.1f}s  total")
