"""Round data files: only names inside the operator's data directory, read with limits.

A round's `prompt_file` and `corpus` are *names* relative to one directory the operator
configured (``SELFLM_ROUND_DATA_DIR``, default ``<data>/rounds``), filled by the operator or
through ``PUT /data/{name}``. Nothing here ever opens a path taken from a request as given:

* :func:`check_name` is syntactic (no filesystem access, so a validation error never says
  whether some server path exists): relative, no ``..``, no NUL or backslash, bounded length.
* :func:`resolve` resolves symlinks and refuses anything that lands outside the directory.
* :func:`read_bytes` opens with ``O_NONBLOCK | O_NOFOLLOW``, refuses what is not a regular
  file (a FIFO or a device would block or never end) and reads at most ``max_bytes``.

Torch-free: the API validates round bodies with it.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

# Per-file and per-corpus read limits (bytes). Settings can lower or raise them.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_TOTAL_BYTES = 256 * 1024 * 1024
MAX_NAME_CHARS = 255
_NAME = re.compile(r"^[A-Za-z0-9._\-/ ]+$")
_CHUNK = 1 << 20


class DataFileError(ValueError):
    """A data name that is not allowed, or a data file that cannot be read within limits.

    Messages name only the data name the caller gave, never a server path.
    """


def check_name(name: str) -> str:
    """Return `name` normalised (``a//b`` → ``a/b``) or raise DataFileError. No I/O."""
    if not name or len(name) > MAX_NAME_CHARS:
        raise DataFileError(f"a data name has 1 to {MAX_NAME_CHARS} characters")
    if not _NAME.match(name):
        raise DataFileError("a data name uses letters, digits, '.', '_', '-', ' ' and '/' only")
    if name.startswith("/"):
        raise DataFileError("a data name is relative to the data directory, not a path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise DataFileError("a data name must name a file or folder in the data directory")
    if any(p == ".." for p in parts):
        raise DataFileError("a data name may not contain '..'")
    if any(p.startswith(".") for p in parts):
        raise DataFileError("a data name may not name hidden files")
    return "/".join(parts)


def resolve(root: Path, name: str) -> Path:
    """The real path of `name` inside `root`; DataFileError if it is missing or escapes."""
    clean = check_name(name)
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(base / clean))
    if target != base and base not in target.parents:
        raise DataFileError(f"data name {clean!r} points outside the data directory")
    if not target.exists():
        raise DataFileError(f"no data named {clean!r} in the data directory")
    return target


def read_bytes(path: Path, max_bytes: int = MAX_FILE_BYTES, label: str = "") -> bytes:
    """Read a regular file without following a final symlink or blocking on a FIFO."""
    label = label or path.name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise DataFileError(f"data {label!r} cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataFileError(f"data {label!r} is not a regular file")
        if st.st_size > max_bytes:
            raise DataFileError(f"data {label!r} is larger than {max_bytes} bytes")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # grew while we read
                raise DataFileError(f"data {label!r} is larger than {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: Path, max_bytes: int = MAX_FILE_BYTES, label: str = "") -> str:
    # errors="replace": one stray byte in a user's corpus should not fail a whole round.
    raw = read_bytes(path, max_bytes, label)
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n")


def regular_files(
    folder: Path, suffixes: tuple[str, ...], max_total: int = MAX_TOTAL_BYTES
) -> Iterator[Path]:
    """Regular files with one of `suffixes` below `folder` (sorted), never leaving it.

    Symlinks are skipped (``rglob`` does not follow them into directories, and a linked file
    could point anywhere); so are FIFOs, sockets and devices.
    """
    base = Path(os.path.realpath(folder))
    total = 0
    for p in sorted(base.rglob("*"), key=lambda p: p.relative_to(base).as_posix()):
        if p.suffix not in suffixes:
            continue
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            continue
        total += st.st_size
        if total > max_total:
            raise DataFileError(f"data folder {folder.name!r} is larger than {max_total} bytes")
        yield p


def write_file(
    root: Path, name: str, chunks: Iterable[bytes], max_bytes: int = MAX_FILE_BYTES
) -> tuple[str, int]:
    """Store `chunks` as `name` inside `root` atomically; (clean name, size). Replaces."""
    clean = check_name(name)
    base = Path(os.path.realpath(root))
    base.mkdir(parents=True, exist_ok=True)
    target = base / clean
    parent = Path(os.path.realpath(target.parent))
    if parent != base and base not in parent.parents:
        raise DataFileError(f"data name {clean!r} points outside the data directory")
    parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise DataFileError(f"data {clean!r} exists and is not a regular file")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".upload-")
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise DataFileError(f"data {clean!r} is larger than {max_bytes} bytes")
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return clean, size


def list_names(root: Path) -> list[dict[str, object]]:
    """Every regular file in `root` (relative names and sizes), for GET /data."""
    base = Path(os.path.realpath(root))
    if not base.is_dir():
        return []
    out: list[dict[str, object]] = []
    for p in sorted(base.rglob("*")):
        rel = p.relative_to(base).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            out.append({"name": rel, "bytes": st.st_size})
    return out
