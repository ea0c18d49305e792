"""LoRA (Hu et al. 2021): a trainable low-rank update beside a frozen linear layer.

`LoRALinear` computes ``x W^T + b + scaling * (dropout(x) A^T) B^T`` with A (r, in) and B (out, r),
initialised as PEFT does (A Kaiming-uniform, B zeros, so a fresh adapter changes nothing).
It subclasses `nn.Linear` and keeps the very `weight` / `bias` tensors of the layer it replaces,
so base parameter names, tying and dtype stay as they were. `apply_lora` swaps matching layers
in place (targets matched as PEFT matches them); `merge_lora` folds the update into the weights
and restores plain `nn.Linear` modules (for saving, packing or speed). Freezing is the trainer's
business (learning rate 0, see `lora_param_groups`), not `requires_grad`'s. The PEFT files
(adapter_config.json, adapter_model.safetensors) are read and written by `checkpoints/peft.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.errors import ConfigError

Targets = tuple[str, ...] | str  # module-name suffixes, or one regex matched against the whole name


def matches_target(targets: Targets, name: str) -> bool:
    """PEFT's rule: a regex string must match the whole module name; a suffix must end it at a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# PEFT 0.21's LoraConfig fields with their defaults, in the order it writes them.
PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False,
    "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16,
    "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}
# Fields whose non-default values change what the adapter computes; vlmlab does not implement them.
PEFT_UNSUPPORTED = (
    "alpha_pattern", "bias", "exclude_modules", "fan_in_fan_out", "layer_replication", "layers_to_transform",
    "lora_bias", "modules_to_save", "rank_pattern", "target_parameters", "trainable_token_indices",
    "use_dora", "use_qalora", "alora_invocation_tokens", "arrow_config",
)


@dataclass
class LoRAConfig:
    """Which linear layers get adapters, and their rank, scale and dropout.

    target_modules: module-name suffixes ("q_proj", "down_proj") or one regex, as PEFT reads them.
    under: only modules inside this one (e.g. "language_model"); vlmlab-only, not a PEFT field.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: Targets = ("q_proj", "v_proj")
    under: str | None = None
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA field 'r' must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA field 'dropout' must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ConfigError("LoRA field 'target_modules' is empty")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def selects(self, name: str) -> bool:
        inside = self.under is None or name.startswith(self.under.rstrip(".") + ".")
        return inside and matches_target(self.target_modules, name)

    def to_peft(self, *, target_modules: list[str] | str | None = None,
                base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The adapter_config.json dict PEFT writes for this adapter. `target_modules` overrides
        ours when the checkpoint's module names differ from ours (see checkpoints/peft.py)."""
        targets = self.target_modules if target_modules is None else target_modules
        return {**PEFT_DEFAULTS, "base_model_name_or_path": base_model_name_or_path, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "r": self.r, "use_rslora": self.use_rslora,
                "target_modules": targets if isinstance(targets, str) else list(targets)}

    @classmethod
    def from_peft(cls, d: dict[str, Any]) -> "LoRAConfig":
        """From an adapter_config.json dict; features vlmlab does not implement raise ConfigError."""
        if d.get("peft_type") != "LORA":
            raise ConfigError(f"field 'peft_type' is {d.get('peft_type')!r}; only 'LORA' adapters are supported")
        for key in PEFT_UNSUPPORTED:
            value = d.get(key)
            if value and value != PEFT_DEFAULTS[key]:
                raise ConfigError(f"field '{key}' = {value!r} is not supported (expected {PEFT_DEFAULTS[key]!r})")
        targets = d.get("target_modules")
        if not targets or not isinstance(targets, (str, list)):
            raise ConfigError(f"field 'target_modules' must be a non-empty list or a regex, got {targets!r}")
        return cls(r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0) or 0.0,
                   target_modules=targets, use_rslora=bool(d.get("use_rslora", False)))


class LoRALinear(nn.Linear):
    """A linear layer plus a LoRA branch; `weight` and `bias` are the wrapped layer's own tensors."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32: what merging adds to the weight."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def linear_layers(net: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of every linear layer of `net` that is not itself part of a LoRA branch."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith((".lora_A", ".lora_B")):
            yield name, module


def _swap(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent), child, module)


def apply_lora(net: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace every `nn.Linear` that `cfg` selects with a `LoRALinear`, in place; returns their names.

    Leaves `requires_grad` alone. A selected module that is not a dense `nn.Linear` (a packed or
    4-bit layer, or one that already has an adapter) raises ConfigError, as does selecting nothing.
    """
    names = []
    for name, module in list(net.named_modules()):
        if not name or not cfg.selects(name) or name.endswith((".lora_A", ".lora_B")):
            continue
        if type(module) is not nn.Linear:
            what = "already has a LoRA adapter" if isinstance(module, LoRALinear) else (
                f"is a {type(module).__name__}, not a dense nn.Linear (unpack or dequantize it first)")
            raise ConfigError(f"LoRA target '{name}' {what}")
        _swap(net, name, LoRALinear(module, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora))
        names.append(name)
    if not names:
        where = f" under '{cfg.under}'" if cfg.under else ""
        raise ConfigError(f"LoRA target_modules {cfg.target_modules!r}{where} match no linear layer of "
                          f"{type(net).__name__}")
    return names


def merge_lora(net: nn.Module) -> int:
    """Fold every adapter into its base weight (summed in float32, cast back) and put plain
    `nn.Linear` modules holding the same weight/bias tensors back; returns how many were merged.

    A weight shared with another module (a tied output head) is refused: merging would change both.
    """
    owners: dict[int, list[str]] = {}
    for pname, p in net.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    adapters = [(name, m) for name, m in net.named_modules() if isinstance(m, LoRALinear)]
    for name, module in adapters:  # all checked before anything changes
        shared = [o for o in owners[id(module.weight)] if o != f"{name}.weight"]
        if shared:
            raise ConfigError(f"cannot merge the LoRA adapter of '{name}': its weight is shared with "
                              f"'{shared[0]}' (tied), and merging would change both")
    with torch.no_grad():
        for name, module in adapters:
            w = module.weight
            w.copy_((w.float() + module.delta_weight()).to(w.dtype))
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = module.weight, module.bias
            _swap(net, name, plain)
    return len(adapters)


def lora_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors: `<module>.lora_A.weight` and `<module>.lora_B.weight`."""
    return {k: v for k, v in net.state_dict().items() if re.search(r"\.lora_[AB]\.weight$", k)}


def lora_param_groups(names: list[str], lr: float) -> dict[str, float]:
    """`TrainConfig.param_groups` that train only the adapters of `names` (everything else lr 0)."""
    return {"": 0.0, **{f"{n}.{part}": lr for n in names for part in ("lora_A", "lora_B")}}
