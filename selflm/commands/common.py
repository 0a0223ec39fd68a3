"""What the client commands share: options, exit codes, JSON output, error handling."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Annotated, Any

import typer
from rich.console import Console

from selflm.client import ApiError, Client


class Exit(IntEnum):
    """`selflm` exit codes (also in the README)."""

    OK = 0
    USAGE = 2  # bad arguments (typer/click's own code)
    REJECTED = 3  # a followed round ended without promoting its candidate
    ROUND_FAILED = 4  # a followed round failed or was cancelled
    HTTP_ERROR = 5  # the server answered 4xx/5xx
    UNREACHABLE = 6  # no answer from the server
    BAD_EXPORT = 7  # a downloaded file did not match the checkpoint's manifest
    INTERRUPTED = 130  # Ctrl-C while following (the round keeps running)


Url = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="SELFLM_URL",
        help="server URL [default: http://127.0.0.1:8080]; the API key comes from SELFLM_API_KEY",
        show_envvar=True,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON for scripts, no decoration")]

console = Console()
errors = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def client_for(url: str | None, timeout: float = 30.0) -> Iterator[Client]:
    """A client whose errors end the command with the matching exit code."""
    client = Client(url, timeout=timeout)
    try:
        yield client
    except ApiError as e:
        errors.print(f"[red]error:[/red] {e}", highlight=False, markup=True)
        raise typer.Exit(Exit.UNREACHABLE if e.status == 0 else Exit.HTTP_ERROR) from None
    finally:
        client.close()


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value that parses as JSON is taken as JSON (numbers, lists...)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="--set")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out
