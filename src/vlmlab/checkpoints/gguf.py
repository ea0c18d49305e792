"""GGUF files (llama.cpp's format): metadata, tokenizer fields and dequantized tensors.

Parsing and dequantization are done by the `gguf` package (the format's reference reader);
this module turns its output into plain Python values and torch tensors, and its failures into
`CheckpointError`s that name the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Container, Iterator

import numpy as np
import torch

from vlmlab.errors import CheckpointError, ConfigError

# Tensor types we promise to read (the gguf package also dequantizes others, which we accept).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


@dataclass
class GGUFFile:
    """An opened GGUF file: `metadata` holds every key/value as Python values."""

    path: Path
    metadata: dict[str, Any]
    _reader: Any = field(repr=False)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ConfigError(f"{self.path}: GGUF metadata has no 'general.architecture'")
        return arch

    def field(self, key: str, default: Any = ...) -> Any:
        """One metadata value; a missing key without a default raises naming key and file."""
        if key in self.metadata:
            return self.metadata[key]
        if default is ...:
            raise ConfigError(f"{self.path}: GGUF metadata field '{key}' is missing")
        return default

    def tensor_names(self) -> list[str]:
        return [t.name for t in self._reader.tensors]

    def tensor_types(self) -> dict[str, str]:
        return {t.name: t.tensor_type.name for t in self._reader.tensors}

    def tensors(self, dtype: torch.dtype = torch.float32, skip: Container[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (gguf name, dequantized tensor in `dtype`), in file order, shaped row-major.

        Names in `skip` are not read (their 4-bit blocks were taken with `int4_blocks`)."""
        from gguf import GGMLQuantizationType, dequantize

        for t in self._reader.tensors:
            if t.name in skip:
                continue
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            try:
                if t.tensor_type == GGMLQuantizationType.F32:
                    arr = np.asarray(t.data, dtype=np.float32)
                elif t.tensor_type == GGMLQuantizationType.F16:
                    arr = np.asarray(t.data, dtype=np.float16)
                else:
                    arr = dequantize(t.data, t.tensor_type)
                arr = np.ascontiguousarray(arr).reshape(shape)
                tensor = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
            except (NotImplementedError, ValueError) as e:
                raise CheckpointError(
                    f"{self.path}: cannot read tensor '{t.name}' of type {t.tensor_type.name}: {e}"
                ) from None
            yield t.name, tensor.to(dtype)


    def int4_blocks(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A Q4_0 / Q4_1 matrix as (codes, scale, zero) with ``w = (codes - 8) * scale + zero``.

        codes: uint8 (rows, cols), one 4-bit code per weight; scale, zero: float32
        (rows, cols // 32). Exact: Q4_0 blocks are ``d * (q - 8)``, Q4_1 blocks ``d * q + m``.
        """
        t = next((t for t in self._reader.tensors if t.name == name), None)
        kind = None if t is None else t.tensor_type.name
        if kind not in INT4_TYPES:
            raise CheckpointError(f"{self.path}: tensor '{name}' is {kind or 'absent'}, not one of {', '.join(INT4_TYPES)}")
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        blocks = np.asarray(t.data, dtype=np.uint8).reshape(rows, -1, INT4_BLOCK_BYTES[kind])
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if kind == "Q4_1":
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            zero = m + 8 * d
        else:
            zero = np.zeros_like(d)
        qs = blocks[..., -16:]
        # Within a block of 32: byte j holds weight j in its low nibble and weight j + 16 in its high one.
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)
        return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero)


# 4-bit block formats whose codes map exactly onto an int4 kernel (bytes per block of 32 weights).
INT4_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
INT4_TYPES = tuple(INT4_BLOCK_BYTES)


def _field_value(f: Any) -> Any:
    value = f.contents()
    if isinstance(value, (np.generic,)):
        value = value.item()
    return value


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file (memory-mapped). Corrupt or truncated files raise `CheckpointError`."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path)
        metadata = {key: _field_value(f) for key, f in reader.fields.items()}
    except Exception as e:  # the gguf package raises ValueError, IndexError, struct errors, ...
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    return GGUFFile(path=path, metadata=metadata, _reader=reader)
