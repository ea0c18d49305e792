"""Run a helper script of this folder in a subprocess, as one process or under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HELPERS = Path(__file__).parent


def run_helper(script: str, *args: object, procs: int = 1, port: int = 29533, timeout: int = 600) -> None:
    """`python HELPERS/script args...` with one thread per process; procs > 1: under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPERS)}
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(procs), "--master_port", str(port)]
    subprocess.run([*launcher, str(HELPERS / script), *map(str, args)], check=True, env=env, timeout=timeout,
                   capture_output=True)


def assert_same_training(metrics_a: Path, metrics_b: Path, weights_a: Path, weights_b: Path) -> None:
    """Two 3-step runs logged the same losses (1e-5) and saved the same weights (1e-4)."""
    import pytest
    import torch
    from safetensors.torch import load_file

    from vlmlab.train.trainer import read_metrics

    a, b = read_metrics(metrics_a), read_metrics(metrics_b)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    wa, wb = load_file(weights_a), load_file(weights_b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=0)  # Adam amplifies float noise in tiny grads
