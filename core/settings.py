"""One settings object for the API, the worker and the CLI (environment prefix ``SELFLM_``).

Nothing reads configuration at import time: callers build ``Settings()`` (or use
``get_settings()``) when they start, so tests can set the environment first.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Route groups SELFLM_OPEN_ROUTES may open when keys are set (app/auth.py).
OPEN_GROUPS = frozenset({"inference", "reads", "metrics", "docs"})
DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


def _cwd_path(value: str) -> str:
    """Resolve a relative path against the working directory at settings time."""
    return str((Path(os.getcwd()) / value).resolve()) if not os.path.isabs(value) else value


def _resolve_sqlite_url(url: str) -> str:
    # sqlite:///./x.db is relative to the process cwd; pin it now so the API and the
    # worker it spawns agree even if one of them changes directory.
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and ":memory:" not in url:
        return prefix + _cwd_path(url[len(prefix) :])
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SELFLM_", extra="ignore")

    database_url: str = "sqlite:///./data/selflm.db"
    # Empty means the server-less filesystem transport under <data dir>/broker.
    broker_url: str = ""
    redis_url: str | None = None
    checkpoint_dir: str = "./data/checkpoints"
    base_model: str = "bundled:smollm2-135m-instruct"
    lineage: str = "default"
    device: DeviceName = "auto"
    dtype: DtypeName = "auto"
    # How a replica runs the model: "auto" serves a Llama checkpoint with the engine's own
    # forward (core/modeling/llama.py: no transformers modelling stack in the replica, ~100 MiB
    # less) and anything else with transformers' class; "transformers" always uses the latter.
    model_impl: Literal["auto", "transformers"] = "auto"
    api_keys: str = ""
    # Keys that grant the inference routes only (TGI, OpenAI, /tokenize), like vLLM's
    # --api-key; `api_keys` grant everything.
    inference_api_keys: str = ""
    # With keys set, every route but /health needs one, except the groups listed here
    # (comma-separated): inference, reads, metrics, docs. Mutating routes always need a key.
    open_routes: str = ""
    # CORS: allowed origins, comma-separated ("*" for any); empty turns CORS off.
    cors_origins: str = ""
    # The model id of the OpenAI surface (constant across promotions; the version travels in
    # `x-model-version`). Empty: the base model's name.
    served_model_name: str = ""
    max_best_of: int = Field(default=2, ge=1, le=16)

    # Serving limits (TGI names where TGI has them).
    max_new_tokens_limit: int = Field(default=1024, ge=1)
    default_max_new_tokens: int = Field(default=100, ge=1)
    max_stop_sequences: int = Field(default=4, ge=0)
    # Rows decoded together. 0 or "auto" (the default): measured when the first model
    # loads, the largest batch within 5% of the best decoding-step throughput
    # (app/engine/sizing.py); the engine writes the measured limit back here.
    max_batch_size: int = Field(default=0, ge=0)
    batch_wait_ms: float = Field(default=5.0, ge=0)
    max_queue: int = Field(default=256, ge=1)
    # New requests join a running batch between decoding steps (off: static batches).
    continuous_batching: bool = True
    # Joining requests are prefilled in the same forward as the running rows' next step
    # (core/modeling/packed.py; Llama-layout models); off: each join is its own forward.
    packed_joins: bool = True
    # Intra-op threads for torch (0: torch's default, one per core). With several replicas
    # on one host give each cores/replicas: oversubscribed OpenMP threads spin and stall.
    torch_threads: int = Field(default=0, ge=0)
    record_prompts: bool = False

    # Niceness of the swap thread that verifies and loads a new champion (Linux, per
    # thread): 19 lets serving win the CPU; lower finishes the load sooner on a busy host
    # (docs/benchmarks.md, Hot swap: 18 s at 19, 3.5 s at 0 under 8 clients on 2 cores).
    swap_nice: int = Field(default=19, ge=0, le=19)
    # Hot swap: how often a replica polls the champion pointer (seconds).
    poll_interval_s: float = Field(default=3.0, gt=0)

    # Start a Celery worker beside the API in `selflm serve` (embedded default).
    embedded_worker: bool | None = None

    # Overload and hostile input (docs/reliability.md). A request body over this many bytes
    # is refused with 413 as it streams in.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # Shed a generation request (429 + Retry-After) when the queue ahead of it would take
    # longer than this to drain at the measured throughput (`max_queue` caps its length).
    max_queue_wait_s: float = Field(default=30.0, gt=0)
    # A generation request that has not finished this long after it arrived is dropped
    # (504; 0 = no limit); a client's `X-Request-Timeout: <seconds>` can only shorten it.
    request_timeout_s: float = Field(default=300.0, ge=0)

    # Worker time limits for one round (seconds).
    round_soft_time_limit_s: int = 3600
    round_time_limit_s: int = 3900
    # A running round whose heartbeat is older than this is taken to have lost its worker.
    round_stale_after_s: float = Field(default=300.0, gt=0)
    # Progress inside a stage is written to the round row at most this often.
    progress_interval_s: float = Field(default=1.0, gt=0)

    # Reliability (docs/reliability.md). A queued round nobody picked up within this is failed.
    round_queued_ttl_s: float = Field(default=3600.0, gt=0)
    # How often the reaper (in the API and in each worker) fails/expires abandoned rounds.
    reaper_interval_s: float = Field(default=30.0, gt=0)
    # Worker heartbeat period; a worker silent for worker_stale_after_s is taken to be dead.
    worker_heartbeat_s: float = Field(default=5.0, gt=0)
    worker_stale_after_s: float = Field(default=30.0, gt=0)
    # Round data: names in round bodies resolve inside this directory only (default
    # <data>/rounds), read with these limits; uploads through PUT /data/{name} land here.
    round_data_dir: str | None = None
    round_data_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # Database: connect and statement timeouts (PostgreSQL), connection-pool wait (seconds).
    db_connect_timeout_s: int = Field(default=5, ge=1)
    db_statement_timeout_s: float = Field(default=15.0, gt=0)
    db_pool_timeout_s: float = Field(default=5.0, gt=0)
    # Broker/Redis: how long enqueueing or announcing may take before it is a 503.
    broker_timeout_s: float = Field(default=5.0, gt=0)
    # `selflm serve` on a non-loopback interface needs SELFLM_API_KEYS unless this is set
    # (for a deployment behind its own authenticating proxy).
    allow_public_without_keys: bool = False

    @field_validator("max_batch_size", mode="before")
    @classmethod
    def _auto_batch(cls, v: object) -> object:
        return 0 if isinstance(v, str) and v.strip().lower() == "auto" else v

    @field_validator("open_routes")
    @classmethod
    def _open_routes(cls, v: str) -> str:
        unknown = _split(v) - OPEN_GROUPS
        if unknown:
            raise ValueError(
                f"open_routes: unknown group(s) {sorted(unknown)}; "
                f"choose from {sorted(OPEN_GROUPS)} (admin routes always need a key)"
            )
        return v

    @field_validator("checkpoint_dir")
    @classmethod
    def _abs_checkpoint_dir(cls, v: str) -> str:
        return _cwd_path(v)

    @field_validator("database_url")
    @classmethod
    def _abs_database_url(cls, v: str) -> str:
        return _resolve_sqlite_url(v)

    @property
    def data_dir(self) -> Path:
        """Directory for embedded state: the parent of the checkpoint store."""
        return Path(self.checkpoint_dir).parent

    @property
    def round_data_path(self) -> Path:
        """The allow-listed directory round data names resolve in."""
        return (
            Path(_cwd_path(self.round_data_dir))
            if self.round_data_dir
            else self.data_dir / "rounds"
        )

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    @property
    def is_embedded(self) -> bool:
        """Embedded = no external broker: serve starts a worker beside the API."""
        if self.embedded_worker is not None:
            return self.embedded_worker
        return self.uses_filesystem_broker

    @property
    def api_key_set(self) -> frozenset[str]:
        return _split(self.api_keys)

    @property
    def inference_key_set(self) -> frozenset[str]:
        return _split(self.inference_api_keys)

    @property
    def open_route_groups(self) -> frozenset[str]:
        return _split(self.open_routes)

    @property
    def cors_origin_list(self) -> list[str]:
        return sorted(_split(self.cors_origins))

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.base_model


def _split(value: str) -> frozenset[str]:
    return frozenset(k.strip() for k in value.split(",") if k.strip())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
