"""4-bit weight-only linear layers: decode at a quarter of the bfloat16 weight traffic.

A batch-1 decoder step streams every weight once, so bytes per weight set its speed. GGUF
checkpoints already store most linears in 4 bits (Q4_0, Q4_1: blocks of 32 weights sharing a
scale, and for Q4_1 a minimum). `Int4Linear` keeps those bits and multiplies with PyTorch's CPU
int4 kernel (`torch._weight_int4pack_mm_for_cpu`), which dequantizes a group at a time inside
the GEMV instead of materialising a dense matrix.

Both GGUF formats map exactly onto the kernel's form ``w = (q - 8) * scale + zero``:
Q4_0 is ``d * (q - 8)`` (scale d, zero 0) and Q4_1 is ``d * q + m`` (scale d, zero m + 8d).
The kernel takes scale and zero in the activation dtype, bfloat16 on this path, so they are
rounded to bfloat16: the same relative rounding a dense bfloat16 copy of the weights has.
Activations in other dtypes are cast to bfloat16 for the product and back.

A LoRA adapter cannot be merged into 4-bit codes without re-rounding them, so an `Int4Linear`
can carry it beside the codes instead: a frozen low-rank term ``x A^T B^T`` (the adapter's
scaling folded into B), added after the kernel's product (`add_low_rank`; what
`checkpoints.peft.load_adapter(merge=True)` does for a 4-bit layer). It is kept and computed in
float32 whatever the activations: products this small run several times faster in float32 than
in bfloat16 on CPUs (one row through a rank-48 pair: 10 us against 56 us, AMX Xeon, 2026-12-08).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.errors import CheckpointError

GROUP_SIZE = 32  # weights per scale/zero group in GGUF's Q4_0 and Q4_1
# The int4 kernel is a matrix-vector design: faster than a packed dense bfloat16 product up to about
# 4 rows, 2x slower at 8 and 6x at a 259-token prefill (SmolLM2's 3072 x 576 on an AMX Xeon,
# 2026-12-08). A packed layer (`nn.packed.pack_for_inference`) therefore gets a dense copy too, for
# calls with more rows than this.
INT4_MAX_ROWS = 4


@dataclass
class Int4Weight:
    """A (out, in) weight as 4-bit codes with per-group affine parameters.

    ``w[n, k] = (code[n, k] - 8) * scale[n, k // group] + zero[n, k // group]``. Codes are stored
    two per byte (low nibble = even column) so the weight costs half a byte per entry.
    """

    codes: torch.Tensor  # uint8 (out, in // 2)
    scale: torch.Tensor  # float32 (out, in // group)
    zero: torch.Tensor  # float32 (out, in // group)
    group_size: int = GROUP_SIZE

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = GROUP_SIZE):
        """From one code (0..15) per entry, shape (out, in)."""
        codes = codes.to(torch.uint8)
        return cls((codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), scale.float(), zero.float(), group_size)

    def unpacked_codes(self) -> torch.Tensor:
        """One code per entry, (out, in), uint8."""
        return torch.stack([self.codes & 0xF, self.codes >> 4], dim=-1).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        q = self.unpacked_codes().float().reshape(out, inp // self.group_size, self.group_size)
        w = (q - 8) * self.scale[..., None] + self.zero[..., None]
        return w.reshape(out, inp).to(dtype)

    def rows(self, index: torch.Tensor) -> "Int4Weight":
        """The weight with its output rows reordered (e.g. undoing llama.cpp's Q/K permutation)."""
        return Int4Weight(self.codes[index], self.scale[index], self.zero[index], self.group_size)

    @staticmethod
    def cat(weights: Sequence["Int4Weight"]) -> "Int4Weight":
        """Stack along the output dimension (fusing sibling projections)."""
        if len({w.group_size for w in weights}) != 1:
            raise ValueError("cannot fuse int4 weights with different group sizes")
        return Int4Weight(
            torch.cat([w.codes for w in weights]),
            torch.cat([w.scale for w in weights]),
            torch.cat([w.zero for w in weights]),
            weights[0].group_size,
        )


def int4_kernel_available() -> bool:
    """Whether this PyTorch build has the CPU int4 weight-only matmul."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


class Int4Linear(nn.Module):
    """A frozen linear layer (or several fused along the output) with 4-bit weights.

    `forward` returns the concatenated outputs; `sizes` says how to split them. The bias, if
    any, stays a dense parameter (loaded like any other tensor). An optional low-rank term
    (`low_rank_A` (R, in), `low_rank_B` (out, R), frozen float32 tensors, not parameters or
    buffers, so that a dtype cast of the network leaves them in float32) is added to the product;
    fused layers stack their members' terms (`ranks` says whose columns of B are whose, B being
    block-diagonal).
    """

    def __init__(
        self,
        weight: Int4Weight,
        bias: torch.Tensor | None = None,
        sizes: Sequence[int] | None = None,
        has_bias: Sequence[bool] | None = None,
    ):
        super().__init__()
        out, inp = weight.shape
        if inp % weight.group_size:
            raise ValueError(f"in_features {inp} is not a multiple of the group size {weight.group_size}")
        self.in_features, self.out_features = inp, out
        self.sizes = list(sizes) if sizes is not None else [out]
        self.has_bias = list(has_bias) if has_bias is not None else [bias is not None] * len(self.sizes)
        self.weight_int4 = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._kernel_args: tuple[torch.Tensor, int, torch.Tensor] | None = None  # built on first use
        self.ranks = [0] * len(self.sizes)
        self.low_rank_A: torch.Tensor | None = None
        self.low_rank_B: torch.Tensor | None = None
        # The dequantized weight in bfloat16, packed for oneDNN, for calls of more than
        # INT4_MAX_ROWS rows (prefill, batches); set by packing, dropped by unpacking.
        self.dense_packed: torch.Tensor | None = None

    def add_low_rank(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add ``x a^T b^T`` to the output from now on: a (r, in), b (out, r), e.g. a LoRA
        adapter's A and scaling * B. Only on an unfused layer without one."""
        if len(self.sizes) > 1 or self.low_rank_A is not None:
            raise ValueError("add_low_rank: the layer is fused or has a low-rank term already")
        r = a.shape[0]
        if a.shape != (r, self.in_features) or b.shape != (self.out_features, r):
            raise ValueError(f"add_low_rank: shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit a "
                             f"({self.out_features}, {self.in_features}) layer")
        self.low_rank_A, self.low_rank_B = a.detach().float().clone(), b.detach().float().clone()
        self.ranks = [r]

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight this layer multiplies by, low-rank term included (summed in float32)."""
        w = self.weight_int4.dequantize()
        if self.low_rank_A is not None:
            w = w + self.low_rank_B @ self.low_rank_A
        return w.to(dtype)

    def kernel_args(self) -> tuple[torch.Tensor, int, torch.Tensor]:
        """The weight in the kernel's layout: packed codes, group size, and (in // group, out, 2)
        scale/zero pairs in the activation dtype. Built once, on first use (after any fusing)."""
        if self._kernel_args is None:
            w = self.weight_int4
            packed = torch._convert_weight_to_int4pack_for_cpu(w.unpacked_codes().to(torch.int32), 1)
            scales_and_zeros = torch.stack([w.scale, w.zero], dim=-1).transpose(0, 1).contiguous().bfloat16()
            self._kernel_args = (packed, w.group_size, scales_and_zeros)
        return self._kernel_args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        flat = rows.to(torch.bfloat16)
        if self.dense_packed is not None and flat.shape[0] > INT4_MAX_ROWS:
            y = torch.ops.mkldnn._linear_pointwise(flat, self.dense_packed, None, "none", [], "")
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat, *self.kernel_args())
        if self.low_rank_A is not None:
            y = y + F.linear(F.linear(rows.float(), self.low_rank_A), self.low_rank_B)  # in float32
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @classmethod
    def fuse(cls, layers: Sequence["Int4Linear"]) -> "Int4Linear":
        """One layer computing the outputs of `layers` (which read the same input) in one call."""
        biases = [lay.bias for lay in layers]
        bias = None
        if any(b is not None for b in biases):
            ref = next(b for b in biases if b is not None)
            bias = torch.cat([b.detach() if b is not None else ref.new_zeros(lay.out_features)
                              for b, lay in zip(biases, layers)])
        fused = cls(
            Int4Weight.cat([lay.weight_int4 for lay in layers]),
            bias,
            [s for lay in layers for s in lay.sizes],
            [h for lay in layers for h in lay.has_bias],
        )
        terms = [lay for lay in layers if lay.low_rank_A is not None]
        if terms:  # A stacked, B block-diagonal: one product for all members' terms
            fused.ranks = [r for lay in layers for r in lay.ranks]
            fused.low_rank_A = torch.cat([lay.low_rank_A for lay in terms])
            fused.low_rank_B = torch.zeros(fused.out_features, sum(fused.ranks))
            row = col = 0
            for lay in layers:
                if lay.low_rank_A is not None:
                    fused.low_rank_B[row:row + lay.out_features, col:col + lay.ranks[0]] = lay.low_rank_B
                row, col = row + lay.out_features, col + lay.ranks[0]
        return fused

    def split(self) -> list["Int4Linear"]:
        """Undo `fuse`: one layer per original projection."""
        layers, start, col = [], 0, 0
        for size, has_bias, rank in zip(self.sizes, self.has_bias, self.ranks):
            rows = torch.arange(start, start + size)
            bias = self.bias.detach()[start:start + size].clone() if has_bias else None
            layer = Int4Linear(self.weight_int4.rows(rows), bias)
            if rank:
                layer.add_low_rank(self.low_rank_A[col:col + rank], self.low_rank_B[start:start + size, col:col + rank])
            layers.append(layer)
            start, col = start + size, col + rank
        return layers

    def extra_repr(self) -> str:
        low_rank = f", low rank {self.ranks}" if any(self.ranks) else ""
        return (f"in_features={self.in_features}, out_features={self.sizes}, "
                f"int4 group={self.weight_int4.group_size}{low_rank}")


def use_int4_weights(net: nn.Module, weights: dict[str, Int4Weight]) -> None:
    """Replace the `nn.Linear` owning each ``<module>.weight`` key by an `Int4Linear` with that weight.

    The replaced layer's bias (if any) becomes the new layer's bias parameter, still to be
    loaded; the weight key is consumed, so a strict loader no longer expects it.
    """
    for key, weight in weights.items():
        path, _, leaf = key.rpartition(".")
        parent_path, _, name = path.rpartition(".")
        try:
            old = net.get_submodule(parent_path)._modules.get(name) if leaf == "weight" else None
        except AttributeError:
            old = None
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"tensor '{key}' is stored in 4 bits but the model has no linear layer '{path}'")
        if (old.out_features, old.in_features) != weight.shape:
            raise CheckpointError(
                f"tensor '{key}' has shape {weight.shape}, expected {(old.out_features, old.in_features)}"
            )
        parent = net.get_submodule(parent_path)
        bias = None if old.bias is None else torch.empty_like(old.bias, device=old.bias.device)
        parent._modules[name] = Int4Linear(weight, bias)


def dense_state_dict(net: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`net.state_dict()` plus the dequantized ``<layer>.weight`` of every 4-bit layer (to save;
    a low-rank term is merged into it)."""
    sd = net.state_dict()
    for name, module in net.named_modules():
        if isinstance(module, Int4Linear):
            if len(module.sizes) > 1:
                raise ValueError(f"{name} is fused; unpack the network before saving")
            sd[f"{name}.weight"] = module.dense_weight(dtype)
    return sd
