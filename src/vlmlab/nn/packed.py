"""Inference-only packing of linear layers for fast CPU decoding.

At batch 1 a decoder step is a chain of matrix-vector products, so its speed is how fast the
weights stream from memory. PyTorch's default bfloat16 path reaches a fraction of the machine's
bandwidth on these shapes; oneDNN with weights reordered once into its blocked layout does much
better, and fusing the projections that read the same input (q/k/v, gate/up) halves the calls.

`pack_for_inference(net)` does both in place, `unpack(net)` restores ordinary `nn.Linear`
modules with the same weights (to save, convert or train). 4-bit layers (`nn/quant.py`) are
fused the same way and stay 4-bit; where oneDNN runs bfloat16 they also get a packed bfloat16
copy of their dequantized weight for calls of many rows (a prefill), which the int4 kernel runs
several times slower than a dense product: decoding streams 4 bits a weight, a prefill computes
in bfloat16 (the memory of a bfloat16 copy is the price). Apart from that, packing changes no
numbers: oneDNN computes the same products, and only bfloat16 is packed. Float32 keeps the
reference's kernels: packed float32 linears stream faster alone (SmolLM2's, 2 threads: 27 ms
against 39 ms) but `benchmarks/vlm.py`'s ask showed no gain end to end (docs/benchmarks.md,
2026-12-06) while the tied output layer's packed copy and the summation order would cost memory
and exact parity.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import torch
from torch import nn

from vlmlab.nn.quant import Int4Linear


def onednn_packing_available(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU can run oneDNN-packed linears in `dtype`."""
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    try:
        return bool(ops._is_mkldnn_bf16_supported()) and hasattr(ops, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """One or more linear layers over the same input, fused along the output dimension.

    The weight is stored in oneDNN's blocked layout (an opaque tensor); `forward` returns the
    concatenated outputs, which the caller splits with `sizes`. Frozen: it has no parameters.
    """

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.sizes = [lin.out_features for lin in linears]
        self.in_features = linears[0].in_features
        weight = torch.cat([lin.weight.detach() for lin in linears])
        self.has_bias = [lin.bias is not None for lin in linears]
        bias = None
        if any(self.has_bias):
            bias = torch.cat([
                lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features) for lin in linears
            ])
        self.register_buffer("bias", bias, persistent=False)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def unpack(self) -> list[nn.Linear]:
        """The original layers, with their weights back in ordinary dense tensors."""
        weight = self.packed.to_dense()
        layers, start = [], 0
        for size, has_bias in zip(self.sizes, self.has_bias):
            lin = nn.Linear(self.in_features, size, bias=has_bias, device="meta")
            lin.weight = nn.Parameter(weight[start:start + size].clone(), requires_grad=False)
            if has_bias:
                lin.bias = nn.Parameter(self.bias[start:start + size].clone(), requires_grad=False)
            layers.append(lin)
            start += size
        return layers

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.sizes}, onednn_packed"


# Groups of sibling linears that read the same input and are fused into one packed layer.
FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def packed_call(module: nn.Module, group: str, x: torch.Tensor) -> list[torch.Tensor] | None:
    """Outputs of a fused group if `module` has been packed, else None (caller runs its linears)."""
    packed = module._modules.get(group)
    if packed is None:
        return None
    return list(packed(x).split(packed.sizes, dim=-1))


def pack_for_inference(net: nn.Module) -> bool:
    """Fuse sibling projections and pack linears for fast inference, in place; True if anything changed.

    Dense linears are packed for oneDNN when the network's dtype supports it; 4-bit linears
    (`Int4Linear`) are fused in any dtype (they carry their own kernel) and, where oneDNN runs
    bfloat16, get a packed dense copy for calls of many rows (`Int4Linear.dense_packed`). Layers
    with an unmerged LoRA adapter (`nn/lora.py`) are left as they are, and so are their fusion
    siblings: merge first (`merge_lora`) for full speed.
    """
    dtypes = {p.dtype for p in net.parameters()}
    dense_ok = len(dtypes) == 1 and onednn_packing_available(dtypes.pop())
    changed = False
    # Hold the parents only: a list of every module would keep each replaced layer (and its weights)
    # alive until the end, doubling the peak memory.
    parents = [m for m in net.modules() if not isinstance(m, (nn.Linear, Int4Linear))]
    with torch.no_grad():
        for module in parents:
            for group, names in FUSED_GROUPS.items():
                members = [module._modules.get(n) for n in names]
                if all(isinstance(m, Int4Linear) for m in members):
                    module._modules[group] = Int4Linear.fuse([module._modules.pop(n) for n in names])
                elif dense_ok and all(type(m) is nn.Linear for m in members):
                    module._modules[group] = PackedLinear([module._modules.pop(n) for n in names])
                else:
                    continue
                changed = True
            for name, child in list(module._modules.items()):
                if dense_ok and type(child) is nn.Linear:
                    module._modules[name] = PackedLinear([child])
                    changed = True
        if onednn_packing_available(torch.bfloat16):
            for module in net.modules():
                if isinstance(module, Int4Linear) and module.dense_packed is None:
                    dense = module.weight_int4.dequantize(torch.bfloat16)
                    module.dense_packed = torch.ops.mkldnn._reorder_linear_weight(dense, 1)
                    changed = True
    if changed:
        release_freed_memory()
    return changed


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise: measured on SmolLM2 bf16,
    resident memory after packing drops from 884 to 651 MiB). A no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def unpack(net: nn.Module) -> None:
    """Undo `pack_for_inference`: ordinary `nn.Linear` modules (4-bit ones stay 4-bit, unfused)."""
    with torch.no_grad():
        for module in list(net.modules()):
            for name, child in list(module._modules.items()):
                names = FUSED_GROUPS.get(name, (name,))
                if isinstance(child, PackedLinear):
                    layers = child.unpack()
                elif isinstance(child, Int4Linear) and name in FUSED_GROUPS:
                    layers = child.split()
                else:
                    if isinstance(child, Int4Linear):
                        child.dense_packed = None
                    continue
                del module._modules[name]
                for n, lin in zip(names, layers):
                    module._modules[n] = lin
