"""What this machine computes fast: whether bfloat16 is worth asking for.

bfloat16 halves memory traffic, but its matrix products are only fast where the hardware
multiplies bfloat16 natively: CUDA GPUs (Ampere and later) and x86 CPUs with AVX-512 BF16 or
AMX. Elsewhere (an AVX2-only CPU, say) PyTorch falls back to scalar loops: measured on a 2-core
AVX2 EPYC, a 2048x2048 bfloat16 product ran at 0.17 GFLOP/s against 68 in float32, and a
bfloat16 model or bf16 autocast training there is several to hundreds of times slower, not faster
(a scenes-clip ViT training step: 4.3x).
vlmlab picks bfloat16 only when asked: `dtype="auto"` (`--dtype auto`) takes it where it is native,
and asking for it elsewhere warns.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def fast_bfloat16(device: str = "cpu") -> bool:
    """True when `device` ("cpu", "cuda", "cuda:1", ...) multiplies bfloat16 matrices natively."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return True  # other accelerators: trust the caller
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def fast_dtype(device: str = "cpu") -> torch.dtype:
    """The quickest dtype on `device` that stays close to float32: bfloat16 where it is native,
    else float32 (what `dtype="auto"` means)."""
    return torch.bfloat16 if fast_bfloat16(device) else torch.float32


class SlowPrecisionWarning(UserWarning):
    """bfloat16 was asked for on a device without native bfloat16 matrix products."""


def warn_if_slow_bfloat16(dtype: torch.dtype | str, device: str = "cpu", what: str = "this model") -> bool:
    """Warn (once per call site) when `dtype` is bfloat16 and `device` lacks native bfloat16;
    returns whether it warned. The work still runs: the answer is right, only slow."""
    if dtype not in (torch.bfloat16, "bfloat16", "bf16") or fast_bfloat16(device):
        return False
    warnings.warn(
        f"{what} runs in bfloat16, but this {device.upper() if device == 'cpu' else device} has no native "
        "bfloat16 matrix products (no AVX-512 BF16 or AMX): it will be far slower than float32 "
        "(use float32 / fp32 here)", SlowPrecisionWarning, stacklevel=3)
    return True
