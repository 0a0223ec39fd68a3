"""The decoding thread keeps its intra-op thread count when another thread lowers torch's
(the swap thread runs on one core; app/swap.py). torch hands a thread its *global* count
when the thread first runs an op, so a count set before that used to be overwritten and the
server decoded on one core."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from app.engine.batcher import Batcher, Pending
from core.modeling.decode import Row
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
