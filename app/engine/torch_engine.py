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

from app.engine.interface import (
    EngineNotReadyError,
    EngineOverloadedError,
    EngineValidationError,
    GenerationResult,
    ModelInfo,
    StreamToken,
)
from core import registry
from core.modeling.decode import Row, decode_batch, token_details
from core.modeling.device import dtype_name, pick_device, pick_dtype
from core.modeling.params import SamplingParams
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
        }

    # -- requests --------------------------------------------------------------------
    def count_prompt_tokens(self, prompt: str, params: SamplingParams) -> int:
        return len(self._prompt_ids(self.current(), prompt, params))

    def _prompt_ids(self, cur: LoadedModel, prompt: str, params: SamplingParams) -> list[int]:
        ids: list[int] = cur.tokenizer(prompt, add_special_tokens=False)["input_ids"]
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
    ) -> Future[GenerationResult]:
        cur = self.current()
        row = Row(
            prompt_ids=self._prompt_ids(cur, prompt, params),
            params=params,
            want_tokens=details,
            on_token=on_token,
        )
        if self._queue.qsize() >= self.settings.max_queue:
            raise EngineOverloadedError("Model is overloaded")
        fut: Future[GenerationResult] = Future()
        self._queue.put(_Pending(row=row, future=fut, enqueued=time.monotonic()))
        return fut

    async def generate(
        self, prompt: str, params: SamplingParams, details: bool = False
    ) -> GenerationResult:
        return await asyncio.wrap_future(self.submit(prompt, params, details))

    async def stream(
        self, prompt: str, params: SamplingParams
    ) -> AsyncIterator[StreamToken | GenerationResult]:
        """Tokens as they are chosen, then the final result."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
        tokenizer = self.current().tokenizer

        def on_token(tok: int, logprob: float) -> None:
            loop.call_soon_threadsafe(q.put_nowait, (tok, logprob))

        fut = self.submit(prompt, params, on_token=on_token)
        fut.add_done_callback(lambda _: loop.call_soon_threadsafe(q.put_nowait, None))
        ids: list[int] = []
        text = ""
        special = set(tokenizer.all_special_ids)
        while (item := await q.get()) is not None:
            tok, logprob = item
            ids.append(tok)
            # Decode the whole prefix: a token may complete a multi-byte character.
            full = tokenizer.decode(ids, skip_special_tokens=True)
            piece, text = full[len(text) :], full
            yield StreamToken(id=tok, text=piece, logprob=logprob, special=tok in special)
        result: GenerationResult = await asyncio.wrap_future(fut)
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
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Pending]) -> None:
        cur = self._current  # one read: every row of this batch runs on this model
        if cur is None:
            for p in batch:
                p.future.set_exception(EngineNotReadyError("no model loaded yet"))
            return
        in_flight = {id(p.row): p for p in batch}

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
                if item.future.set_running_or_notify_cancel():
                    in_flight[id(item.row)] = item
                    joined.append(item.row)
            self.requests += len(joined)
            return joined

        def on_finish(row: Row) -> None:
            p = in_flight.pop(id(row))
            assert row.finish_reason is not None and cur is not None
            self.generated_tokens += len(row.generated)
            p.future.set_result(
                GenerationResult(
                    text=row.text,
                    finish_reason=row.finish_reason,
                    generated_tokens=len(row.generated),
                    seed=row.seed,
                    model_version=cur.info.version,
                    prompt_tokens=len(row.prompt_ids),
                    tokens=token_details(row, cur.tokenizer) if row.want_tokens else [],
                )
            )

        self.batches += 1
        self.requests += len(batch)
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
