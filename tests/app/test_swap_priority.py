"""The swap thread's niceness comes from SELFLM_SWAP_NICE (Linux: per thread)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from app.swap import _lower_thread_priority
from core.settings import Settings


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
@pytest.mark.parametrize("nice", [7, 19])
def test_the_swap_thread_runs_at_the_configured_niceness(nice: int) -> None:
    seen: list[int] = []

    def body() -> None:
        _lower_thread_priority(nice)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    threads = torch.get_num_threads()
    try:
        t = threading.Thread(target=body)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(threads)  # the call lowers torch's global default too
    assert seen == [max(nice, mine)]  # a process already niced more stays so
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # that thread only


def test_the_setting_is_bounded() -> None:
    assert Settings().swap_nice == 19
    with pytest.raises(ValueError):
        Settings(swap_nice=-1)  # raising priority is not the swap's to ask
    with pytest.raises(ValueError):
        Settings(swap_nice=20)
