"""Hugging Face folders: config.json, safetensors (single file or sharded), atomic writes.

Only safetensors are read; pickled checkpoints (pytorch_model.bin) are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vlmlab.errors import CheckpointError, ConfigError, VlmlabError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_json(
    path: str | os.PathLike,
    what: str = "JSON file",
    *,
    optional: bool = False,
    error: type[VlmlabError] = ConfigError,
) -> dict[str, Any]:
    """Read a JSON object; a malformed (or, unless `optional`, missing) file raises `error` naming it."""
    path = Path(path)
    if not path.is_file():
        if optional:
            return {}
        raise error(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(folder) / "config.json", "config.json")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def read_safetensors(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a folder's model.safetensors (or its shards) and the file each came from."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        index = read_json(folder / INDEX, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{folder / INDEX}: has no 'weight_map' object")
        tensors: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        for shard in sorted(set(weight_map.values())):
            path = folder / shard
            if not path.is_file():
                raise CheckpointError(f"{folder / INDEX}: shard file {shard} is missing")
            for name, t in _read_file(path).items():
                tensors[name] = t
                origin[name] = str(path)
        listed_missing = set(weight_map) - set(tensors)
        if listed_missing:
            name = sorted(listed_missing)[0]
            raise CheckpointError(f"{folder / weight_map[name]}: tensor '{name}' listed in the index is missing")
        return tensors, origin
    path = folder / SINGLE
    if not path.is_file():
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise CheckpointError(
                f"{folder}: only pickled weights (.bin/.pt) found; vlmlab reads safetensors only "
                "(convert them with a trusted tool first)"
            )
        raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX}")
    tensors = _read_file(path)
    return tensors, {name: str(path) for name in tensors}


def _temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file in `path`'s folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def _plain_mode() -> int:
    """The permissions open() gives a new file (mkstemp's 0600 would make saved models unreadable
    to other users)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file so that readers see either the old or the complete new content."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _plain_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """Save tensors (made contiguous, shared storage broken) atomically."""
    fd, tmp = _temp_beside(Path(path))
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        os.chmod(tmp, _plain_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def require_positive(config: Any, names: tuple[str, ...], *, integer: bool = True, what: str = "config") -> None:
    """Raise ConfigError naming the first field of `config` (a dataclass) that is not a positive
    integer (or, integer=False, a positive number). Every family config checks its sizes with it."""
    for name in names:
        value = getattr(config, name)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            kind = "integer" if integer else "number"
            raise ConfigError(f"{what} field '{name}' must be a positive {kind}, got {value!r}")
