"""The transformers engine, request side: admission, tokenizing, deadlines, streaming.

Requests go to the batching thread (app/engine/batcher.py), which decodes them together on
the serving model. The batch limit is measured when the first model loads unless
SELFLM_MAX_BATCH_SIZE sets it, and every loaded model is warmed up over the batch sizes
the server will see (app/engine/sizing.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from app.engine import sizing, surface
from app.engine.admission import abandon_signal, check_admission
from app.engine.admission import deadline as request_deadline
from app.engine.batcher import Batcher, LoadedModel, Pending, timed
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
from core.malloc import trim
from core.modeling.decode import Row
from core.modeling.detok import Detokenizer, special_ids
from core.modeling.device import dtype_name, pick_device, pick_dtype
from core.modeling.params import SamplingParams, TopToken
from core.registry import CheckpointRef
from core.settings import Settings
from core.store import weights_bytes

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "TorchEngine", "context_length"]


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
        # SELFLM_MAX_BATCH_SIZE, or measured when the first model loads (0 / "auto").
        self._batch_set = settings.max_batch_size or None
        self.sizing: sizing.Sizing | None = None
        self._batcher = Batcher(settings, lambda: self._current, self._batch_set or 1)
        # Overload and abandonment (docs/reliability.md): what was shed, abandoned, expired.
        self.shed = 0
        self.cancelled = 0
        self.expired = 0

    # The batching thread's counters and observer (tests and the metrics read them here).
    @property
    def batches(self) -> int:
        return self._batcher.batches

    @property
    def requests(self) -> int:
        return self._batcher.requests

    @property
    def generated_tokens(self) -> int:
        return self._batcher.generated_tokens

    @property
    def row_errors(self) -> int:
        return self._batcher.row_errors

    @property
    def meter(self) -> Any:
        return self._batcher.meter

    @property
    def max_batch_size(self) -> int:
        return self._batcher.max_batch_size

    @property
    def on_batch(self) -> Callable[[int], None] | None:
        return self._batcher.on_batch

    @on_batch.setter
    def on_batch(self, observer: Callable[[int], None] | None) -> None:
        self._batcher.on_batch = observer

    # -- model lifecycle -------------------------------------------------------------
    def load(self, ref: CheckpointRef) -> LoadedModel:
        """Verify and load a checkpoint beside the serving one (does not swap). The first
        one is loaded and warmed up on the decoding thread (Batcher.call); a swap's, on the
        caller's (the swap thread: one torch thread, nice `SELFLM_SWAP_NICE`)."""
        if self._current is None:
            loaded: LoadedModel = self._batcher.call(lambda: self._load(ref))
            return loaded
        return self._load(ref)

    def _load(self, ref: CheckpointRef) -> LoadedModel:
        serving = self.settings.model_impl == "auto"
        loaded = registry.open(ref, self.device, self.dtype, serving=serving)
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
        self._warm_up(model, info)
        trim()  # the load's and warm-up's freed buffers go back to the system
        return LoadedModel(model=model, tokenizer=tokenizer, info=info)

    def _warm_up(self, model: Any, info: ModelInfo) -> None:
        """Warm a model up over the batch sizes it will serve (before it is swapped in);
        the first time, with no SELFLM_MAX_BATCH_SIZE, the batch limit is measured."""
        limit = self._batch_set or (self.sizing.limit if self.sizing else None)
        try:
            measured = sizing.measure(model, self.device, info.max_context, limit)
        except Exception:  # a model the warm-up cannot drive still serves
            log.warning("warm-up failed; batch limit %d", self.max_batch_size, exc_info=True)
            if self.sizing is None and self._batch_set is None:
                self._batcher.resize(sizing.FLOOR)
                self.settings.max_batch_size = sizing.FLOOR
            return
        if self.sizing is None:
            self.sizing = measured
            self._batcher.resize(measured.limit)
            # /info reports the limit in force.
            self.settings.max_batch_size = measured.limit

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
            "batcher_alive": self._batcher.alive(),
            "queue_depth": self._batcher.queue.qsize(),
            "batches_total": self.batches,
            "requests_total": self.requests,
            "generated_tokens_total": self.generated_tokens,
            "requests_running": len(self._batcher.in_flight),
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
                self._batcher.queue.qsize(),
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
        if self._batcher.queue.qsize() >= self.settings.max_queue:
            self.shed += 1
            raise EngineOverloadedError("Model is overloaded")
        fut: Future[GenerationResult] = Future()
        pending = Pending(row=row, future=fut, enqueued=time.monotonic())
        row.on_token = timed(pending, on_token)
        if rows is not None:  # the caller sees its row before the batcher does
            rows.append(row)
        self._batcher.queue.put(pending)
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
            try:
                return result.result()
            except EngineDeadlineError:  # the decoding thread saw the deadline first
                self.expired += 1
                raise
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
        special = special_ids(tokenizer)
        # Each token's text from a short window (a token may complete a multi-byte
        # character): constant work per token, not a decode of the whole prefix.
        detok = Detokenizer(tokenizer, special)
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
                    piece = detok.push(tok)
                yield StreamToken(
                    id=tok, text=piece, logprob=logprob, special=tok in special, top=top
                )
            try:
                result: GenerationResult = await asyncio.wrap_future(fut)
            except EngineDeadlineError:  # the decoding thread saw the deadline first
                self.expired += 1
                raise
        finally:
            abandon.cancel()
            if not fut.done() and not row.cancelled:  # the consumer stopped listening
                self._abandon(row, fut, RequestCancelledError("cancelled"))
        yield result

    def close(self) -> None:
        self._batcher.close()

    # -- surface features (TGI / OpenAI) ---------------------------------------------
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
