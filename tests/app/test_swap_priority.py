"""The swap thread's niceness comes from SELFLM_SWAP_NICE (Linux: per thread)."""

from __future__ import annotations

import os
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from app.routes import checkpoints
from app.swap import lower_thread_priority
from core import registry
from core.settings import Settings


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
@pytest.mark.parametrize("nice", [7, 19])
def test_the_swap_thread_runs_at_the_configured_niceness(nice: int) -> None:
    seen: list[int] = []

    def body() -> None:
        lower_thread_priority(nice)
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


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
def test_a_manual_promotion_verifies_at_the_swap_niceness(monkeypatch: pytest.MonkeyPatch) -> None:
    """POST /checkpoints/{v}/promote hashes the files off the serving threads' priority."""
    seen: list[int] = []

    def promote(*_: object, **__: object) -> None:  # where registry.promote hashes the files
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    monkeypatch.setattr(registry, "promote", promote)
    state = SimpleNamespace(settings=Settings(swap_nice=13), db=None, extras={})
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    threads = torch.get_num_threads()
    try:
        assert checkpoints._promote(state, 2)["champion_version"] == 2  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
    assert seen == [max(13, mine)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_the_setting_is_bounded() -> None:
    assert Settings().swap_nice == 19
    with pytest.raises(ValueError):
        Settings(swap_nice=-1)  # raising priority is not the swap's to ask
    with pytest.raises(ValueError):
        Settings(swap_nice=20)
