"""`selflm generate "prompt"` (TGI's /generate_stream) and `selflm chat` (/v1/chat/completions)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from selflm.client import ApiError, Client
from selflm.commands.common import AsJson, Exit, Url, client_for, errors, print_json

MaxNew = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="tokens to generate")]
Temperature = Annotated[
    float | None, typer.Option(min=0.0, help="sampling temperature (unset: greedy for generate)")
]
TopP = Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0)]
Seed = Annotated[int | None, typer.Option(help="sampling seed")]


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    url: Url = None,
    max_new_tokens: MaxNew = 64,
    temperature: Temperature = None,
    top_p: TopP = None,
    seed: Seed = None,
    as_json: AsJson = False,
) -> None:
    """Complete PROMPT with the champion, printing tokens as they arrive."""
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for key, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            params[key] = value
    with client_for(url, timeout=300) as client:
        if as_json:
            print_json(client.generate(prompt, {**params, "details": True}))
            return
        for event in client.generate_stream(prompt, params):
            token = event.get("token")
            if token and not token.get("special"):
                _write(token["text"])
        _write("\n")


def _chat_turn(
    client: Client, messages: list[dict[str, str]], opts: dict[str, Any], echo: bool
) -> str:
    reply = []
    try:
        for chunk in client.chat_stream({"messages": messages, **opts}):
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                reply.append(piece)
                if echo:
                    _write(piece)
    except ApiError as e:
        if e.status == 404:
            errors.print(
                "[red]error:[/red] this server has no POST /v1/chat/completions "
                "(the OpenAI chat route); use `selflm generate` instead"
            )
            raise typer.Exit(Exit.HTTP_ERROR) from None
        raise
    if echo:
        _write("\n")
    return "".join(reply)


def chat(
    url: Url = None,
    message: Annotated[
        str | None, typer.Option("--message", "-m", help="send one message, print the reply, exit")
    ] = None,
    system: Annotated[str | None, typer.Option(help="a system message")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="tokens per reply")] = 128,
    temperature: Temperature = None,
    seed: Seed = None,
    as_json: AsJson = False,
) -> None:
    """Chat with the champion (streams tokens; an empty line or Ctrl-D ends the session)."""
    opts: dict[str, Any] = {"max_tokens": max_tokens}
    if temperature is not None:
        opts["temperature"] = temperature
    if seed is not None:
        opts["seed"] = seed
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty() and message is None
    with client_for(url, timeout=300) as client:
        if message is not None:
            messages.append({"role": "user", "content": message})
            reply = _chat_turn(client, messages, opts, echo=not as_json)
            if as_json:
                print_json({"role": "assistant", "content": reply})
            return
        while True:
            try:
                line = input("you> ") if interactive else sys.stdin.readline()
            except (EOFError, KeyboardInterrupt):
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line.strip()})
            if interactive:
                _write("model> ")
            reply = _chat_turn(client, messages, opts, echo=True)
            messages.append({"role": "assistant", "content": reply})
