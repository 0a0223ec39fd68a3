"""The checkpoint files: one directory per version, staged then renamed, with a manifest.

Layout: ``<root>/<lineage>/v000001/`` holding the HF files (``model.safetensors``,
``config.json``, tokenizer files) and ``manifest.json``. A version is written into a hidden
staging sibling and renamed into place, so a reader never sees a half-written checkpoint.
This is the file layer under :mod:`core.registry`, which owns the rows, the version numbers
and the champion pointer; nothing here touches the database.

The manifest records, per file, its sha256 (``files``: the name list and the digest the file
API and ``selflm export`` hand out), its BLAKE3 (``blake3``) and its size (``sizes``), and
``check``: the algorithm a reader verifies with. The writer hashes each file once, in one
read; a reader re-hashes the bytes it is about to use with BLAKE3 (several times faster than
sha256 here), so a file changed after it was written is still refused. A manifest without
``check`` (written before BLAKE3) is verified with its sha256s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
_CHUNK = 1 << 20
READ_CHUNK = 8 << 20  # read-and-hash step of read_checked: a GIL-free slice of work
CHECKS = ("sha256", "blake3")  # the algorithms a manifest's "check" may name
_VERSION_DIR = re.compile(r"^v(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class Staged:
    """Files saved and hashed in a staging directory, not yet a version."""

    dir: Path
    files: dict[str, str]  # relative name → sha256
    blake3: dict[str, str]  # relative name → BLAKE3
    sizes: dict[str, int]  # relative name → bytes


def checkpoint_path(root: str | Path, lineage: str, version: int) -> Path:
    return Path(root) / lineage / f"v{version:06d}"


def sha256_file(path: Path) -> str:
    return hash_file(path)[0]


def hash_file(path: Path) -> tuple[str, str, int]:
    """sha256, BLAKE3 and size of one file, read once (both hashes release the GIL)."""
    sha, b3, size = hashlib.sha256(), blake3.blake3(), 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with path.open("rb") as f:
        while n := f.readinto(buf):
            sha.update(view[:n])
            b3.update(view[:n])
            size += n
    return sha.hexdigest(), b3.hexdigest(), size


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
        b3: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                name = p.relative_to(tmp).as_posix()
                with p.open("rb") as f:
                    os.fsync(f.fileno())  # on disk first: the digests describe what is there
                files[name], b3[name], sizes[name] = hash_file(p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Staged(dir=tmp, files=files, blake3=b3, sizes=sizes)


def make_manifest(lineage: str, version: int, staged: Staged, **meta: Any) -> dict[str, Any]:
    return {
        "version": version,
        "lineage": lineage,
        "created_at": datetime.now(UTC).isoformat(),
        "files": dict(staged.files),
        "blake3": dict(staged.blake3),
        "sizes": dict(staged.sizes),
        "check": "blake3",
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


@dataclass(frozen=True)
class Expected:
    """What one file must be: the digest under the manifest's check algorithm, and its size
    when the manifest records sizes (those written before BLAKE3 do not)."""

    algorithm: str
    digest: str
    size: int | None


def expected_files(path: Path, manifest: dict[str, Any]) -> dict[str, Expected]:
    """Every file the manifest lists, with what it must hash to; CheckpointError when the
    manifest is unusable (no files, an unknown algorithm, a digest missing for a file)."""
    files: dict[str, str] = manifest.get("files") or {}
    if not files:
        raise CheckpointError(f"manifest for {path} lists no files")
    algorithm = manifest.get("check", "sha256")
    if algorithm not in CHECKS:
        raise CheckpointError(f"manifest for {path} names an unknown check {algorithm!r}")
    digests: dict[str, str] = files if algorithm == "sha256" else manifest.get(algorithm) or {}
    sizes: dict[str, int] = manifest.get("sizes") or {}
    out: dict[str, Expected] = {}
    for name in files:
        digest = digests.get(name)
        if not isinstance(digest, str):
            raise CheckpointError(f"manifest for {path} has no {algorithm} for {name}")
        size = sizes.get(name)
        out[name] = Expected(algorithm, digest, size if isinstance(size, int) else None)
    return out


def _hasher(algorithm: str) -> Any:
    return blake3.blake3() if algorithm == "blake3" else hashlib.sha256()


def _mismatch(fp: Path, exp: Expected, actual: str) -> CheckpointError:
    return CheckpointError(
        f"checksum mismatch for {fp} ({exp.algorithm}): "
        f"manifest {exp.digest[:12]}…, file {actual[:12]}…"
    )


class CheckedReader:
    """Reads one file front to back into caller-provided memory, hashing every byte on the
    way in; :meth:`finish` then refuses the file unless it ended where the manifest says and
    hashed to the recorded digest. Use what was read only after `finish` returned: those are
    the bytes that were checked (no second read a rewrite could slip into).

    Reads go in chunks of READ_CHUNK; reading and hashing release the GIL and the thread
    yields it between chunks, so a load in a background thread leaves a decoding thread
    free to run. `exp` None reads without checking. CheckpointError on a missing file, a
    size or digest mismatch.
    """

    def __init__(self, fp: Path, exp: Expected | None) -> None:
        self.fp, self.exp = fp, exp
        try:
            self._f = fp.open("rb", buffering=0)
        except FileNotFoundError as e:
            raise CheckpointError(f"{fp} is missing") from e
        self.size = os.fstat(self._f.fileno()).st_size
        if exp is not None and exp.size is not None and self.size != exp.size:
            self._f.close()
            raise CheckpointError(f"size mismatch for {fp}: manifest {exp.size}, file {self.size}")
        self._h = _hasher(exp.algorithm) if exp is not None else None
        self.done = 0

    def __enter__(self) -> CheckedReader:
        return self

    def __exit__(self, *_: object) -> None:
        self._f.close()

    def readinto(self, buf: memoryview) -> None:
        """Fill `buf` (a byte view) with the next len(buf) bytes of the file."""
        filled, want = 0, len(buf)
        while filled < want:
            n = self._f.readinto(buf[filled : min(want, filled + READ_CHUNK)])
            if not n:
                raise CheckpointError(
                    f"{self.fp} ended early ({self.done + filled} of {self.size} bytes)"
                )
            if self._h is not None:
                self._h.update(buf[filled : filled + n])
            filled += n
            time.sleep(0)
        self.done += filled

    def skip(self, n: int) -> None:
        """Read and hash `n` bytes that are not kept."""
        scratch = memoryview(bytearray(min(max(n, 1), READ_CHUNK)))
        while n > 0:
            step = min(n, len(scratch))
            self.readinto(scratch[:step])
            n -= step

    def finish(self) -> None:
        """Hash what is left of the file and compare with the manifest."""
        if self.done < self.size:
            self.skip(self.size - self.done)
        if self._f.read(1):
            raise CheckpointError(f"{self.fp} grew while being read")
        exp, h = self.exp, self._h
        if exp is not None and h is not None and (actual := h.hexdigest()) != exp.digest:
            raise _mismatch(self.fp, exp, actual)


def read_checked(fp: Path, exp: Expected | None) -> bytes:
    """A small file's bytes, checked (see CheckedReader)."""
    with CheckedReader(fp, exp) as r:
        data = bytearray(r.size)
        r.readinto(memoryview(data))
        r.finish()
    return bytes(data)


def check_file(fp: Path, exp: Expected) -> None:
    """Hash one file in place (nothing kept); CheckpointError when it does not match."""
    if not fp.is_file():
        raise CheckpointError(f"{fp} is missing")
    size = fp.stat().st_size
    if exp.size is not None and size != exp.size:
        raise CheckpointError(f"size mismatch for {fp}: manifest {exp.size}, file {size}")
    # read(), not a mapping: a file truncated under a mapping would SIGBUS the process.
    h = _hasher(exp.algorithm)
    buf = bytearray(min(max(size, 1), READ_CHUNK))
    view = memoryview(buf)
    with fp.open("rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    if (actual := h.hexdigest()) != exp.digest:
        raise _mismatch(fp, exp, actual)


def verify_checkpoint(path: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every file against the manifest (BLAKE3 where recorded, else sha256); returns
    the manifest used.

    Pass the manifest recorded in the database to also catch a rewritten manifest file.
    """
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} is missing")
    expected = manifest if manifest is not None else read_manifest(path)
    for name, exp in expected_files(path, expected).items():
        check_file(path / name, exp)
    return expected


def weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))
