"""The `selflm` client commands against a live server: a real round followed in a pseudo-terminal
(its screen rendered by pyte, as a terminal would), Ctrl-C, exit codes, --json, export.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pexpect
import pyte
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from live_server import (
    BETTER,
    REJECTED,
    LiveServer,
    as_sets,
    live_fixture,  # noqa: F401  (the `live` fixture)
)

pytestmark = pytest.mark.slow

SELFLM = str(Path(sys.executable).with_name("selflm"))
STAGES = ("generate", "select", "update", "evaluate", "meta_step", "decide")
COLS, ROWS = 110, 40
PCT = re.compile(r"(\d+)%")


def cli(live: LiveServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SELFLM_URL": live.url}
    return subprocess.run(
        [SELFLM, *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )


def spawn(live: LiveServer, *args: str) -> pexpect.spawn:
    env = {**os.environ, "SELFLM_URL": live.url, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    return pexpect.spawn(SELFLM, list(args), env=env, dimensions=(ROWS, COLS), timeout=600)


class Terminal:
    """Feeds a child's output to a pyte screen; records every bar percentage it ever showed."""

    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""
        self.seen: dict[str, set[int]] = {}

    def pump(self, until: re.Pattern[str] | None = None) -> None:
        """Read until EOF (or until the screen matches `until`)."""
        while True:
            try:
                chunk = self.child.read_nonblocking(65536, timeout=600)
            except pexpect.EOF:
                return
            self.raw += chunk
            self.stream.feed(chunk)
            for line in self.lines():
                words = line.split()
                if words and (words[0] in STAGES or words[0] == "round") and PCT.search(line):
                    key = words[0] if words[0] in STAGES else "round"
                    self.seen.setdefault(key, set()).add(int(PCT.findall(line)[-1]))
            if until is not None and until.search("\n".join(self.lines())):
                return

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def line(self, first_word: str) -> str:
        return next(x for x in self.lines() if x.split()[:1] == [first_word])


def test_round_start_follow_draws_each_stage_to_100_and_the_decision(live: LiveServer) -> None:
    child = spawn(live, "round", "start", "--follow", "--interval", "0.2", *as_sets(BETTER))
    term = Terminal(child)
    term.pump()
    child.close()
    screen = "\n".join(term.lines())
    assert child.exitstatus == 0, f"{screen}\n{live.tail()}"
    for stage in STAGES:
        line = term.line(stage)
        assert line.endswith("100%") or " 100% " in f"{line} ", screen
        assert "━" * 20 in line, screen  # a bar, drawn
    rid = int(re.search(r"round (\d+) promoted → v(\d+)", screen).group(1))  # type: ignore[union-attr]
    assert "reason: promoted at" in screen
    assert re.search(r"dev perplexity\s+\S+\s+\S+", screen), screen
    # Live, not one final print: the overall bar was drawn below 100% before it reached it.
    assert 100 in term.seen["round"] and min(term.seen["round"]) < 100, term.seen
    body = httpx.get(f"{live.url}/update-rounds/{rid}").json()
    assert body["decision"] == "promoted" and f"v{body['candidate_version']}" in screen


def test_ctrl_c_stops_following_not_the_round(live: LiveServer) -> None:
    # A longer round than REJECTED (epochs 2): Ctrl-C must land while it runs, after the
    # follower has drawn its first frame (CI saw the round end first on a quiet machine).
    child = spawn(live, "round", "start", "--follow", *as_sets({**REJECTED, "epochs": 12}))
    term = Terminal(child)
    term.pump(until=re.compile(r"round \d+\s+━"))
    rid = int(re.search(r"round (\d+)", "\n".join(term.lines())).group(1))  # type: ignore[union-attr]
    child.sendintr()
    term.pump()
    child.close()
    assert child.exitstatus == 130, "\n".join(term.lines())
    assert f"selflm round show {rid} --follow" in "\n".join(term.lines())
    assert httpx.get(f"{live.url}/update-rounds/{rid}").json()["status"] in ("queued", "running")
    # Following again (no terminal this time) waits for the end: rejected is exit code 3.
    out = cli(live, "round", "show", str(rid), "--follow")
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"round {rid} rejected" in out.stdout and "reason: rejected" in out.stdout


