"""`selflm checkpoints`, `selflm promote VERSION`, `selflm export VERSION DIR`."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from selflm.commands.common import AsJson, Exit, Url, client_for, console, errors, print_json


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def checkpoints(url: Url = None, as_json: AsJson = False) -> None:
    """Checkpoint versions: status, parent, size, path, held-out metrics (GET /checkpoints)."""
    with client_for(url) as client:
        body = client.checkpoints()
    if as_json:
        print_json(body)
        return
    table = Table()
    for name in ("version", "status", "parent", "round", "size", "dev ppl", "test ppl"):
        table.add_column(name, no_wrap=True)
    table.add_column("path", overflow="fold")
    for c in body["items"]:
        m = c.get("metrics") or {}
        table.add_row(
            f"v{c['version']}",
            c["status"],
            f"v{c['parent_version']}" if c.get("parent_version") is not None else "",
            str(c.get("produced_by_round") or ""),
            _size(c.get("size_bytes")),
            f"{m['dev_ppl']:.4g}" if "dev_ppl" in m else "",
            f"{m['test_ppl']:.4g}" if "test_ppl" in m else "",
            str(c.get("path") or ""),
        )
    console.print(table)
    console.print(f"champion: v{body.get('champion_version')}")


def promote(
    version: Annotated[int, typer.Argument(help="checkpoint version to serve")],
    url: Url = None,
    as_json: AsJson = False,
) -> None:
    """Make VERSION the champion (a manual promotion or a rollback); replicas hot-swap."""
    with client_for(url) as client:
        body = client.promote(version)
    if as_json:
        print_json(body)
    else:
        console.print(f"champion is now v{body['champion_version']} ({body['lineage']})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def export(
    version: Annotated[int, typer.Argument(help="checkpoint version")],
    directory: Annotated[Path, typer.Argument(help="new or empty directory to write")],
    url: Url = None,
    as_json: AsJson = False,
) -> None:
    """Download VERSION as a plain Hugging Face directory (from_pretrained loads it).

    Files come over HTTP (GET /checkpoints/{v}/files/...), so a remote server works; each is
    checked against the checkpoint's sha256 manifest, and DIR appears only when all are good.
    """
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        errors.print(f"[red]error:[/red] {directory} exists and is not an empty directory")
        raise typer.Exit(Exit.USAGE)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        with client_for(url) as client:
            listing = client.checkpoint_files(version)
            files: list[dict[str, Any]] = listing["files"]
            total = sum(int(f["size"]) for f in files)
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=console,
                disable=as_json,
            ) as progress:
                task = progress.add_task(f"v{version}", total=total)
                for f in files:
                    dest = tmp / f["name"]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    for n in client.download(version, f["name"], dest):
                        progress.advance(task, n)
                    if _sha256(dest) != f["sha256"]:
                        errors.print(f"[red]error:[/red] {f['name']} does not match its sha256")
                        raise typer.Exit(Exit.BAD_EXPORT)
        if directory.exists():
            directory.rmdir()
        os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"version": version, "directory": str(directory), "files": len(files), "bytes": total}
    if as_json:
        print_json(out)
    else:
        console.print(f"exported v{version} to {directory} ({len(files)} files, {_size(total)})")
