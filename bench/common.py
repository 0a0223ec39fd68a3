"""Shared helpers for the benchmarks: state, a real server process, load, RSS, baselines.

Nothing here is mocked: the server is ``python -m selflm.cli serve`` in a subprocess against
a fresh SQLite database, and the baselines are the reference article's loops (batch-1
``model.generate``; per-sample float32 training) run with plain transformers.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core.db.models import Checkpoint
from core.db.session import Database, upgrade
from core.registry import ensure_base_checkpoint
from core.settings import Settings
from worker.rounds.data import load_corpus, prompts_from

log = logging.getLogger("bench")

DEFAULT_MODEL = "bundled:smollm2-135m-instruct"
# Server settings that would change what is measured (auth, pub/sub, prompt recording).
_STRIPPED_ENV = (
    "SELFLM_REDIS_URL",
    "SELFLM_API_KEYS",
    "SELFLM_RECORD_PROMPTS",
    "SELFLM_BROKER_URL",
)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise


# --------------------------------------------------------------------------- numbers


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(out: str | Path, data: Mapping[str, Any]) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    log.info("wrote %s", path)
    return path


def default_out(name: str) -> str:
    return str(Path("docs") / "bench" / f"{name}.json")


def run_info(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import platform

    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "argv": list(sys.argv[1:] if argv is None else argv),
    }


# --------------------------------------------------------------------------- state


@dataclass
class BenchState:
    """A fresh SQLite database whose v1 champion is the (possibly reused) base checkpoint."""

    settings: Settings
    db: Database
    workdir: Path
    base_path: Path
    base_manifest: dict[str, Any]


def prepare_state(model: str, checkpoint_dir: str | None, workdir: Path) -> BenchState:
    """Fresh database in ``workdir``; the base model is imported into ``checkpoint_dir``
    (default: ``workdir/checkpoints``) on first use and reused on later runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    ck = Path(checkpoint_dir).expanduser().resolve() if checkpoint_dir else workdir / "checkpoints"
    db_path = (workdir / "bench.db").resolve()
    if db_path.exists():
        db_path.unlink()
    settings = Settings(
        database_url=f"sqlite:///{db_path}",
        checkpoint_dir=str(ck),
        base_model=model,
        embedded_worker=False,
        redis_url=None,
        api_keys="",
    )
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    started = time.perf_counter()
    champ = ensure_base_checkpoint(settings, db)
    log.info("base checkpoint %s ready in %.1fs", champ.path, time.perf_counter() - started)
    return BenchState(
        settings=settings,
        db=db,
        workdir=workdir,
        base_path=Path(champ.path),
        base_manifest=dict(champ.manifest),
    )


@contextmanager
def workdir_for(path: str | None, prefix: str) -> Iterator[Path]:
    """``path`` (kept afterwards) or a temporary directory (removed afterwards)."""
    if path:
        p = Path(path).resolve()
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def bench_prompts(n: int, seed: int = 0) -> list[str]:
    """A fixed prompt list: openings of passages of the default corpus's train split."""
    return prompts_from(load_corpus(None).train, n, random.Random(seed))


def add_candidate(state: BenchState, version: int = 2, noise: float = 1e-3, seed: int = 0) -> Path:
    """Write v1's weights, each multiplied by (1 + noise·N(0,1)), as candidate ``version``.

    The copy goes into ``workdir/candidates`` so a reused base store is never written to.
    """
    import torch

    from core.modeling.loader import load_checkpoint
    from core.store import write_checkpoint

    shutil.rmtree(state.workdir / "candidates", ignore_errors=True)  # a kept --workdir
    base = load_checkpoint(state.base_path, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.model.parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    stored = write_checkpoint(
        base.model,
        base.tokenizer,
        state.workdir / "candidates",
        state.settings.lineage,
        version,
        source=f"bench: v1 perturbed ({noise:g})",
    )
    with state.db.session() as s:
        s.add(
            Checkpoint(
                lineage=state.settings.lineage,
                version=version,
                parent_version=1,
                path=str(stored.path),
                manifest=stored.manifest,
                status="candidate",
            )
        )
    del base
    return stored.path


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_s: float  # process start → first healthy answer

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def server_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV}
    env.update(
        SELFLM_DATABASE_URL=settings.database_url,
        SELFLM_CHECKPOINT_DIR=settings.checkpoint_dir,
        SELFLM_BASE_MODEL=settings.base_model,
        SELFLM_LINEAGE=settings.lineage,
        SELFLM_EMBEDDED_WORKER="false",
        SELFLM_POLL_INTERVAL_S="0.5",
    )
    env.update(extra or {})
    return env


