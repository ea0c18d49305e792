"""Is bfloat16 worth it on this machine? Matrix-product throughput in float32 vs bfloat16.

Prints the CPU's model and the features vlmlab.hardware reads (AVX-512 BF16, AMX), then GFLOP/s of
square products (`a @ b`) and of a linear layer (`F.linear`, what every model layer runs), each
dtype timed in the same run. Where bfloat16 is not native the ratio is tiny, and `--dtype auto`
(or `dtype="auto"`) keeps such a machine on float32.

    python benchmarks/dtypes.py [--sizes 256,1024,2048] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vlmlab.hardware import fast_bfloat16

try:  # the decode benchmark's machine description, when run from the repository
    from lm_decode import cpu_model
except ImportError:  # pragma: no cover
    def cpu_model() -> str:
        return "unknown CPU"


def gflops(fn, flops: float, seconds: float) -> float:
    fn()  # warm-up (oneDNN picks and caches its kernel on first use)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n * flops / elapsed / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256,1024,2048", help="square sizes n (n x n @ n x n)")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement (at least one call)")
    args = ap.parse_args()
    cpu = torch.cpu
    print(f"{cpu_model()}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"capability {torch.backends.cpu.get_cpu_capability()}; avx512_bf16 {cpu._is_avx512_bf16_supported()}; "
          f"amx {cpu._is_amx_tile_supported()}; native bfloat16 (vlmlab.hardware) {fast_bfloat16('cpu')}")
    print("| op | n | float32 GFLOP/s | bfloat16 GFLOP/s | bfloat16 / float32 |")
    print("|---|---:|---:|---:|---:|")
    for n in (int(s) for s in args.sizes.split(",")):
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        for op, fn in (("matmul", torch.matmul), ("linear", F.linear)):
            rates = [gflops(lambda x=a.to(dt), y=b.to(dt): fn(x, y), 2 * n**3, args.seconds)
                     for dt in (torch.float32, torch.bfloat16)]
            print(f"| {op} | {n} | {rates[0]:.1f} | {rates[1]:.2f} | {rates[1] / rates[0]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
