"""Gradient checkpointing (activation recomputation): trade compute for memory in training.

A layer stack holds `gradient_checkpointing = False`; `set_gradient_checkpointing(net, True)`
turns it on everywhere in a network, and the stack runs each layer through `call`, which keeps
only the layer's input for the backward pass and recomputes the rest. Only while training with
gradients enabled; inference is unaffected.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def call(stack: nn.Module, layer: nn.Module, *args: Any) -> Any:
    """`layer(*args)`, recomputed in the backward pass when `stack` checkpoints and is training."""
    if getattr(stack, "gradient_checkpointing", False) and stack.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def set_gradient_checkpointing(net: nn.Module, enabled: bool = True) -> int:
    """Switch checkpointing on (or off) in every layer stack of `net`; returns how many stacks."""
    n = 0
    for module in net.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = enabled
            n += 1
    return n