def start_server(
    state: BenchState, extra_env: Mapping[str, str] | None = None, timeout: float = 600
) -> Server:
    """``python -m selflm.cli serve`` on a free port; returns once /health answers 200."""
    port = free_port()
    log_path = state.workdir / f"server-{port}.log"
    started = time.monotonic()
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "selflm.cli", "serve", "--port", str(port)],
            env=server_env(state.settings, extra_env),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=state.workdir,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, 0.0)
    log.info("starting server pid %d on port %d (log %s)", proc.pid, port, log_path)
    deadline = started + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                server.started_s = time.monotonic() - started
                log.info("server healthy after %.1fs", server.started_s)
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"server not healthy after {timeout:.0f}s:\n{server.tail()}")


def stop_server(server: Server, timeout: float = 30) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    log.info("server pid %d stopped", server.pid)


def health(server: Server) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(server.url + "/health", timeout=30).json()
    return body


def server_info(server: Server) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(server.url + "/info", timeout=30).json()
    return body


def generate_body(
    prompt: str,
    max_new_tokens: int,
    sample: bool = False,
    seed: int = 0,
    temperature: float = 0.8,
    top_p: float = 0.95,
) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if sample:
        params.update(do_sample=True, seed=seed, temperature=temperature, top_p=top_p)
    return {"inputs": prompt, "parameters": params}


def warm_up(server: Server, prompts: Sequence[str], n: int, max_new_tokens: int = 8) -> None:
    with httpx.Client(timeout=600) as c:
        for i in range(n):
            body = generate_body(prompts[i % len(prompts)], max_new_tokens)
            c.post(server.url + "/generate", json=body).raise_for_status()
    log.info("warm-up: %d requests", n)


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Outcome:
    sent: float  # monotonic
    done: float
    status: int  # 0: transport error
    version: int | None
    tokens: int


@dataclass
class Load:
    """``clients`` threads posting /generate back to back until stopped; every outcome kept."""

    url: str
    prompts: Sequence[str]
    clients: int = 8
    max_new_tokens: int = 8
    results: list[Outcome] = field(default_factory=list)
    started: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, i: int) -> None:
        n = 0
        with httpx.Client(timeout=600) as c:
            while not self._stop.is_set():
                prompt = self.prompts[(i + n * self.clients) % len(self.prompts)]
                t0 = time.monotonic()
                try:
                    r = c.post(
                        self.url + "/generate", json=generate_body(prompt, self.max_new_tokens)
                    )
                    ok = r.status_code == 200
                    out = Outcome(
                        t0,
                        time.monotonic(),
                        r.status_code,
                        int(r.headers["x-model-version"]) if ok else None,
                        int(r.headers.get("x-generated-tokens", 0)) if ok else 0,
                    )
                except httpx.HTTPError:
                    out = Outcome(t0, time.monotonic(), 0, None, 0)
                with self._lock:
                    self.results.append(out)
                n += 1

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True, name=f"client-{i}")
            for i in range(self.clients)
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=600)


def largest_gap(done_times: Sequence[float], start: float, end: float) -> float:
    """Largest interval between consecutive completions that overlaps ``[start, end]``.

    The last completion before the window and the first after it are included (the window's
    edges where there are none), so a stall that spans an edge still counts in full."""
    if end <= start:
        return 0.0
    xs = sorted(done_times)
    before = [t for t in xs if t < start]
    after = [t for t in xs if t > end]
    points = [
        before[-1] if before else start,
        *(t for t in xs if start <= t <= end),
        after[0] if after else end,
    ]
    return max(b - a for a, b in itertools.pairwise(points))


# --------------------------------------------------------------------------- swap


@dataclass
class SwapRun:
    results: list[Outcome]
    load_started: float
    promoted: float
    swapped: float
    stopped: float
    promote_status: int
    health_after: dict[str, Any]


def run_swap(
    server: Server,
    prompts: Sequence[str],
    version: int = 2,
    clients: int = 8,
    max_new_tokens: int = 8,
    pre_s: float = 3.0,
    post_s: float = 2.0,
    swap_timeout: float = 300.0,
) -> SwapRun:
    """Load the server, promote ``version`` over HTTP, wait until it serves it, keep going."""
    with Load(server.url, prompts, clients, max_new_tokens) as load:
        time.sleep(pre_s)
        promoted = time.monotonic()
        r = httpx.post(f"{server.url}/checkpoints/{version}/promote", timeout=120)
        if r.status_code != 200:
            log.error("promotion answered %d: %s", r.status_code, r.text)
        deadline = promoted + swap_timeout
        swapped = 0.0
        while time.monotonic() < deadline:
            if health(server).get("serving_version") == version:
                swapped = time.monotonic()
                break
            time.sleep(0.05)
        if not swapped:
            raise RuntimeError(f"v{version} not served after {swap_timeout:.0f}s:\n{server.tail()}")
        time.sleep(post_s)
    stopped = time.monotonic()
    return SwapRun(
        results=sorted(load.results, key=lambda o: o.done),
        load_started=load.started,
        promoted=promoted,
        swapped=swapped,
        stopped=stopped,
        promote_status=r.status_code,
        health_after=health(server),
    )


