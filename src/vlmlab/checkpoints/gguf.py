"""GGUF files (llama.cpp's format): metadata, tokenizer fields and dequantized tensors.

The header (metadata key/values and the tensor table) is parsed here: the `gguf` package's
reader builds a numpy view per array element, which takes seconds for a 49k-token vocabulary,
while reading it with `struct` takes milliseconds. Tensor data is memory-mapped and
dequantized by the `gguf` package (the format's reference code). Every failure, including a
header that lies about lengths or a file cut short, is a `CheckpointError` naming the file.

Layout (little-endian, versions 2 and 3): magic "GGUF", u32 version, u64 tensor count, u64
key/value count, the key/values, the tensor infos (name, dims fastest-first, type, offset),
then the tensor data from the next multiple of `general.alignment` (default 32).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Container, Iterator

import numpy as np
import torch

from vlmlab.errors import CheckpointError, ConfigError

# Tensor types we promise to read (the gguf package also dequantizes others, which we accept).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

# 4-bit block formats whose codes map exactly onto an int4 kernel (bytes per block of 32 weights).
INT4_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
INT4_TYPES = tuple(INT4_BLOCK_BYTES)

# Plain numpy types of the unquantized tensor kinds (the rest are byte blocks for `dequantize`).
_PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table. `shape` is row-major (the file stores dims fastest first)."""

    name: str
    kind: str  # GGML type name: F32, Q4_1, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    """An opened GGUF file: `metadata` holds every key/value as Python values."""

    path: Path
    metadata: dict[str, Any]
    _tensors: list[GGUFTensor] = field(default_factory=list, repr=False)
    _data: np.ndarray | None = field(default=None, repr=False)  # the whole file, memory-mapped bytes

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

    def tensor_infos(self) -> list[GGUFTensor]:
        return list(self._tensors)

    def tensor_names(self) -> list[str]:
        return [t.name for t in self._tensors]

    def tensor_types(self) -> dict[str, str]:
        return {t.name: t.kind for t in self._tensors}

    def _raw(self, t: GGUFTensor) -> np.ndarray:
        """The stored data: typed for plain kinds, else bytes shaped (..., bytes per row)."""
        data = self._data[t.offset:t.offset + t.nbytes]
        if t.kind in _PLAIN:
            return data.view(_PLAIN[t.kind]).reshape(t.shape)
        return data.reshape(*t.shape[:-1], -1)

    def tensors(self, dtype: torch.dtype = torch.float32, skip: Container[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (gguf name, dequantized tensor in `dtype`), in file order, shaped row-major.

        Names in `skip` are not read (their 4-bit blocks were taken with `int4_blocks`)."""
        from gguf import GGMLQuantizationType, dequantize

        for t in self._tensors:
            if t.name in skip:
                continue
            try:
                raw = self._raw(t)
                if t.kind in _PLAIN:
                    arr = np.array(raw)  # a writable copy out of the read-only mapping
                else:
                    arr = np.ascontiguousarray(dequantize(raw, GGMLQuantizationType[t.kind])).reshape(t.shape)
                tensor = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
            except (NotImplementedError, ValueError, KeyError) as e:
                raise CheckpointError(f"{self.path}: cannot read tensor '{t.name}' of type {t.kind}: {e}") from None
            yield t.name, tensor.to(dtype)

    def int4_blocks(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A Q4_0 / Q4_1 matrix as (codes, scale, zero) with ``w = (codes - 8) * scale + zero``.

        codes: uint8 (rows, cols), one 4-bit code per weight; scale, zero: float32
        (rows, cols // 32). Exact: Q4_0 blocks are ``d * (q - 8)``, Q4_1 blocks ``d * q + m``.
        """
        t = next((t for t in self._tensors if t.name == name), None)
        kind = None if t is None else t.kind
        if kind not in INT4_TYPES:
            raise CheckpointError(f"{self.path}: tensor '{name}' is {kind or 'absent'}, not one of {', '.join(INT4_TYPES)}")
        rows = int(np.prod(t.shape[:-1]))
        blocks = self._raw(t).reshape(rows, -1, INT4_BLOCK_BYTES[kind])
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


# ---- header parsing ----------------------------------------------------------------------------

# GGUF value type ids -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Corrupt(Exception):
    pass


class _Cursor:
    """Reads little-endian values from a byte buffer, refusing to run past its end."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Corrupt(f"a length at byte {self.pos} points past the end of the file (file truncated?)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar("Q")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"a string at byte {self.pos - n} is not UTF-8") from None

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY or depth > 1:
            raise _Corrupt(f"unknown value type {kind} at byte {self.pos}")
        item, count = self.scalar("I"), self.scalar("Q")
        if item in _SCALARS:  # numeric arrays in one read
            fmt = _SCALARS[item]
            size = struct.calcsize("<" + fmt)
            return list(struct.unpack(f"<{count}{fmt}", self.take(count * size))) if count else []
        if count > len(self.buf) - self.pos:  # every element takes at least a byte
            raise _Corrupt(f"an array at byte {self.pos} claims {count} elements (file truncated?)")
        return [self.value(item, depth + 1) for _ in range(count)]


def _parse(path: Path, data: np.ndarray) -> tuple[dict[str, Any], list[GGUFTensor]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(memoryview(data))
    cur.take(4)  # magic, checked by the caller
    version = cur.scalar("I")
    if version not in (2, 3):
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        hint = " (a big-endian file, which vlmlab does not read)" if swapped in (2, 3) else ""
        raise _Corrupt(f"GGUF version {version} is not supported (2 or 3 expected){hint}")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    if n_tensors > len(data) or n_kv > len(data):
        raise _Corrupt(f"header claims {n_tensors} tensors and {n_kv} key/values")
    # The header counts first, under the names the gguf package's reader gives them.
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("I")
        if n_dims > 8:
            raise _Corrupt(f"tensor '{name}' claims {n_dims} dimensions")
        dims = [cur.scalar("Q") for _ in range(n_dims)]
        kind_id, offset = cur.scalar("I"), cur.scalar("Q")
        try:
            kind = GGMLQuantizationType(kind_id)
        except ValueError:
            raise _Corrupt(f"tensor '{name}' has unknown type id {kind_id}") from None
        infos.append((name, dims, kind, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise _Corrupt(f"general.alignment is {alignment!r}")
    start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, dims, kind, offset in infos:
        block, block_bytes = GGML_QUANT_SIZES[kind]
        n = int(np.prod(dims)) if dims else 1
        if dims and dims[0] % block:
            raise _Corrupt(f"tensor '{name}' of type {kind.name} has {dims[0]} columns, not a multiple of {block}")
        nbytes = n // block * block_bytes
        if start + offset + nbytes > len(data):
            raise _Corrupt(f"tensor '{name}' ends past the end of the file (file truncated?)")
        tensors.append(GGUFTensor(name, kind.name, tuple(int(d) for d in reversed(dims)), start + offset, nbytes))
    return metadata, tensors


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file (memory-mapped). Corrupt or truncated files raise `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        metadata, tensors = _parse(path, data)
    except (_Corrupt, struct.error) as e:
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({e})") from None
    return GGUFFile(path=path, metadata=metadata, _tensors=tensors, _data=data)
