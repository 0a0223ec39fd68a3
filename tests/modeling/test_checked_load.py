"""Loading a checkpoint checks the bytes it loads: BLAKE3 (or sha256 for an old manifest)
over each file as it is read into process memory, against the manifest recorded in the
database — so a file damaged after it was written is refused, and the served weights are
the process's own copy, not a mapping of the file.

Real files written by core.registry.publish, a real SQLite database, the real loader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from core import registry, store
from core.db.session import Database, upgrade
from core.modeling import loader
from core.registry import CheckpointRef
from core.store import CheckpointError, verify_checkpoint

CPU = torch.device("cpu")
IDS = torch.tensor([[1, 2, 3, 4, 5]])


@pytest.fixture(scope="module")
def tiny_base() -> loader.LoadedBase:
    return loader.tiny_model("llama")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


@pytest.fixture
def ref(tmp_path: Path, tiny_base: loader.LoadedBase, db: Database) -> CheckpointRef:
    return registry.publish(
        db,
        tmp_path / "store",
        "default",
        tiny_base.model,
        tiny_base.tokenizer,
        parent_version=None,
        source="tiny:llama",
    )


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(IDS).logits
    return out


def _flip(fp: Path, where: float = 0.5) -> None:
    data = bytearray(fp.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    fp.write_bytes(bytes(data))


def _sha256_only(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as written before BLAKE3: sha256 per file, no sizes, no `check`."""
    return {k: v for k, v in manifest.items() if k not in ("blake3", "sizes", "check")}


def _rehash(path: Path, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """A manifest that records `name` as it now is (what a buggy writer would record)."""
    out: dict[str, Any] = json.loads(json.dumps(manifest))
    out["files"][name], out["blake3"][name], out["sizes"][name] = store.hash_file(path / name)
    return out


def test_loaded_model_matches_the_written_one(
    ref: CheckpointRef, tiny_base: loader.LoadedBase
) -> None:
    loaded = registry.open(ref, CPU, torch.float32)
    assert torch.equal(_logits(loaded.model), _logits(tiny_base.model))
    # Tied weights stay tied, and every parameter came from the file.
    m = loaded.model
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_old_sha256_manifest_still_verifies_and_serves(
    ref: CheckpointRef, tiny_base: loader.LoadedBase
) -> None:
    old = _sha256_only(ref.manifest)
    assert verify_checkpoint(ref.path, old) == old
    old_ref = CheckpointRef(lineage="default", version=1, path=ref.path, manifest=old)
    loaded = registry.open(old_ref, CPU, torch.float32)
    assert torch.equal(_logits(loaded.model), _logits(tiny_base.model))
    _flip(ref.path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"checksum mismatch .*\(sha256\)"):
        registry.open(old_ref, CPU, torch.float32)


@pytest.mark.parametrize(
    ("victim", "damage", "match"),
    [
        ("model.safetensors", "flip-middle", "checksum mismatch"),
        ("model.safetensors", "flip-header", "checksum mismatch"),
        ("model.safetensors", "flip-last", "checksum mismatch"),
        ("model.safetensors", "truncate", "size mismatch"),
        ("model.safetensors", "append", "size mismatch"),
        ("tokenizer.json", "flip-middle", "checksum mismatch"),
        ("config.json", "flip-middle", "checksum mismatch"),
    ],
)
def test_damage_after_the_write_is_refused_on_read(
    ref: CheckpointRef, victim: str, damage: str, match: str
) -> None:
    # Loaded once first: the second load reuses the tokenizer, but still reads every file.
    registry.open(ref, CPU, torch.float32)
    fp = ref.path / victim
    if damage == "truncate":
        os.truncate(fp, fp.stat().st_size - 1)
    elif damage == "append":
        with fp.open("ab") as f:
            f.write(b"\0")
    else:
        _flip(fp, {"flip-middle": 0.5, "flip-header": 0.0001, "flip-last": 0.9999}[damage])
    with pytest.raises(CheckpointError, match=match):
        registry.open(ref, CPU, torch.float32)
    with pytest.raises(CheckpointError, match=match):
        verify_checkpoint(ref.path, ref.manifest)
    # The same damage under an old (sha256, sizeless) manifest is a checksum mismatch.
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(ref.path, _sha256_only(ref.manifest))


def test_a_same_size_rewrite_with_a_rewritten_disk_manifest_is_refused(
    ref: CheckpointRef,
) -> None:
    fp = ref.path / "model.safetensors"
    _flip(fp)
    (ref.path / store.MANIFEST).write_text(json.dumps(_rehash(ref.path, ref.manifest, fp.name)))
    verify_checkpoint(ref.path)  # the directory agrees with itself...
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        registry.open(ref, CPU, torch.float32)  # ...not with the database's record


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(check="md5"), "unknown check"),
        (lambda m: m["blake3"].pop("model.safetensors"), "no blake3 for model.safetensors"),
        (lambda m: m.pop("blake3"), "no blake3 for"),
    ],
)
def test_a_manifest_that_cannot_be_checked_is_refused(
    ref: CheckpointRef, edit: Any, match: str
) -> None:
    manifest = json.loads(json.dumps(ref.manifest))
    edit(manifest)
    with pytest.raises(CheckpointError, match=match):
        verify_checkpoint(ref.path, manifest)
    bad = CheckpointRef(lineage="default", version=1, path=ref.path, manifest=manifest)
    with pytest.raises(CheckpointError, match=match):
        registry.open(bad, CPU, torch.float32)


