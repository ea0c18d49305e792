"""Feed-forward blocks: the two-layer MLP (ViT, CLIP, BERT, projectors) and the gated MLP (SwiGLU)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.nn.packed import packed_call


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x), computed as transformers
    computes it. Its gradient is silu'(1.702 x) (silu(u) = u sigmoid(u)), which PyTorch has as one
    fused kernel: two passes over the activations in the backward instead of autograd's six, and
    only x kept for it."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _QuickGELU.apply(x)
    return torch.sigmoid(1.702 * x).mul_(x)


class _QuickGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sigmoid(1.702 * x).mul_(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, 1.702 * x)


# Names as Hugging Face configs spell them (`hidden_act`), so configs map without translation.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called `name` in a config; unknown names raise naming the choices."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with act='silu' (Llama, Qwen2, Mistral), GeGLU with 'gelu_tanh'."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = packed_call(self, "gate_up", x) or (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)
