"""The nvml probe against a real NVIDIA GPU (skipped without one, PyTorch or pynvml)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("nvml_check.py")

pytestmark = pytest.mark.gpu


def test_nvml_probe_sees_torch_allocation() -> None:
    """A 2 GiB PyTorch allocation raises the probe's used memory by ~2 GiB; freeing undoes it."""
    if not Path("/dev/nvidiactl").exists() and shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA GPU (no /dev/nvidiactl, no nvidia-smi)")
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed")
    # The check runs in its own process so CUDA state never leaks into the test session.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, timeout=300
    )
    if proc.returncode == 77:
        pytest.skip(json.loads(proc.stdout)["skip"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is True
    assert abs(result["grew_mib"] - 2048) <= 256
