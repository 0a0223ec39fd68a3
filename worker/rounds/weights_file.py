"""Model weights kept on disk instead of in RAM: a checkpoint's safetensors files, read a
tensor at a time, and a model's state spilled to a scratch file.

A round needs the champion's weights long after it has started changing them (the meta-step
interpolates between champion and fine-tuned weights; the champion is scored and probed for
diversity). Holding a second copy in RAM costs as much as the model; reading it back from the
champion's own files costs nothing until a tensor is wanted, and one tensor at a time.

The champion's files were verified against the manifest when the round loaded them;
:class:`FileWeights` remembers each file's identity (device, inode, size, mtime) from then
and refuses to read a file that has changed since, rather than interpolate toward weights
that are no longer the champion's.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

__all__ = [
    "FileWeights",
    "compatible",
    "load_into",
    "release",
    "spill",
    "swapped_in",
    "write_safetensors",
]

log = logging.getLogger(__name__)

_Identity = tuple[int, int, int, int]


def _identity(path: Path) -> _Identity:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _alias_key(t: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


class FileWeights(Mapping[str, Tensor]):
    """Read-only ``{state-dict key: CPU tensor}`` over safetensors files; each lookup reads
    one tensor from disk. ``aliases`` maps extra keys to stored ones (tied weights)."""

    def __init__(
        self, files: list[Path], aliases: dict[str, str] | None = None, owned: bool = False
    ) -> None:
        self.files = [Path(f) for f in files]
        self._ids = {f: _identity(f) for f in self.files}
        self._where: dict[str, Path] = {}
        for f in self.files:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    self._where[key] = f
        self._aliases = {a: k for a, k in (aliases or {}).items() if k in self._where}
        self._owned = owned  # scratch files: deleted by clear()

    @classmethod
    def of_checkpoint(cls, path: Path) -> FileWeights:
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")
        return cls(files)

    def _stored(self, key: str) -> str:
        return self._aliases.get(key, key)

    def __getitem__(self, key: str) -> Tensor:
        stored = self._stored(key)
        f = self._where.get(stored)
        if f is None:
            raise KeyError(key)
        if _identity(f) != self._ids[f]:
            raise RuntimeError(f"{f} changed on disk since it was verified; not reading it")
        with safe_open(str(f), framework="pt") as h:
            tensor: Tensor = h.get_tensor(stored)
        return tensor

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._stored(key) in self._where

    def __iter__(self) -> Iterator[str]:
        yield from self._where
        yield from self._aliases

    def __len__(self) -> int:
        return len(self._where) + len(self._aliases)

    def shape(self, key: str) -> tuple[int, ...]:
        stored = self._stored(key)
        with safe_open(str(self._where[stored]), framework="pt") as h:
            return tuple(h.get_slice(stored).get_shape())

    def clear(self) -> None:
        """Forget the files (and delete them if they are this object's scratch files)."""
        if self._owned:
            for f in self.files:
                f.unlink(missing_ok=True)
        self._where.clear()
        self._aliases.clear()


def _groups(model: Any) -> list[tuple[list[str], Tensor]]:
    """State entries grouped by the storage they live in (tied weights are one group)."""
    keys: dict[Any, list[str]] = {}
    tensors: dict[Any, Tensor] = {}
    for key, value in model.state_dict().items():
        alias = _alias_key(value)
        keys.setdefault(alias, []).append(key)
        tensors[alias] = value
    return [(keys[a], tensors[a]) for a in keys]


def compatible(model: Any, weights: FileWeights) -> bool:
    """Every state entry of ``model`` has a stored tensor of the same shape."""
    for keys, value in _groups(model):
        key = next((k for k in keys if k in weights), None)
        if key is None or weights.shape(key) != tuple(value.shape):
            return False
    return True


def load_into(model: Any, weights: Mapping[str, Tensor]) -> None:
    """Copy ``weights`` into the model's tensors in place, one tensor at a time (tied
    weights once). Every state entry must have a value under one of its keys."""
    with torch.no_grad():
        for keys, target in _groups(model):
            key = next((k for k in keys if k in weights), None)
            if key is None:
                raise KeyError(f"no stored value for {keys[0]!r}")
            target.copy_(weights[key])


def spill(model: Any, path: Path) -> FileWeights:
    """Write the model's state to ``path`` (safetensors; tied weights once) and return it
    as :class:`FileWeights` that deletes the file on ``clear()``."""
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for keys, value in _groups(model):
        stored[keys[0]] = value.detach().to("cpu").contiguous()
        for k in keys[1:]:
            aliases[k] = keys[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_safetensors(tmp, stored)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return FileWeights([path], aliases, owned=True)


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """A safetensors file written a tensor at a time from the tensors' own memory.

    ``safetensors.torch.save_file`` first copies every tensor into a ``bytes`` object: for a
    model's state that is a second copy of the model in RAM, at the moment a round's update
    holds the most. The format is a length-prefixed JSON header and the raw data."""
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: cannot store {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def swapped_in(model: Any, weights: Mapping[str, Tensor]) -> Iterator[Any]:
    """The model holding ``weights`` inside the block, its own weights again after.

    Its own weights wait in RAM meanwhile (one copy): cheaper than a second model, which
    also holds buffers, and exact (copied back bit for bit)."""
    from worker.rounds.metastep import state_copy

    own = state_copy(model)
    load_into(model, weights)
    try:
        yield model
    finally:
        load_into(model, own)
        own.clear()


def release(weights: Mapping[str, Tensor]) -> None:
    """Drop what a weights mapping holds (RAM copies, scratch files)."""
    clear = getattr(weights, "clear", None)
    if callable(clear):
        clear()
