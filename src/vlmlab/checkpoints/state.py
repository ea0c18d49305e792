"""Putting checkpoint tensors into a module: key-map tables and strict checks.

Key maps are lists of (regex, replacement) applied in order to every checkpoint name; they live
next to each family. `load_state` refuses to guess: a missing, unexpected or mis-shaped tensor
raises `CheckpointError` naming the tensor and the file it came from (or should have).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
from torch import nn

from vlmlab.errors import CheckpointError

KeyMap = list[tuple[str, str]]


def rename(name: str, key_map: KeyMap) -> str:
    """Apply every (pattern, replacement) of `key_map` to `name`, in order."""
    for pattern, repl in key_map:
        name = re.sub(pattern, repl, name)
    return name


def _listing(names: Iterable[str], limit: int = 6) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_state(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    origin: Mapping[str, str] | str,
    ignore: Iterable[str] = (),
    optional: Iterable[str] = (),
    dtype: torch.dtype | None = None,
) -> None:
    """Load `tensors` (already renamed to the module's names) into `module`, strictly.

    origin: the file every tensor came from, or a name -> file map (sharded checkpoints).
    ignore: regexes of checkpoint names that are known to be safe to drop (legacy buffers).
    optional: module names that may be absent (tied weights set after loading).
    dtype: cast floating-point tensors to this dtype (default: the module's parameter dtype).
    """

    def where(name: str) -> str:
        return origin if isinstance(origin, str) else origin.get(name, "the checkpoint")

    files = sorted({origin} if isinstance(origin, str) else set(origin.values())) or ["the checkpoint"]
    ignore_re = [re.compile(p) for p in ignore]
    expected = module.state_dict()
    given = {k: v for k, v in tensors.items() if not any(r.search(k) for r in ignore_re)}
    unexpected = set(given) - set(expected)
    if unexpected:
        first = sorted(unexpected)[0]
        raise CheckpointError(
            f"{where(first)}: unexpected tensor(s) {_listing(unexpected)} that the model "
            f"({type(module).__name__}) does not have"
        )
    missing = set(expected) - set(given) - set(optional)
    if missing:
        raise CheckpointError(f"{', '.join(files)}: missing tensor(s) {_listing(missing)}")
    for name, tensor in given.items():
        want = expected[name]
        if want.is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"{where(name)}: tensor '{name}' has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                "expected a floating-point dtype"
            )
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{where(name)}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                f"expected {tuple(want.shape)}"
            )
    target = {}
    for name, tensor in given.items():
        cast = dtype or expected[name].dtype
        target[name] = tensor.to(cast) if tensor.is_floating_point() else tensor
    module.load_state_dict(target, strict=False, assign=True)
