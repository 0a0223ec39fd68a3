"""§2: round data only from the operator's data directory, read with limits.

Real rounds (the real pipeline on tiny:llama, a real database) name forbidden paths, a
symlink out of the directory and a FIFO; the API rejects what it can see is wrong (422, no
row), and the worker refuses the rest without reading it or hanging.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from core.datafiles import DataFileError, check_name, read_bytes
from core.db import rounds as records
from core.db.session import Database
from core.settings import Settings

SMALL: dict[str, Any] = {
    "num_prompts": 2,
    "samples_per_prompt": 2,
    "max_new_tokens": 8,
    "min_words": 1,
    "train_size": 2,
    "valid_size": 1,
    "eval_passages": 2,
    "diversity_prompts": 2,
    "epochs": 1,
    "batch_size": 2,
    "max_length": 32,
}


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_settings: Callable[..., Settings]
) -> Any:
    root = tmp_path_factory.mktemp("data")
    settings = make_tiny_settings(root, round_data_max_bytes=4096)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c, settings


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt_source": "file", "prompt_file": "/etc/passwd"},
        {"prompt_source": "file", "prompt_file": "../x"},
        {"prompt_source": "file", "prompt_file": "a/../../etc/passwd"},
        {"corpus": "/etc/shadow"},
        {"corpus": "../../etc"},
        {"corpus": ".ssh/id_rsa"},
        {"corpus": "x\u0000y"},
    ],
)
def test_paths_in_a_round_body_are_rejected_before_a_row_exists(env: Any, bad: Any) -> None:
    client, _ = env
    before = client.get("/update-rounds").json()["total"]
    r = client.post("/update-rounds", json=bad)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    assert "passwd" not in r.json()["error"] or "relative" in r.json()["error"]
    assert client.get("/update-rounds").json()["total"] == before


def test_error_texts_do_not_tell_whether_a_server_path_exists(env: Any) -> None:
    client, _ = env
    a = client.post("/update-rounds", json={"corpus": "/etc/passwd"}).json()["error"]
    b = client.post("/update-rounds", json={"corpus": "/etc/no-such-file-xyz"}).json()["error"]
    assert a.replace("passwd", "X") == b.replace("no-such-file-xyz", "X")


def _run_round_thread(settings: Settings, round_id: int) -> threading.Thread:
    from worker.rounds.pipeline import run_round

    def target() -> None:
        with contextlib.suppress(BaseException):  # the failure is recorded on the row
            run_round(settings, Database(settings.database_url), round_id)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def _round_with(settings: Settings, params: dict[str, Any]) -> int:
    db = Database(settings.database_url)
    from core.round_params import RoundParams

    row = records.create_round(db, settings.lineage, RoundParams(**params).model_dump())
    return row.id


def _finished(settings: Settings, rid: int) -> Any:
    row = records.get_round(Database(settings.database_url), rid)
    assert row is not None
    return row


def test_a_fifo_in_the_data_dir_fails_the_round_instead_of_hanging_it(env: Any) -> None:
    _, settings = env
    data = settings.round_data_path
    data.mkdir(parents=True, exist_ok=True)
    os.mkfifo(data / "pipe.txt")
    rid = _round_with(settings, {**SMALL, "corpus": "pipe.txt"})
    t = _run_round_thread(settings, rid)
    t.join(timeout=120)  # a hang, not a speed limit: an open() of a FIFO blocks forever
    assert not t.is_alive(), "the worker hung on a FIFO"
    row = _finished(settings, rid)
    assert row.status == "failed" and "not a regular file" in (row.error or "")


def test_a_symlink_out_of_the_data_dir_is_never_read(env: Any, tmp_path: Path) -> None:
    _, settings = env
    data = settings.round_data_path
    data.mkdir(parents=True, exist_ok=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LINE\n" * 4)
    (data / "escape.txt").symlink_to(secret)
    rid = _round_with(settings, {**SMALL, "prompt_source": "file", "prompt_file": "escape.txt"})
    t = _run_round_thread(settings, rid)
    t.join(timeout=300)
    row = _finished(settings, rid)
    assert row.status == "failed", row.status
    assert "outside the data directory" in (row.error or "")
    assert str(tmp_path) not in (row.error or "")
    assert not [m for m in row.metrics if m.stage == "generate"]  # nothing was generated


def test_upload_then_name_it_in_a_round(env: Any) -> None:
    client, settings = env
    text = "the first prompt line\nthe second prompt line\n"
    r = client.put("/data/prompts/mine.txt", content=text.encode())
    assert r.status_code == 201, r.text
    assert r.json() == {"name": "prompts/mine.txt", "bytes": len(text)}
    names = [i["name"] for i in client.get("/data").json()["items"]]
    assert "prompts/mine.txt" in names
    from worker.rounds.data import load_prompt_file

    got = load_prompt_file(settings.round_data_path, "prompts/mine.txt", 5, 4096)
    assert got == ["the first prompt line", "the second prompt line"]
    # Over the cap: 413, nothing stored.
    big = client.put("/data/big.txt", content=b"x" * 5000)
    assert big.status_code == 413 and big.json()["error_type"] == "payload_too_large"
    assert not (settings.round_data_path / "big.txt").exists()
    # A path in the URL is refused too.
    assert client.put("/data/..%2F..%2Fetc%2Fx", content=b"x").status_code in (404, 422)
    assert client.put("/data/.hidden", content=b"x").status_code == 422


def test_datafiles_unit_limits(tmp_path: Path) -> None:
    for bad in ("/abs", "../x", "a/../b", "", ".git/config", "a\\b"):
        with pytest.raises(DataFileError):
            check_name(bad)
    assert check_name("a//b/./c.txt") == "a/b/c.txt"
    f = tmp_path / "f"
    f.write_bytes(b"y" * 100)
    with pytest.raises(DataFileError, match="larger"):
        read_bytes(f, max_bytes=99)
    os.mkfifo(tmp_path / "p")
    with pytest.raises(DataFileError, match="not a regular file"):
        read_bytes(tmp_path / "p")
