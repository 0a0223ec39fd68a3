"""The serving engine's batching thread, apart from the request side (torch_engine.py).

Requests go into a queue; one thread takes up to `max_batch_size` of them (waiting at most
`batch_wait_ms` for company) and decodes them together; with continuous batching, queued
requests join the running batch between steps. The model is read once per batch, so a swap
takes effect between batches and a batch always finishes on the model it started on;
after a swap, queued requests start a batch on the new model at once, stepped in turn with
the draining one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.admission import ServiceMeter, request_error
from app.engine.interface import EngineNotReadyError, GenerationResult, ModelInfo
from core.malloc import trim
from core.modeling.decode import BatchDecoder, Row, aborted
from core.modeling.details import token_details
from core.settings import Settings

log = logging.getLogger(__name__)

# While batches run, the heap's freed pages go back to the system at most this often
# (core/malloc.py): a step frees as much as it allocates, and glibc keeps what it freed
# resident, so without it a replica's memory under steady load follows its largest steps.
TRIM_INTERVAL_S = 1.0


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo


@dataclass
class Pending:
    row: Row
    future: Future[GenerationResult]
    enqueued: float
    started: float = 0.0
    first_token: float | None = None


@dataclass
class Call:
    """Work run on the decoding thread itself (`Batcher.call`)."""

    fn: Callable[[], Any]
    future: Future[Any]

    def run(self) -> None:
        try:
            self.future.set_result(self.fn())
        except BaseException as e:  # the caller gets it
            self.future.set_exception(e)


class Batcher:
    """The thread that decodes queued requests in batches on `current()`'s model."""

    def __init__(
        self, settings: Settings, current: Callable[[], LoadedModel | None], max_batch_size: int
    ) -> None:
        self.settings = settings
        self._current = current
        self.max_batch_size = max_batch_size
        # The decoding thread's intra-op threads, fixed by the thread itself when it starts.
        # torch gives a thread its *global* count the first time the thread asks for it or
        # runs an op (even after a set_num_threads of its own), and the swap thread lowers
        # that global to one (app/swap.py): decoding ran on one core of two until this.
        self.threads = settings.torch_threads or torch.get_num_threads()
        self.queue: queue.Queue[Pending | Call | None] = queue.Queue()
        self.stopping = threading.Event()
        self.batches = 0
        self.requests = 0
        self.generated_tokens = 0
        self.row_errors = 0
        # Rows decoding now, and the measured throughput (docs/reliability.md).
        self.in_flight: dict[int, Pending] = {}
        self.meter = ServiceMeter(max_batch_size)
        # Called from this thread with the rows in flight when a batch starts or grows (the
        # app's Prometheus histogram); must not raise.
        self.on_batch: Callable[[int], None] | None = None
        self._thread = threading.Thread(target=self._run, name="selflm-batcher", daemon=True)
        self._thread.start()

    def resize(self, max_batch_size: int) -> None:
        """Set the batch limit (the engine measures it when the first model loads)."""
        self.max_batch_size = max_batch_size
        self.meter.slots = max_batch_size

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the decoding thread (between batches) and return its result. The
        first model is loaded and warmed up there: torch work spread over two threads'
        OpenMP teams ran the decoding thread's steps slower than one thread doing both."""
        if not self.alive():
            return fn()
        item = Call(fn, Future())
        self.queue.put(item)
        return item.future.result()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self.stopping.set()
        self.queue.put(None)
        self._thread.join(timeout=30)

    # -- the thread ------------------------------------------------------------------
    def _collect(self) -> list[Pending]:
        first = self.queue.get()
        if first is None:
            return []
        if isinstance(first, Call):
            first.run()
            return []
        batch = [first]
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(batch) < self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.stopping.set()
                break
            if isinstance(item, Call):
                item.run()
                continue
            batch.append(item)
        return batch

    def _run(self) -> None:
        torch.get_num_threads()  # torch's per-thread initialisation first, then our count
        torch.set_num_threads(self.threads)
        torch.set_grad_enabled(False)
        served: int | None = None  # the version the last batch ran on
        while not self.stopping.is_set():
            batch = self._collect()
            batch = [p for p in batch if self._startable(p)]
            if batch:
                self._run_batch(batch)
            cur = self._current()
            version = cur.info.version if cur is not None else None
            del cur
            if served is not None and version != served:
                trim()  # the old model's last batch is done: its memory goes back
            served = version

    def _startable(self, p: Pending) -> bool:
        """Whether a queued request should start: not abandoned, not past its deadline."""
        if not p.future.set_running_or_notify_cancel():
            return False  # abandoned while queued: no work at all
        p.started = time.monotonic()
        why = aborted(p.row, p.started)
        if why is not None:
            p.future.set_exception(request_error(why))
            return False
        return True

    def _take(self, room: int) -> list[Pending]:
        """Up to `room` queued requests that can start now (none waits)."""
        taken: list[Pending] = []
        while len(taken) < room:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.stopping.set()
                break
            if isinstance(item, Call):
                item.run()
            elif self._startable(item):
                taken.append(item)
        return taken

    def _admit(self, cur: LoadedModel, room: int) -> list[Row]:
        """Queued requests that join the running batch (up to `room`)."""
        # After a swap the batch only drains: new rows start on the new model (_overlap).
        if self._current() is not cur or self.stopping.is_set():
            return []
        joined = self._take(room)
        self.in_flight.update({id(p.row): p for p in joined})
        self.requests += len(joined)
        if joined:
            self._note_batch(len(self.in_flight))
        return [p.row for p in joined]

    def _finish(self, cur: LoadedModel, row: Row) -> None:
        """Answer a row's request the moment it finishes."""
        p = self.in_flight.pop(id(row))
        if row.error is not None:  # this row alone stopped: its neighbours go on
            err = request_error(row.error)
            if err is row.error:  # its own failure, not a cancel or deadline
                self.row_errors += 1
            p.future.set_exception(err)
            return
        now = time.monotonic()
        self.meter.record(now - p.started)
        assert row.finish_reason is not None
        # As TGI: the EOS token that ended a row counts as a generated token.
        generated = len(row.generated) + (row.eos_token is not None)
        self.generated_tokens += generated
        p.future.set_result(
            GenerationResult(
                text=row.text,
                finish_reason=row.finish_reason,
                generated_tokens=generated,
                seed=row.seed,
                model_version=cur.info.version,
                prompt_tokens=len(row.prompt_ids),
                tokens=token_details(row, cur.tokenizer) if row.want_tokens else [],
                queue_s=max(0.0, p.started - p.enqueued),
                first_token_s=(p.first_token - p.enqueued) if p.first_token else None,
                total_s=now - p.enqueued,
            )
        )

    def _start(self, cur: LoadedModel, batch: list[Pending]) -> BatchDecoder:
        """A batch of `batch` on `cur`'s model: every row of it runs on that model."""
        self.in_flight.update({id(p.row): p for p in batch})
        self.batches += 1
        self.requests += len(batch)
        self._note_batch(len(self.in_flight))
        return BatchDecoder(
            cur.model,
            cur.tokenizer,
            [p.row for p in batch],
            admit=(lambda room: self._admit(cur, room))
            if self.settings.continuous_batching
            else None,
            on_finish=lambda row: self._finish(cur, row),
            max_rows=self.max_batch_size,
            pack_joins=None if self.settings.packed_joins else False,
        )

    def _run_batch(self, batch: list[Pending]) -> None:
        cur = self._current()  # one read: every row of this batch runs on this model
        if cur is None:
            for p in batch:
                p.future.set_exception(EngineNotReadyError("no model loaded yet"))
            return
        try:
            running = [(cur, self._start(cur, batch))]
            # Only `running` holds the model from here: after a swap, the old model is freed
            # when its rows drain, not when the new model's batch ends (under steady load
            # that batch may never end, and the old weights would stay resident).
            del cur
            trimmed = time.monotonic()
            while running:
                before = len(running)
                running = [(c, d) for c, d in running if d.step()]
                now = time.monotonic()
                # a drained old model's memory goes back beside the new batch at once
                if running and (len(running) < before or now - trimmed > TRIM_INTERVAL_S):
                    trim()
                    trimmed = now
                self._overlap(running)
        except Exception as e:  # a failed batch fails its requests, not the thread
            log.exception("batch of %d failed", len(self.in_flight))
            for p in self.in_flight.values():
                p.future.set_exception(e)
            self.in_flight.clear()

    def _overlap(self, running: list[tuple[LoadedModel, BatchDecoder]]) -> None:
        """After a swap, queued requests start a batch on the new model at once, stepped in
        turn with the old batch while that one drains (rather than after it)."""
        if not running or not self.settings.continuous_batching or self.stopping.is_set():
            return
        new = self._current()
        if new is None or any(c is new for c, _ in running):
            return
        batch = self._take(self.max_batch_size)
        if batch:
            log.info("v%d starts beside the draining batch", new.info.version)
            running.append((new, self._start(new, batch)))

    def _note_batch(self, size: int) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(size)
            except Exception:  # metrics never fail a batch
                log.warning("batch observer failed", exc_info=True)


def timed(
    pending: Pending, on_token: Callable[[int, float], None] | None
) -> Callable[[int, float], None]:
    """Wrap a row's token callback to note when its first token was chosen."""

    def call(tok: int, logprob: float) -> None:
        if pending.first_token is None:
            pending.first_token = time.monotonic()
        if on_token is not None:
            on_token(tok, logprob)

    return call
