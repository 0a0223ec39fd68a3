"""The checkpoint store: one directory per version, written atomically, with a manifest.

Layout: ``<root>/<lineage>/v000001/`` holding the HF files (``model.safetensors``,
``config.json``, tokenizer files) and ``manifest.json`` with a sha256 per file. A version is
written to a temporary sibling directory and renamed into place, so a reader never sees a
half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class StoredCheckpoint:
    path: Path
    manifest: dict[str, Any]


def checkpoint_path(root: str | Path, lineage: str, version: int) -> Path:
    return Path(root) / lineage / f"v{version:06d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    model: Any, tokenizer: Any, root: str | Path, lineage: str, version: int, **meta: Any
) -> StoredCheckpoint:
    """Save `model` and `tokenizer` as `version`; raises FileExistsError if it exists."""
    final = checkpoint_path(root, lineage, version)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise FileExistsError(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{version:06d}-", dir=final.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[p.relative_to(tmp).as_posix()] = sha256_file(p)
                with p.open("rb") as f:
                    os.fsync(f.fileno())
        manifest = {
            "version": version,
            "lineage": lineage,
            "created_at": datetime.now(UTC).isoformat(),
            "files": files,
            **meta,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_dir(tmp)
        # rename() of a directory fails if the target exists and is non-empty, so two
        # writers racing for the same version cannot both win.
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote checkpoint %s (%d files)", final, len(files))
    return StoredCheckpoint(path=final, manifest=manifest)


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {MANIFEST}: {e}") from e
    return data


def verify_checkpoint(path: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every file against the manifest's sha256; returns the manifest used.

    Pass the manifest recorded in the database to also catch a rewritten manifest file.
    """
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} is missing")
    expected = manifest if manifest is not None else read_manifest(path)
    files: dict[str, str] = expected.get("files", {})
    if not files:
        raise CheckpointError(f"manifest for {path} lists no files")
    for name, digest in files.items():
        fp = path / name
        if not fp.is_file():
            raise CheckpointError(f"{fp} is missing")
        actual = sha256_file(fp)
        if actual != digest:
            raise CheckpointError(
                f"checksum mismatch for {fp}: manifest {digest[:12]}…, file {actual[:12]}…"
            )
    return expected


def weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))
