"""LoRA adapters in PEFT's folder layout: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names each tensor `base_model.model.<module>.lora_A.weight` (and `lora_B`), where <module> is
the module's path in the transformers model in memory, and its `target_modules` are matched
against those paths too. A family's `key_map` (regexes over module paths, applied with
`state.rename`) turns our paths into transformers' (`models/llava.py:PEFT_KEY_MAP`); Llama needs
none, its names are transformers'. Loading is strict, like `state.load_state`: a missing,
unexpected or mis-shaped tensor raises `CheckpointError` naming the tensor and the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from torch import nn

from vlmlab.checkpoints.hf import _read_file, read_json, write_json, write_safetensors
from vlmlab.checkpoints.state import KeyMap, _listing, load_state, rename
from vlmlab.errors import CheckpointError, ConfigError
from vlmlab.nn.lora import (LoRAConfig, LoRALinear, apply_lora, linear_layers, lora_state_dict, matches_target,
                            merge_lora)
from vlmlab.nn.quant import Int4Linear

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def _peft_targets(chosen: set[str], linears: list[str]) -> list[str] | str:
    """The plainest `target_modules` that selects exactly `chosen` among `linears` (transformers'
    module paths): name suffixes if they suffice, else a regex with layer numbers as \\d+, else
    the exact names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    layered = "|".join(sorted({r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in n.split("."))
                               for n in chosen}))
    for targets in (suffixes, layered):
        if {n for n in linears if matches_target(targets, n)} == chosen:
            return targets
    return "|".join(re.escape(n) for n in sorted(chosen))


def save_adapter(net: nn.Module, folder: str | os.PathLike, cfg: LoRAConfig, *,
                 base_model_name_or_path: str | None = None, key_map: KeyMap = ()) -> None:
    """Write the adapters of `net` (made by `apply_lora(net, cfg)`) as a PEFT adapter folder."""
    hf = {name: rename(name, key_map) for name, _ in linear_layers(net)}
    adapters = {name: m for name, m in net.named_modules() if isinstance(m, LoRALinear)}
    if not adapters:
        raise ConfigError(f"{type(net).__name__} has no LoRA adapters to save (apply_lora first)")
    for name, m in adapters.items():
        if m.r != cfg.r or m.scaling != cfg.scaling:
            raise ConfigError(f"LoRA layer '{name}' has r={m.r}, scaling={m.scaling}; the config says "
                              f"r={cfg.r}, scaling={cfg.scaling}")
    tensors = {}
    for key, t in lora_state_dict(net).items():
        module, leaf = re.fullmatch(r"(.*)\.(lora_[AB]\.weight)", key).groups()
        tensors[f"{PREFIX}{hf[module]}.{leaf}"] = t
    targets = _peft_targets({hf[n] for n in adapters}, list(hf.values()))
    folder = Path(folder)
    write_safetensors(folder / WEIGHTS, tensors)
    write_json(folder / CONFIG, cfg.to_peft(target_modules=targets, base_model_name_or_path=base_model_name_or_path))


def load_adapter(net: nn.Module, folder: str | os.PathLike, *, key_map: KeyMap = (), merge: bool = False) -> list[str]:
    """Add the PEFT adapter in `folder` to `net` (in place) and return the adapted module names;
    `merge=True` folds it into the weights at once. The file's keys are checked before `net` is
    touched; a shape mismatch is found while loading, and leaves `net` with fresh adapters.

    A 4-bit target (`Int4Linear`) cannot take the update into its codes without re-rounding
    them: with `merge=True` it keeps the adapter beside them as a frozen low-rank term
    (`Int4Linear.add_low_rank`); without, it is refused (a trainable adapter needs a dense layer)."""
    folder = Path(folder)
    config_path, weights = folder / CONFIG, folder / WEIGHTS
    try:
        cfg = LoRAConfig.from_peft(read_json(config_path, "PEFT adapter config", error=CheckpointError))
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    layers = {**dict(linear_layers(net)), **{n: m for n, m in net.named_modules() if isinstance(m, Int4Linear)}}
    hf = {name: rename(name, key_map) for name in layers}
    chosen = [name for name, path in hf.items() if matches_target(cfg.target_modules, path)]
    if not chosen:
        raise ConfigError(f"{config_path}: target_modules {cfg.target_modules!r} match no linear layer of "
                          f"{type(net).__name__}")
    quantized = [name for name in chosen if isinstance(layers[name], Int4Linear)]
    if quantized and not merge:
        raise ConfigError(f"{config_path}: '{quantized[0]}' has 4-bit weights; an adapter can only be merged into "
                          "4-bit layers (load without keep_adapter, or without quantization to train it)")
    if not weights.is_file():
        pickled = " (only a pickled adapter_model.bin is there; vlmlab reads safetensors only)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{weights}: not found{pickled}")
    tensors = _read_file(weights)
    ours = {f"{PREFIX}{hf[n]}.{leaf}": f"{n}.{leaf}" for n in chosen for leaf in ("lora_A.weight", "lora_B.weight")}
    unexpected, missing = set(tensors) - set(ours), set(ours) - set(tensors)
    if unexpected:
        raise CheckpointError(f"{weights}: unexpected tensor(s) {_listing(unexpected)}: no LoRA layer of "
                              f"{type(net).__name__} selected by target_modules {cfg.target_modules!r} has that name")
    if missing:
        raise CheckpointError(f"{weights}: missing tensor(s) {_listing(missing)}")
    theirs = {ours_key: key for key, ours_key in ours.items()}
    for name in quantized:  # shapes first, so a bad file leaves every layer as it was
        layer = layers[name]
        for key, shape in ((theirs[f"{name}.lora_A.weight"], (cfg.r, layer.in_features)),
                           (theirs[f"{name}.lora_B.weight"], (layer.out_features, cfg.r))):
            if tuple(tensors[key].shape) != shape:
                raise CheckpointError(f"{weights}: tensor '{key}' has shape {tuple(tensors[key].shape)}, "
                                      f"expected {shape}")
    dense = [name for name in chosen if name not in quantized]
    names = apply_lora(net, dataclasses.replace(cfg, target_modules="|".join(re.escape(n) for n in dense))) \
        if dense else []
    adapter_keys = {f"{n}.{leaf}" for n in names for leaf in ("lora_A.weight", "lora_B.weight")}
    load_state(net, {ours[k]: t for k, t in tensors.items() if ours[k] in adapter_keys}, origin=str(weights),
               optional=[k for k in net.state_dict() if k not in adapter_keys])
    for name in quantized:
        a, b = (tensors[theirs[f"{name}.lora_{ab}.weight"]].float() for ab in "AB")
        layers[name].add_low_rank(a, b * cfg.scaling)
    if merge:
        merge_lora(net)
    return names + quantized
