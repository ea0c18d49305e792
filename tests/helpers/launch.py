"""Run a helper script of this folder in a subprocess, as one process or under torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

HELPERS = Path(__file__).parent


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for one torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_helper(script: str, *args: object, procs: int = 1, timeout: int = 600) -> None:
    """`python HELPERS/script args...` with one thread per process; procs > 1: under torchrun, on a
    fresh port (a fixed one can still be held by the previous run's rendezvous). A failure shows the
    helper's output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPERS)}
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(procs), "--master_port", str(free_port())]
    done = subprocess.run([*launcher, str(HELPERS / script), *map(str, args)], env=env, timeout=timeout,
                          capture_output=True, text=True)
    if done.returncode:
        raise AssertionError(f"{script} {' '.join(map(str, args))} (procs={procs}) exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


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
