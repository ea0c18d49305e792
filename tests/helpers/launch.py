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