def test_a_buggy_writer_recording_bad_weights_is_refused_not_crashed(
    ref: CheckpointRef,
) -> None:
    fp = ref.path / "model.safetensors"
    weights = load_file(fp)
    # A weights file lacking a layer, with digests that match it.
    dropped = "model.layers.0.mlp.down_proj.weight"
    save_file({k: v for k, v in weights.items() if k != dropped}, fp)
    lacking = CheckpointRef(
        lineage="default",
        version=1,
        path=ref.path,
        manifest=_rehash(ref.path, ref.manifest, fp.name),
    )
    with pytest.raises(CheckpointError, match="lacks weights"):
        registry.open(lacking, CPU, torch.float32)
    # A header pointing past the end of the data, with digests that match it.
    save_file(weights, fp)
    data = bytearray(fp.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header[dropped]["data_offsets"][1] += 1 << 30
    raw = json.dumps(header).encode()
    raw = raw.ljust(-(-len(raw) // 8) * 8)
    fp.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data[8 + n :]))
    outside = CheckpointRef(
        lineage="default",
        version=1,
        path=ref.path,
        manifest=_rehash(ref.path, ref.manifest, fp.name),
    )
    with pytest.raises(CheckpointError, match="outside the file"):
        registry.open(outside, CPU, torch.float32)


def test_served_weights_do_not_depend_on_the_file(ref: CheckpointRef) -> None:
    loaded = registry.open(ref, CPU, torch.float32)
    before = _logits(loaded.model)
    fp = ref.path / "model.safetensors"
    # No mapping of the checkpoint is left in the process (a mapping would SIGBUS on
    # truncation and change the weights on an in-place rewrite).
    assert str(fp) not in Path("/proc/self/maps").read_text()
    with fp.open("r+b") as f:  # in place: the same inode a mapping would see
        f.write(os.urandom(fp.stat().st_size))
    assert torch.equal(_logits(loaded.model), before)
    os.truncate(fp, 0)
    assert torch.equal(_logits(loaded.model), before)
    store.discard(ref.path)  # garbage collection of an old version
    assert not ref.path.exists()
    assert torch.equal(_logits(loaded.model), before)


@pytest.mark.parametrize("chunk", [loader.CONVERT_CHUNK, 1002])
def test_loading_in_another_dtype_converts_every_float_weight(
    ref: CheckpointRef, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tensors larger than the conversion buffer are converted a buffer at a time (1002
    # bytes: 250 float32 values, not a whole number of bytes, splits tensors at odd places).
    monkeypatch.setattr(loader, "CONVERT_CHUNK", chunk)
    f32 = registry.open(ref, CPU, torch.float32).model
    bf16 = registry.open(ref, CPU, torch.bfloat16).model
    for (name, a), (_, b) in zip(f32.state_dict().items(), bf16.state_dict().items(), strict=True):
        assert b.dtype == (torch.bfloat16 if a.is_floating_point() else a.dtype), name
        assert torch.equal(a.to(b.dtype), b), name
    assert bf16.lm_head.weight.data_ptr() == bf16.model.embed_tokens.weight.data_ptr()
