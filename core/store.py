"""The checkpoint files: one directory per version, staged then renamed, with a manifest.

Layout: ``<root>/<lineage>/v000001/`` holding the HF files (``model.safetensors``,
``config.json``, tokenizer files) and ``manifest.json`` with a sha256 per file. A version is
written into a hidden staging sibling and renamed into place, so a reader never sees a
half-written checkpoint. This is the file layer under :mod:`core.registry`, which owns the
rows, the version numbers and the champion pointer; nothing here touches the database.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
_CHUNK = 1 << 20
_VERSION_DIR = re.compile(r"^v(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class Staged:
    """Files saved and hashed in a staging directory, not yet a version."""

    dir: Path
    files: dict[str, str]  # relative name → sha256


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


def versions_on_disk(lineage_dir: Path) -> list[int]:
    """Version numbers that have a directory, recorded or not (a crash can leave one)."""
    if not lineage_dir.is_dir():
        return []
    return sorted(
        int(m.group(1)) for p in lineage_dir.iterdir() if (m := _VERSION_DIR.match(p.name))
    )


def stage(model: Any, tokenizer: Any, lineage_dir: Path) -> Staged:
    """Save `model` and `tokenizer` into a fresh staging directory and hash every file.

    On any failure the staging directory is removed before the error propagates.
    """
    lineage_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=lineage_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files: dict[str, str] = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[p.relative_to(tmp).as_posix()] = sha256_file(p)
                with p.open("rb") as f:
                    os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Staged(dir=tmp, files=files)


def make_manifest(lineage: str, version: int, files: dict[str, str], **meta: Any) -> dict[str, Any]:
    return {
        "version": version,
        "lineage": lineage,
        "created_at": datetime.now(UTC).isoformat(),
        "files": dict(files),
        **meta,
    }


def finalize(staged: Staged, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest and rename the staging directory to `final`.

    Raises FileExistsError when `final` exists (the staging directory is kept, so the caller
    can try the next version); a directory rename never replaces a non-empty target, so two
    writers racing for one version cannot both win.
    """
    if final.exists():
        raise FileExistsError(final)
    (staged.dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync_dir(staged.dir)
    try:
        os.rename(staged.dir, final)
    except OSError as e:
        if final.exists():
            raise FileExistsError(final) from e
        raise
    _fsync_dir(final.parent)
    log.info("wrote checkpoint %s (%d files)", final, len(staged.files))


def discard(path: Path) -> None:
    """Remove a staging or version directory (best effort: it is garbage either way)."""
    shutil.rmtree(path, ignore_errors=True)


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
