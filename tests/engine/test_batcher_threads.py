"""The decoding thread (app/engine/batcher.py) with no HTTP in front: its torch thread
count, and what it does at a swap.

It keeps its intra-op thread count when another thread lowers torch's (the swap thread
runs on one core; app/swap.py): torch hands a thread its *global* count when the thread
first runs an op, so a count set before that used to be overwritten and the server decoded
on one core."""

from __future__ import annotations

import gc
import itertools
import threading
import time
import weakref
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import pytest
import torch

from app.engine.batcher import Batcher, LoadedModel, Pending
from app.engine.interface import ModelInfo
from core.modeling.decode import Row
from core.modeling.loader import tiny_model
from core.modeling.params import SamplingParams
from core.settings import Settings


@pytest.fixture
def restore_threads() -> Any:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # this thread's count and torch's global default


def test_decoding_thread_keeps_its_count_after_another_thread_lowers_torchs(
    restore_threads: Any,
) -> None:
    seen: list[int] = []

    def current() -> None:  # runs on the decoding thread when a batch starts
        seen.append(torch.get_num_threads())

    batcher = Batcher(Settings(torch_threads=2, redis_url=None), current, 4)
    try:
        time.sleep(0.2)  # the decoding thread has started and is waiting for work
        lower = threading.Thread(target=torch.set_num_threads, args=(1,))
        lower.start()
        lower.join()
        fut: Future[Any] = Future()
        batcher.queue.put(Pending(Row([1, 2], SamplingParams(2)), fut, time.monotonic()))
        with pytest.raises(Exception, match="no model loaded"):
            fut.result(timeout=30)
    finally:
        batcher.close()
    assert seen and set(seen) == {2}, seen


def _loaded(version: int) -> LoadedModel:
    base = tiny_model("llama", seed=version)
    base.model.eval()
    info = ModelInfo(version, f"tiny-v{version}", "float32", "cpu", 512, datetime.now(UTC), 0)
    return LoadedModel(base.model, base.tokenizer, info)


def test_after_a_swap_new_requests_start_beside_the_draining_batch() -> None:
    """The swap's gap: a request queued after a swap starts on the new model at once, not
    after the old batch has drained (and the old batch still finishes on the old model)."""
    v1, v2 = _loaded(1), _loaded(2)
    serving = [v1]
    finished: list[int] = []
    batcher = Batcher(Settings(redis_url=None), lambda: serving[0], 4)
    try:
        long_row = Row([1, 2, 3], SamplingParams(400))  # this tiny model's greedy row: no EOS
        old: Future[Any] = Future()
        old.add_done_callback(lambda f: finished.append(f.result().model_version))
        batcher.queue.put(Pending(long_row, old, time.monotonic()))
        deadline = time.monotonic() + 30
        while len(long_row.generated) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(long_row.generated) >= 5, "the first batch never started"
        serving[0] = v2  # the swap
        new: Future[Any] = Future()
        new.add_done_callback(lambda f: finished.append(f.result().model_version))
        batcher.queue.put(Pending(Row([4, 5], SamplingParams(3)), new, time.monotonic()))
        assert new.result(timeout=60).model_version == 2
        assert not old.done(), "the new request waited for the old batch to drain"
        assert old.result(timeout=120).model_version == 1
    finally:
        batcher.close()
    assert finished == [2, 1]


def test_after_a_swap_the_old_model_is_freed_while_the_new_batch_keeps_running() -> None:
    """Under steady load the new model's continuous batch never ends; the old model must be
    freed when its own rows drain, not when that batch ends (it stayed resident: ~256 MiB of
    bf16 weights on the bundled model, docs/benchmarks.md)."""
    v1, v2 = _loaded(1), _loaded(2)
    old_model = weakref.ref(v1.model)
    serving = [v1]
    batcher = Batcher(Settings(redis_url=None), lambda: serving[0], 8)
    stop = threading.Event()
    fed: list[Pending] = []

    def feed() -> None:  # steady load on the new model: always two rows in flight
        while not stop.is_set():
            if sum(not p.future.done() for p in fed) < 2:
                p = Pending(Row([1, 2, 3], SamplingParams(120)), Future(), time.monotonic())
                fed.append(p)
                batcher.queue.put(p)
            time.sleep(0.005)

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        long_row = Row([1, 2, 3], SamplingParams(40))
        old: Future[Any] = Future()
        batcher.queue.put(Pending(long_row, old, time.monotonic()))
        deadline = time.monotonic() + 30
        while len(long_row.generated) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(long_row.generated) >= 3 and not old.done(), "no old batch to drain"
        serving[0] = v2  # the swap; nothing outside the batcher holds v1 any more
        del v1
        feeder.start()
        assert old.result(timeout=60).model_version == 1
        batches = batcher.batches  # the old batch and the new model's one
        deadline = time.monotonic() + 30
        while old_model() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.02)
        assert old_model() is None, "the old model stayed resident beside the new batch"
        # ...while the new model's batch was still running: no batch ended and restarted.
        assert batcher.batches == batches and batcher.in_flight
        assert all(p.future.result(timeout=60).model_version == 2 for p in fed[:2])
    finally:
        stop.set()
        for p in fed:
            p.row.cancelled = True
        batcher.close()


def test_a_long_batch_trims_the_heap_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """While one batch runs for seconds, its freed heap pages go back every
    TRIM_INTERVAL_S (steady serving never reaches the end of a batch, where the old code
    trimmed only after a swap)."""
    from app.engine import batcher as batcher_module

    calls: list[float] = []
    monkeypatch.setattr(batcher_module, "TRIM_INTERVAL_S", 0.01)
    monkeypatch.setattr(batcher_module, "trim", lambda: calls.append(time.monotonic()))
    v1 = _loaded(1)
    batcher = Batcher(Settings(redis_url=None), lambda: v1, 4)
    try:
        row = Row([1, 2, 3], SamplingParams(400))  # no EOS on this tiny model: 400 steps
        done: Future[Any] = Future()
        started = time.monotonic()
        batcher.queue.put(Pending(row, done, started))
        done.result(timeout=120)
        took = time.monotonic() - started
    finally:
        batcher.close()
    assert took > 0.05, took  # 400 steps: many intervals (0.5 s on a quiet 2-core machine)
    assert len(calls) >= 2, calls
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(g >= 0.01 for g in gaps), gaps  # at most once an interval
