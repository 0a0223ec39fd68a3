"""The transformers engine: a batching thread in front of the champion model.

Requests go into a queue; one thread takes up to `max_batch_size` of them (waiting at most
`batch_wait_ms` for company) and decodes them together. The model reference is read once
per batch, so a swap takes effect between batches and a batch always finishes on the
model it started on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from app.engine import surface
from app.engine.admission import ServiceMeter, abandon_signal, check_admission, request_error
from app.engine.admission import deadline as request_deadline
from app.engine.interface import (
    EngineDeadlineError,
    EngineNotReadyError,
    EngineOverloadedError,
    EngineValidationError,
    GenerationResult,
    ModelInfo,
    PromptDetails,
    RequestCancelledError,
    StreamToken,
)
from app.limits import current_request
from core import registry
from core.modeling.decode import Row, aborted, decode_batch, token_details
from core.modeling.device import dtype_name, pick_device, pick_dtype
from core.modeling.params import SamplingParams, TopToken
from core.registry import CheckpointRef
from core.settings import Settings
from core.store import weights_bytes

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo


@dataclass
class _Pending:
    row: Row
    future: Future[GenerationResult]
    enqueued: float
    started: float = 0.0
    first_token: float | None = None


class _Gone:
    """Stream sentinel: the request was abandoned (client gone or deadline passed)."""


def context_length(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


class TorchEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="selflm-batcher", daemon=True)
        self._thread.start()
        self.batches = 0
        self.requests = 0
        self.generated_tokens = 0
        # Overload and abandonment (docs/reliability.md): rows decoding now, measured
        # throughput, and what was shed, abandoned, expired or failed on its own.
        self._in_flight: dict[int, _Pending] = {}
        self.meter = ServiceMeter(settings.max_batch_size)
        self.shed = 0
        self.cancelled = 0
        self.expired = 0
        self.row_errors = 0
        # Called from the batching thread with the rows in flight when a batch starts or
        # grows (the app's Prometheus histogram); must not raise.
        self.on_batch: Callable[[int], None] | None = None

    # -- model lifecycle -------------------------------------------------------------
    def load(self, ref: CheckpointRef) -> LoadedModel:
        """Verify and load a checkpoint beside the serving one (does not swap)."""
        loaded = registry.open(ref, self.device, self.dtype)
        model, tokenizer, p, version = loaded.model, loaded.tokenizer, ref.path, ref.version
        info = ModelInfo(
            version=version,
            model_id=str(ref.manifest.get("source", p.name)),
            dtype=dtype_name(self.dtype),
            device=str(self.device),
            max_context=context_length(model.config),
            loaded_at=datetime.now(UTC),
            weights_bytes=weights_bytes(p),
        )
        log.info("loaded v%d from %s on %s/%s", version, p, info.device, info.dtype)
        return LoadedModel(model=model, tokenizer=tokenizer, info=info)

    def swap(self, loaded: LoadedModel) -> None:
        with self._lock:
            self._current = loaded
        log.info("now serving v%d", loaded.info.version)

    def current(self) -> LoadedModel:
        with self._lock:
            cur = self._current
        if cur is None:
            raise EngineNotReadyError("no model loaded yet")
        return cur

    def info(self) -> ModelInfo | None:
        with self._lock:
            return self._current.info if self._current else None

    def health(self) -> dict[str, Any]:
        info = self.info()
        return {
            "model_loaded": info is not None,
            "serving_version": info.version if info else None,
            "batcher_alive": self._thread.is_alive(),
            "queue_depth": self._queue.qsize(),
            "batches_total": self.batches,
            "requests_total": self.requests,
            "generated_tokens_total": self.generated_tokens,
            "requests_running": len(self._in_flight),
            "service_rate_rps": self.meter.rate(),
            "shed_total": self.shed,
            "cancelled_total": self.cancelled,
            "expired_total": self.expired,
            "row_errors_total": self.row_errors,
        }

    # -- requests --------------------------------------------------------------------
    def count_prompt_tokens(self, prompt: str, params: SamplingParams) -> int:
        return len(self._prompt_ids(self.current(), prompt, params))

    def _prompt_ids(self, cur: LoadedModel, prompt: str, params: SamplingParams) -> list[int]:
        try:
            ids: list[int] = cur.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        except (TypeError, ValueError, UnicodeError) as e:  # e.g. a lone surrogate
            raise EngineValidationError(f"`inputs` cannot be tokenized: {e}") from e
        if params.truncate is not None:
            ids = ids[-params.truncate :]
        if not ids:
            raise EngineValidationError("`inputs` tokenizes to zero tokens")
        limit = cur.info.max_context
        if len(ids) + params.max_new_tokens > limit:
            raise EngineValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {limit}. "
                f"Given: {len(ids)} `inputs` tokens and {params.max_new_tokens} "
                "`max_new_tokens`"
            )
        return ids

    def submit(
        self,
        prompt: str,
        params: SamplingParams,
        details: bool = False,
        on_token: Callable[[int, float], None] | None = None,
        deadline: float | None = None,
        rows: list[Row] | None = None,
    ) -> Future[GenerationResult]:
        self._check_admission(deadline)
        row = self._make_row(self.current(), prompt, params, details, deadline)
        return self._enqueue(row, on_token, rows)

    # -- admission, deadlines and abandonment (docs/reliability.md) --------------------
    def _check_admission(self, deadline: float | None) -> None:
        """Shed before any work: a full queue, or a wait longer than allowed."""
        budget = None if deadline is None else deadline - time.monotonic()
        try:
            check_admission(
                self._queue.qsize(),
                self.settings.max_queue,
                self.settings.max_queue_wait_s,
                self.meter.rate(),
                budget,
            )
        except EngineOverloadedError:
            self.shed += 1
            raise

    def _make_row(
        self,
        cur: LoadedModel,
        prompt: str,
        params: SamplingParams,
        details: bool,
        deadline: float | None,
    ) -> Row:
        ids = self._prompt_ids(cur, prompt, params)
        try:
            return Row(prompt_ids=ids, params=params, want_tokens=details, deadline=deadline)
        except (RuntimeError, ValueError, OverflowError) as e:  # a seed torch cannot take
            raise EngineValidationError(f"invalid sampling parameters: {e}") from e

    def _enqueue(
        self,
        row: Row,
        on_token: Callable[[int, float], None] | None,
        rows: list[Row] | None,
    ) -> Future[GenerationResult]:
        if self._queue.qsize() >= self.settings.max_queue:
            self.shed += 1
            raise EngineOverloadedError("Model is overloaded")
        fut: Future[GenerationResult] = Future()
        pending = _Pending(row=row, future=fut, enqueued=time.monotonic())
        row.on_token = _timed(pending, on_token)
        if rows is not None:  # the caller sees its row before the batcher does
            rows.append(row)
        self._queue.put(pending)
        return fut

    async def _submit(
        self,
        prompt: str,
        params: SamplingParams,
        details: bool,
        on_token: Callable[[int, float], None] | None,
        rows: list[Row] | None = None,
    ) -> tuple[Future[GenerationResult], Row]:
        ctx = current_request()
        deadline = request_deadline(
            self.settings.request_timeout_s, ctx.timeout_header if ctx else None
        )
        self._check_admission(deadline)  # the queue is checked before any work
        cur = self.current()
        # Tokenizing a long prompt takes a while: never on the event loop.
        row = await run_in_threadpool(self._make_row, cur, prompt, params, details, deadline)
        return self._enqueue(row, on_token, rows), row

    def _abandon(self, row: Row, fut: Future[GenerationResult], why: BaseException) -> None:
        """Drop the request's work: a queued row is never started, a running one leaves
        its batch at the next step."""
        row.cancelled = True
        fut.cancel()
        if isinstance(why, EngineDeadlineError):
            self.expired += 1
        else:
            self.cancelled += 1

    async def generate(
        self, prompt: str, params: SamplingParams, details: bool = False
    ) -> GenerationResult:
        fut, row = await self._submit(prompt, params, details, None)
        result = asyncio.wrap_future(fut)
        abandon = asyncio.ensure_future(abandon_signal(row.deadline, current_request()))
        either: set[asyncio.Future[Any]] = {result, abandon}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._abandon(row, fut, RequestCancelledError("cancelled"))
            raise
        finally:
            abandon.cancel()
        if result.done():
            return result.result()
        why = abandon.result()
        self._abandon(row, fut, why)
        result.cancel()
        raise why

    async def stream(
        self, prompt: str, params: SamplingParams
    ) -> AsyncIterator[StreamToken | GenerationResult]:
        """Tokens as they are chosen, then the final result."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[int, float, tuple[TopToken, ...]] | _Gone | None]
        q = asyncio.Queue()
        tokenizer = self.current().tokenizer
        rows: list[Row] = []

        def on_token(tok: int, logprob: float) -> None:
            # The decoding thread notes a row's top-n alternatives before this call.
            tops = rows[0].tops if rows else []
            top = tops[-1] if params.top_n_tokens and tops else ()
            loop.call_soon_threadsafe(q.put_nowait, (tok, logprob, top))

        fut, row = await self._submit(prompt, params, False, on_token, rows)
        fut.add_done_callback(lambda _: loop.call_soon_threadsafe(q.put_nowait, None))
        abandon = asyncio.ensure_future(abandon_signal(row.deadline, current_request()))
        abandon.add_done_callback(lambda t: None if t.cancelled() else q.put_nowait(_Gone()))
        ids: list[int] = []
        text = ""
        special = set(tokenizer.all_special_ids)
        try:
            while (item := await q.get()) is not None:
                if isinstance(item, _Gone):
                    why = abandon.result()
                    self._abandon(row, fut, why)
                    raise why
                tok, logprob, top = item
                if tok in special:
                    piece = tokenizer.decode([tok], skip_special_tokens=False)
                else:
                    ids.append(tok)
                    # Decode the whole prefix: a token may complete a multi-byte character.
                    full = tokenizer.decode(ids, skip_special_tokens=True)
                    piece, text = full[len(text) :], full
                yield StreamToken(
                    id=tok, text=piece, logprob=logprob, special=tok in special, top=top
                )
            result: GenerationResult = await asyncio.wrap_future(fut)
        finally:
            abandon.cancel()
            if not fut.done() and not row.cancelled:  # the consumer stopped listening
                self._abandon(row, fut, RequestCancelledError("cancelled"))
        yield result

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- batching thread -------------------------------------------------------------
    def _collect(self) -> list[_Pending]:
        first = self._queue.get()
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(batch) < self.settings.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stop.set()
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            batch = self._collect()
            batch = [p for p in batch if self._startable(p)]
            if batch:
                self._run_batch(batch)

    def _startable(self, p: _Pending) -> bool:
        """Whether a queued request should start: not abandoned, not past its deadline."""
        if not p.future.set_running_or_notify_cancel():
            return False  # abandoned while queued: no work at all
        p.started = time.monotonic()
        why = aborted(p.row, p.started)
        if why is not None:
            p.future.set_exception(request_error(why))
            return False
        return True

    def _run_batch(self, batch: list[_Pending]) -> None:
        cur = self._current  # one read: every row of this batch runs on this model
        if cur is None:
            for p in batch:
                p.future.set_exception(EngineNotReadyError("no model loaded yet"))
            return
        in_flight = self._in_flight
        in_flight.update({id(p.row): p for p in batch})

        def admit(room: int) -> list[Row]:
            # After a swap the batch only drains: new rows start on the new model.
            if self._current is not cur or self._stop.is_set():
                return []
            joined: list[Row] = []
            while len(joined) < room:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._stop.set()
                    break
                if self._startable(item):
                    in_flight[id(item.row)] = item
                    joined.append(item.row)
            self.requests += len(joined)
            if joined:
                self._note_batch(len(in_flight))
            return joined

        def on_finish(row: Row) -> None:
            p = in_flight.pop(id(row))
            if row.error is not None:  # this row alone stopped: its neighbours go on
                err = request_error(row.error)
                if err is row.error:  # its own failure, not a cancel or deadline
                    self.row_errors += 1
                p.future.set_exception(err)
                return
            now = time.monotonic()
            self.meter.record(now - p.started)
            assert row.finish_reason is not None and cur is not None
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

        self.batches += 1
        self.requests += len(batch)
        self._note_batch(len(in_flight))
        try:
            decode_batch(
                cur.model,
                cur.tokenizer,
                [p.row for p in batch],
                admit=admit if self.settings.continuous_batching else None,
                on_finish=on_finish,
                max_rows=self.settings.max_batch_size,
            )
        except Exception as e:  # a failed batch fails its requests, not the thread
            log.exception("batch of %d failed", len(in_flight))
            for p in in_flight.values():
                p.future.set_exception(e)
            in_flight.clear()

    # -- surface features (TGI / OpenAI) ---------------------------------------------
    def _note_batch(self, size: int) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(size)
            except Exception:  # metrics never fail a batch
                log.warning("batch observer failed", exc_info=True)

    def tokenize(self, text: str) -> list[tuple[int, str, int, int]]:
        """TGI's /tokenize: (id, text, start, stop) per token, offsets into `text`."""
        return surface.tokenize(self.current().tokenizer, text)

    def decode_tokens(self, ids: list[int]) -> dict[int, str]:
        return surface.decode_tokens(self.current().tokenizer, ids)

    def prompt_details(self, prompt: str, params: SamplingParams) -> PromptDetails:
        """Prompt tokens with their log-probabilities (runs in the caller's thread)."""
        cur = self.current()
        ids = self._prompt_ids(cur, prompt, params)
        return surface.prompt_details(cur.model, cur.tokenizer, ids, params.top_n_tokens)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages with the serving checkpoint's chat template."""
        return surface.chat_prompt(self.current().tokenizer, messages)


def _timed(
    pending: _Pending, on_token: Callable[[int, float], None] | None
) -> Callable[[int, float], None]:
    """Wrap a row's token callback to note when its first token was chosen."""

    def call(tok: int, logprob: float) -> None:
        if pending.first_token is None:
            pending.first_token = time.monotonic()
        if on_token is not None:
            on_token(tok, logprob)

    return call
