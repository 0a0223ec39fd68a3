"""`selflm round start|list|show|cancel`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from selflm.commands.common import AsJson, Exit, Url, client_for, console, parse_sets, print_json
from selflm.commands.follow import exit_code, follow, print_summary, wait

app = typer.Typer(
    help="self-update rounds: start, follow, list, show, cancel", no_args_is_help=True
)

Follow = Annotated[
    bool,
    typer.Option(
        "--follow", "-f", help="live progress until the round ends (Ctrl-C stops following)"
    ),
]
Interval = Annotated[float, typer.Option("--interval", min=0.1, help="seconds between polls")]


def _follow_or_print(
    client: Any, body: dict[str, Any], follow_: bool, as_json: bool, interval: float
) -> None:
    rid = int(body["id"])
    if not follow_:
        if as_json:
            print_json(body)
        else:
            _print_round(body)
        return
    try:
        final = wait(client, rid, interval) if as_json else follow(client, rid, console, interval)
    except KeyboardInterrupt:
        console.print(
            f"\nstopped following round {rid}; it keeps running: selflm round show {rid} --follow"
        )
        raise typer.Exit(Exit.INTERRUPTED) from None
    if as_json:
        print_json(final)
    else:
        print_summary(final, console)
    raise typer.Exit(exit_code(final))


@app.command("start")
def start(
    url: Url = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="a round parameter, key=value (JSON values: 4, true, [0.5,1])"),
    ] = None,
    follow_: Follow = False,
    interval: Interval = 0.5,
    as_json: AsJson = False,
) -> None:
    """Start a self-update round (POST /update-rounds)."""
    params = parse_sets(sets or [])
    with client_for(url) as client:
        body = client.start_round(params)
        if not follow_ and not as_json:
            console.print(f"started round {body['id']} ({body['status']})")
            return
        _follow_or_print(client, body, follow_, as_json, interval)


@app.command("show")
def show(
    round_id: Annotated[int, typer.Argument(help="round id")],
    url: Url = None,
    follow_: Follow = False,
    interval: Interval = 0.5,
    as_json: AsJson = False,
) -> None:
    """One round: status, stage, progress, decision, metrics (GET /update-rounds/{id})."""
    with client_for(url) as client:
        _follow_or_print(client, client.get_round(round_id), follow_, as_json, interval)


@app.command("list")
def list_(
    url: Url = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
    as_json: AsJson = False,
) -> None:
    """Recent rounds, newest first (GET /update-rounds)."""
    with client_for(url) as client:
        body = client.list_rounds(limit)
    if as_json:
        print_json(body)
        return
    table = Table()
    for name in ("id", "status", "stage", "progress", "decision", "base", "cand.", "ε", "seconds"):
        table.add_column(name, no_wrap=True)
    table.add_column("reason", overflow="ellipsis", no_wrap=True, max_width=60)
    for r in body["items"]:
        m = r.get("metrics") or {}
        eps = m.get("decide", {}).get("epsilon", m.get("meta_step", {}).get("epsilon_chosen"))
        secs = m.get("round", {}).get("seconds")
        table.add_row(
            str(r["id"]),
            r["status"],
            r.get("stage") or "",
            f"{100 * float(r.get('progress') or 0):.0f}%",
            r.get("decision") or "",
            _v(r.get("base_version")),
            _v(r.get("candidate_version")),
            f"{eps:g}" if isinstance(eps, int | float) else "",
            f"{secs:.1f}" if isinstance(secs, int | float) else "",
            r.get("reason") or r.get("error") or "",
        )
    console.print(table)
    console.print(f"{len(body['items'])} of {body['total']} rounds")


@app.command("cancel")
def cancel(
    round_id: Annotated[int, typer.Argument(help="round id")],
    url: Url = None,
    as_json: AsJson = False,
) -> None:
    """Cancel a queued or running round (a running one stops at its next stage)."""
    with client_for(url) as client:
        body = client.cancel_round(round_id)
    if as_json:
        print_json(body)
    else:
        console.print(f"round {body['id']} {body['status']}")


def _v(version: Any) -> str:
    return f"v{version}" if version is not None else ""


def _print_round(body: dict[str, Any]) -> None:
    console.print(
        f"round {body['id']}: {body['status']}, stage {body.get('stage') or '-'}, "
        f"{100 * float(body.get('progress') or 0):.0f}%",
        highlight=False,
    )
    if body["status"] in ("succeeded", "failed", "cancelled"):
        print_summary(body, console)