def swap_summary(run: SwapRun, version: int = 2, margin_s: float = 1.0) -> dict[str, Any]:
    """Requests, failures, largest gap between completions around the swap and before it."""
    res = run.results
    failed = [o for o in res if o.status != 200]
    first_new = min((o.done for o in res if o.version == version), default=0.0)
    # The swap window: from the promotion until the replica serves v2 and a v2 answer is out.
    end = max(run.swapped, first_new)
    done = [o.done for o in res]
    # Steady state before the swap, for scale: with a static batch, completions come in
    # bursts, so even an undisturbed server has gaps of about one batch's duration.
    steady_start, steady_end = run.load_started + margin_s, run.promoted - margin_s
    ok = [o for o in res if o.status == 200]
    tokens = sum(o.tokens for o in ok)
    elapsed = run.stopped - run.load_started
    details = run.health_after.get("details", {})
    return {
        "requests": len(res),
        "failed": len(failed),
        "failed_statuses": sorted({o.status for o in failed}),
        "versions_seen": sorted({o.version for o in ok if o.version is not None}),
        "largest_gap_ms": largest_gap(done, run.promoted, end) * 1000,
        "window_s": end - run.promoted,
        "window_completions": sum(1 for t in done if run.promoted <= t <= end),
        "steady_largest_gap_ms": largest_gap(done, steady_start, steady_end) * 1000,
        "steady_window_s": max(0.0, steady_end - steady_start),
        "steady_completions": sum(1 for t in done if steady_start <= t <= steady_end),
        "promote_status": run.promote_status,
        "promote_to_swapped_ms": (run.swapped - run.promoted) * 1000,
        "promote_to_first_v2_response_ms": (first_new - run.promoted) * 1000 if first_new else None,
        "load_seconds": details.get("last_swap_seconds"),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "requests_after_swap_on_old_version": sum(
            1 for o in ok if o.sent > run.swapped and o.version != version
        ),
    }


# --------------------------------------------------------------------------- RSS


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / VmSize of ``pid`` in bytes, from /proc (no psutil)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize"):
            parts = rest.split()
            out[key] = int(parts[0]) * 1024  # kB
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, ``echo 5 > clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError as e:
        log.warning("cannot reset the peak RSS of %d (%s); using sampled peaks only", pid, e)
        return False


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = proc_status(self.pid).get("VmRSS", 0)
            except OSError:
                return  # the process is gone
            self.samples.append((time.monotonic(), rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peak(self, start: float, end: float) -> int:
        return max((r for t, r in self.samples if start <= t <= end), default=0)

    def count(self, start: float, end: float) -> int:
        return sum(1 for t, _ in self.samples if start <= t <= end)


# --------------------------------------------------------------------------- baselines


def load_reference(path: Path, device: str = "cpu") -> tuple[Any, Any]:
    """The reference article's way: plain ``from_pretrained`` in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.to(device).eval()
    return model, tok


@dataclass(frozen=True)
class RefResult:
    sequences: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
        }


def reference_generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    lengths: Sequence[int],
    sample: bool = False,
    seed: int = 0,
    temperature: float = 0.8,
    top_p: float = 0.95,
) -> RefResult:
    """Sequential batch-1 ``model.generate`` (the reference loop), each sequence forced to
    exactly the given length (``min_new_tokens = max_new_tokens``) so both sides generate
    the same number of tokens. Rows with length 0 are skipped."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def one(ids: list[int], n: int, i: int) -> int:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": n,
            "min_new_tokens": n,
            "do_sample": sample,
            "pad_token_id": pad,
        }
        if sample:
            torch.manual_seed(seed + i)
            kwargs.update(temperature=temperature, top_p=top_p)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
        return int(out.shape[1] - x.shape[1])

    pairs = [(ids, n) for ids, n in zip(prompt_ids, lengths, strict=True) if n > 0 and ids]
    if pairs:
        one(pairs[0][0], 2, 0)  # warm-up: first-call allocations are not the loop's cost
    tokens = 0
    start = time.perf_counter()
    for i, (ids, n) in enumerate(pairs):
        tokens += one(ids, n, i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return RefResult(sequences=len(pairs), tokens=tokens, seconds=seconds)


def reference_train(
    model: Any, windows: Sequence[list[int]], learning_rate: float, seed: int = 0
) -> RefResult:
    """The reference's update loop: Adam, batch 1, float32, ``loss.backward()`` per sample.

    Counts n - 1 predicted tokens per window, the same count as ``finetune``."""
    import torch

    device = next(model.parameters()).device
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    tokens = 0
    start = time.perf_counter()
    for w in windows:
        input_ids = torch.tensor([w], dtype=torch.long, device=device)
        outputs = model(input_ids, labels=input_ids.clone())
        loss = outputs[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens += len(w) - 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.eval()
    return RefResult(sequences=len(windows), tokens=tokens, seconds=seconds)