def test_json_output_and_exit_codes(live: LiveServer) -> None:
    out = cli(live, "round", "list", "--json")
    assert out.returncode == 0, out.stderr
    rounds = json.loads(out.stdout)["items"]
    assert [r["decision"] for r in rounds][-2:] == ["rejected", "promoted"]
    out = cli(live, "checkpoints", "--json")
    body = json.loads(out.stdout)
    by_version = {c["version"]: c for c in body["items"]}
    champion = by_version[body["champion_version"]]
    assert champion["parent_version"] == 1 and by_version[1]["parent_version"] is None
    for c in body["items"]:
        assert Path(c["path"], "model.safetensors").is_file()
        assert c["size_bytes"] > Path(c["path"], "model.safetensors").stat().st_size
    info = httpx.get(f"{live.url}/info").json()
    assert info["lineage_versions"] == [1, champion["version"]]

    missing = cli(live, "round", "show", "999999")
    assert missing.returncode == 5 and "404" in missing.stderr
    bad = cli(live, "round", "start", "--set", "nope=1")
    assert bad.returncode == 5 and "422" in bad.stderr
    assert cli(live, "round", "start", "--set", "no-equals-sign").returncode == 2
    down = cli(live, "checkpoints", "--url", "http://127.0.0.1:9")
    assert down.returncode == 6 and "cannot reach" in down.stderr


def test_export_is_a_plain_hf_directory_and_refuses_corrupt_bytes(
    live: LiveServer, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    items = httpx.get(f"{live.url}/checkpoints").json()["items"]
    newest = items[-1]
    out = cli(live, "export", str(newest["version"]), str(tmp_path / "export"), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["files"] >= 3
    assert not (tmp_path / "export" / "manifest.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    AutoTokenizer.from_pretrained(tmp_path / "export")
    original = AutoModelForCausalLM.from_pretrained(newest["path"])
    for (name, a), (_, b) in zip(
        exported.state_dict().items(), original.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name

    # A byte flipped on the server's disk: the download does not match the manifest.
    weights = Path(items[0]["path"], "model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    saved = weights.read_bytes()
    weights.write_bytes(bytes(data))
    try:
        bad = cli(live, "export", str(items[0]["version"]), str(tmp_path / "bad"))
    finally:
        weights.write_bytes(saved)
    assert bad.returncode == 7 and "sha256" in bad.stderr
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad-*"))
    taken = cli(live, "export", str(newest["version"]), str(tmp_path / "export"))
    assert taken.returncode == 2 and "not an empty directory" in taken.stderr


def test_generate_streams_what_generate_returns(live: LiveServer) -> None:
    want = httpx.post(
        f"{live.url}/generate",
        json={"inputs": "The weather today", "parameters": {"max_new_tokens": 12}},
        timeout=120,
    ).json()["generated_text"]
    out = cli(live, "generate", "The weather today", "-n", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
    js = json.loads(cli(live, "generate", "The weather today", "-n", "12", "--json").stdout)
    assert js["generated_text"] == want and js["details"]["generated_tokens"] == 12


def test_chat_uses_the_openai_chat_route(live: LiveServer) -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120)
    out = cli(live, "chat", "-m", "Hello there", "--max-tokens", "8", "--temperature", "0")
    if r.status_code == 404:  # the chat route is not on this server: a clear error, not a trace
        assert out.returncode == 5 and "/v1/chat/completions" in out.stderr
        return
    assert out.returncode == 0, out.stderr
    assert out.stdout == r.json()["choices"][0]["message"]["content"] + "\n"


def test_serve_worker_migrate_stay(tmp_path: Path) -> None:
    help_ = subprocess.run([SELFLM, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("serve", "worker", "migrate", "round", "checkpoints", "export", "chat"):
        assert command in help_
    env = {**os.environ, "SELFLM_DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}"}
    done = subprocess.run(
        [sys.executable, "-m", "selflm.cli", "migrate"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "database at head" in done.stderr
