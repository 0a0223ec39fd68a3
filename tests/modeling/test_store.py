"""The checkpoint store: importing a base model as version 1, reuse, and tamper detection.

Real files, a real SQLite database and the real loader. The GGUF case uses a tiny llama GGUF
written here with the `gguf` package (a 260-token byte-level BPE vocabulary, 2 layers), so it
loads in seconds; the bundled SmolLM2 GGUF is imported by tests/app/test_bundled_smollm2.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import sqlalchemy as sa
import torch
from sqlalchemy.exc import IntegrityError

from core import registry
from core.db.models import Checkpoint
from core.db.session import Database, upgrade
from core.modeling import loader
from core.registry import CheckpointRef, ensure_base_checkpoint, get_champion
from core.settings import Settings
from core.store import (
    MANIFEST,
    CheckpointError,
    checkpoint_path,
    read_manifest,
    verify_checkpoint,
)

# --------------------------------------------------------------------------- sources


def _gpt2_byte_tokens() -> list[str]:
    """GPT-2's byte → printable-unicode table, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


GGUF_DIMS = {"hidden": 64, "ffn": 128, "layers": 2, "heads": 4, "kv_heads": 2, "context": 256}


def write_tiny_llama_gguf(path: Path) -> np.ndarray:
    """Write a small valid llama GGUF that transformers can load; returns token_embd."""
    from gguf import GGUFWriter

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = [*specials, *_gpt2_byte_tokens(), "Ġt", "he", "Ġthe", "in", "Ġa"]
    d = GGUF_DIMS
    hidden, ffn, kv = d["hidden"], d["ffn"], d["kv_heads"] * d["hidden"] // d["heads"]
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(d["context"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(d["layers"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // d["heads"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    embd = rand(len(tokens), hidden)
    w.add_tensor("token_embd.weight", embd)
    for i in range(d["layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ffn))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return embd


@pytest.fixture(scope="module")
def tiny_base() -> loader.LoadedBase:
    return loader.tiny_model("llama")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_base: loader.LoadedBase) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_base.model.save_pretrained(path)
    tiny_base.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.fixture
def make_store(
    tmp_path: Path, make_tiny_settings: Callable[..., Settings]
) -> Iterator[Callable[..., tuple[Settings, Database]]]:
    """`make_store(base_model, db_name=...)` → settings + migrated SQLite database."""
    dbs: list[Database] = []

    def make(base_model: str, db_name: str = "selflm.db") -> tuple[Settings, Database]:
        settings = make_tiny_settings(
            tmp_path, base_model=base_model, database_url=f"sqlite:///{tmp_path / db_name}"
        )
        upgrade(settings.database_url)
        db = Database(settings.database_url)
        dbs.append(db)
        return settings, db

    yield make
    for db in dbs:
        db.dispose()


def _mtimes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


def _engine(settings: Settings) -> Any:
    from app.engine.torch_engine import TorchEngine

    return TorchEngine(settings)


# --------------------------------------------------------------------------- import


def _check_version_1(settings: Settings, db: Database, source: str) -> Path:
    with db.session() as s:
        row = get_champion(s, "default")
        assert row is not None
        assert (row.version, row.status, row.parent_version) == (1, "champion", None)
        assert row.source == source
        path = Path(row.path)
        manifest = row.manifest

    assert path == checkpoint_path(settings.checkpoint_dir, "default", 1)
    assert path.name == "v000001" and path.is_dir()
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert MANIFEST in names

    # The manifest on disk is the one recorded, and it hashes every file but itself.
    assert read_manifest(path) == manifest
    assert manifest["version"] == 1 and manifest["lineage"] == "default"
    assert manifest["source"] == source
    assert set(manifest["files"]) == names - {MANIFEST}
    # sha256 per file (what the file API hands out), BLAKE3 and size (what a reader checks).
    assert manifest["check"] == "blake3"
    assert set(manifest["blake3"]) == set(manifest["sizes"]) == set(manifest["files"])
    for name, digest in manifest["files"].items():
        data = (path / name).read_bytes()
        assert digest == hashlib.sha256(data).hexdigest(), name
        assert manifest["blake3"][name] == blake3.blake3(data).hexdigest(), name
        assert manifest["sizes"][name] == len(data), name
    assert verify_checkpoint(path, manifest) == manifest

    # No temporary directory left beside it.
    assert [p.name for p in path.parent.iterdir()] == ["v000001"]
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    return path


def test_hf_directory_becomes_version_1(
    make_store: Callable[..., tuple[Settings, Database]],
    hf_dir: Path,
    tiny_base: loader.LoadedBase,
) -> None:
    settings, db = make_store(str(hf_dir))
    ensure_base_checkpoint(settings, db)
    path = _check_version_1(settings, db, str(hf_dir))

    # The stored weights are the source's weights.
    eng = _engine(settings)
    try:
        ref = registry.champion(db, "default")
        assert ref is not None
        loaded = eng.load(ref)
        assert loaded.info.version == 1 and loaded.info.max_context == 512
        src = tiny_base.model.state_dict()
        for name, tensor in loaded.model.state_dict().items():
            assert torch.equal(tensor.cpu(), src[name]), name
    finally:
        eng.close()
    assert path.exists()


def test_gguf_file_becomes_version_1(
    make_store: Callable[..., tuple[Settings, Database]], gguf_file: tuple[Path, np.ndarray]
) -> None:
    gguf, embd = gguf_file
    settings, db = make_store(str(gguf))
    ensure_base_checkpoint(settings, db)
    _check_version_1(settings, db, str(gguf))

    eng = _engine(settings)
    try:
        ref = registry.champion(db, "default")
        assert ref is not None
        loaded = eng.load(ref)
        cfg = loaded.model.config
        assert (cfg.hidden_size, cfg.num_hidden_layers) == (64, 2)
        assert loaded.info.max_context == GGUF_DIMS["context"]
        # Dequantised from the GGUF and stored: the embedding matrix is the one written.
        stored = loaded.model.get_input_embeddings().weight.detach().cpu().numpy()
        np.testing.assert_array_equal(stored, embd)
        ids = loaded.tokenizer("Hello the world", add_special_tokens=False)["input_ids"]
        assert loaded.tokenizer.decode(ids) == "Hello the world"
    finally:
        eng.close()


def test_second_start_reuses_version_1(
    make_store: Callable[..., tuple[Settings, Database]],
    hf_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, db = make_store(str(hf_dir))
    first = ensure_base_checkpoint(settings, db)
    path = Path(first.path)
    mtimes = _mtimes(path)
    inode = path.stat().st_ino

    # A tripwire, not a stand-in: any second import would have to call the loader.
    def no_import(spec: str) -> Any:
        raise AssertionError(f"base model {spec} was imported again")

    monkeypatch.setattr(loader, "load_base", no_import)

    started = time.monotonic()
    again = ensure_base_checkpoint(settings, db)
    assert time.monotonic() - started < 2.0
    assert again == first and again.version == 1
    assert again.manifest == first.manifest

    # A fresh database over the same store (say, the DB was recreated): the files on disk
    # are verified and reused, not rewritten.
    settings2, db2 = make_store(str(hf_dir), db_name="second.db")
    reused = ensure_base_checkpoint(settings2, db2)
    assert reused.path == first.path and reused.version == 1
    assert reused.manifest == first.manifest  # same created_at: the same write
    assert _mtimes(path) == mtimes
    assert path.stat().st_ino == inode
    assert [p.name for p in path.parent.iterdir()] == ["v000001"]


def test_store_holding_another_model_is_refused(
    make_store: Callable[..., tuple[Settings, Database]], hf_dir: Path
) -> None:
    settings, db = make_store(str(hf_dir))
    ensure_base_checkpoint(settings, db)
    other, other_db = make_store("tiny:qwen2", db_name="other.db")
    with pytest.raises(CheckpointError, match="holds"):
        ensure_base_checkpoint(other, other_db)


# --------------------------------------------------------------------------- tampering


@pytest.fixture
def store_db(tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    db = Database(url)
    yield db
    db.dispose()


@pytest.fixture
def stored(
    tmp_path: Path, tiny_base: loader.LoadedBase, store_db: Database
) -> tuple[Path, dict[str, Any]]:
    ck = registry.publish(
        store_db,
        tmp_path / "store",
        "default",
        tiny_base.model,
        tiny_base.tokenizer,
        parent_version=None,
        source="tiny:llama",
    )
    assert ck.version == 1
    return ck.path, ck.manifest


def _ref(path: Path, manifest: dict[str, Any]) -> CheckpointRef:
    return CheckpointRef(lineage="default", version=1, path=path, manifest=manifest)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_is_detected(
    stored: tuple[Path, dict[str, Any]], make_tiny_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path, manifest = stored
    assert verify_checkpoint(path, manifest) == manifest  # intact to begin with
    _flip_byte(path / "model.safetensors")

    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        verify_checkpoint(path, manifest)

    eng = _engine(make_tiny_settings(tmp_path))
    try:
        with pytest.raises(CheckpointError):
            eng.load(_ref(path, manifest))
        assert eng.info() is None  # nothing was swapped in
    finally:
        eng.close()


def test_rewritten_manifest_is_caught_by_the_recorded_one(
    stored: tuple[Path, dict[str, Any]],
) -> None:
    path, manifest = stored
    _flip_byte(path / "model.safetensors")
    forged = json.loads(json.dumps(manifest))
    forged["blake3"]["model.safetensors"] = blake3.blake3(
        (path / "model.safetensors").read_bytes()
    ).hexdigest()
    (path / MANIFEST).write_text(json.dumps(forged))
    verify_checkpoint(path)  # the file on disk agrees with itself...
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(path, manifest)  # ...but not with the database's record


def test_tampered_store_is_refused_on_import(
    make_store: Callable[..., tuple[Settings, Database]], hf_dir: Path
) -> None:
    settings, db = make_store(str(hf_dir))
    first = ensure_base_checkpoint(settings, db)
    _flip_byte(Path(first.path) / "model.safetensors")
    fresh, fresh_db = make_store(str(hf_dir), db_name="fresh.db")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ensure_base_checkpoint(fresh, fresh_db)
    with fresh_db.session() as s:
        assert get_champion(s, "default") is None


@pytest.mark.parametrize("victim", ["tokenizer.json", "config.json", "model.safetensors"])
def test_missing_file_is_detected(
    stored: tuple[Path, dict[str, Any]],
    victim: str,
    make_tiny_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    path, manifest = stored
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verify_checkpoint(path, manifest)
    eng = _engine(make_tiny_settings(tmp_path))
    try:
        with pytest.raises(CheckpointError, match=re.escape(victim)):
            eng.load(_ref(path, manifest))
    finally:
        eng.close()


def test_broken_manifest_or_directory_is_detected(stored: tuple[Path, dict[str, Any]]) -> None:
    path, _ = stored
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        verify_checkpoint(path)
    (path / MANIFEST).write_text(json.dumps({"files": {}}))
    with pytest.raises(CheckpointError, match="no files"):
        verify_checkpoint(path)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing"):
        verify_checkpoint(path.parent / "v000009")


# --------------------------------------------------------------------------- atomic writes


class ExplodingModel:
    """Writes part of a checkpoint, then fails as a full disk would."""

    def save_pretrained(self, path: Any, **_: Any) -> None:
        (Path(path) / "model.safetensors").write_bytes(b"\0" * 4096)
        raise OSError(28, "No space left on device")


class ExplodingTokenizer:
    def save_pretrained(self, path: Any, **_: Any) -> None:
        (Path(path) / "tokenizer.json").write_text("{")
        raise RuntimeError("tokenizer save failed")


def _leftovers(lineage_dir: Path) -> list[str]:
    return sorted(p.name for p in lineage_dir.iterdir())


def _rows(db: Database) -> list[tuple[int, str]]:
    with db.session() as s:
        return sorted((c.version, c.status) for c in s.scalars(sa.select(Checkpoint)).all())


def _publish(db: Database, root: Path, model: Any, tok: Any, **kw: Any) -> CheckpointRef:
    kw.setdefault("parent_version", 1)
    kw.setdefault("source", "test")
    return registry.publish(db, root, "default", model, tok, **kw)


def test_failed_write_leaves_no_partial_checkpoint(
    stored: tuple[Path, dict[str, Any]], tiny_base: loader.LoadedBase, store_db: Database
) -> None:
    path, manifest = stored
    root, lineage_dir = path.parent.parent, path.parent
    before = _mtimes(path)
    model, tok = tiny_base.model, tiny_base.tokenizer

    with pytest.raises(OSError, match="No space"):
        _publish(store_db, root, ExplodingModel(), tok)
    assert _leftovers(lineage_dir) == ["v000001"], "a staging dir was left behind"

    with pytest.raises(RuntimeError, match="tokenizer"):
        _publish(store_db, root, model, ExplodingTokenizer())
    assert _leftovers(lineage_dir) == ["v000001"]

    # The existing version is never overwritten, and is untouched by all of the above.
    with pytest.raises(FileExistsError):
        _publish(store_db, root, model, tok, version=1)
    assert _leftovers(lineage_dir) == ["v000001"]
    assert _mtimes(path) == before
    assert verify_checkpoint(path, manifest) == manifest
    assert _rows(store_db) == [(1, "candidate")]

    # And a good write still works afterwards.
    ck = _publish(store_db, root, model, tok)
    assert ck.path == lineage_dir / "v000002" and ck.version == 2
    assert ck.manifest["version"] == 2 and ck.manifest["parent_version"] == 1
    assert verify_checkpoint(ck.path) == ck.manifest
    assert _leftovers(lineage_dir) == ["v000001", "v000002"]
    assert _rows(store_db) == [(1, "candidate"), (2, "candidate")]


def test_leftover_directory_is_numbered_past(
    stored: tuple[Path, dict[str, Any]], tiny_base: loader.LoadedBase, store_db: Database
) -> None:
    """A crash between rename and insert (an older release, kill -9) leaves a version
    directory with no row: the next publish takes the next number instead of failing."""
    path, _ = stored
    root, lineage_dir = path.parent.parent, path.parent
    orphan = lineage_dir / "v000002"
    shutil.copytree(path, orphan)
    ck = _publish(store_db, root, tiny_base.model, tiny_base.tokenizer)
    assert ck.version == 3 and ck.path == lineage_dir / "v000003"
    assert _rows(store_db) == [(1, "candidate"), (3, "candidate")]
    assert _leftovers(lineage_dir) == ["v000001", "v000002", "v000003"]


def test_row_that_cannot_be_recorded_takes_its_directory_back(
    stored: tuple[Path, dict[str, Any]], tiny_base: loader.LoadedBase, store_db: Database
) -> None:
    """The files are written, then the insert fails (here: a second champion, which the
    database's partial unique index refuses): no directory may stay behind."""
    path, _ = stored
    root, lineage_dir = path.parent.parent, path.parent
    with store_db.session() as s:
        registry.set_champion(s, "default", 1)
    with pytest.raises(IntegrityError):
        _publish(store_db, root, tiny_base.model, tiny_base.tokenizer, status="champion")
    assert _leftovers(lineage_dir) == ["v000001"]
    assert _rows(store_db) == [(1, "champion")]
    # The next publish is v2 as if nothing had happened.
    assert _publish(store_db, root, tiny_base.model, tiny_base.tokenizer).version == 2
