"""`selflm serve`'s process care: the embedded worker (start, supervise, stop), signals,
and the refusal to serve a public interface without API keys."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from core.settings import Settings

log = logging.getLogger("selflm")


def start_worker_process(settings: Settings) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    # Pin what the API resolved (absolute paths) so both processes see the same state.
    env.update(
        SELFLM_DATABASE_URL=settings.database_url,
        SELFLM_CHECKPOINT_DIR=settings.checkpoint_dir,
        SELFLM_BROKER_URL=settings.broker_url,
        SELFLM_BASE_MODEL=settings.base_model,
        # The worker stops itself if this process disappears (even after a kill -9).
        SELFLM_PARENT_PID=str(os.getpid()),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "selflm.cli", "worker"], env=env, start_new_session=True
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    # Warm shutdown first (Celery finishes or requeues the task), then force.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class WorkerSupervisor:
    """Keeps the embedded Celery worker running: restarts it with backoff when it exits.

    The backoff doubles from 1 s up to `max_backoff_s` while the worker keeps dying quickly,
    and resets once it has run for a minute. `status()` feeds /health.
    """

    def __init__(
        self,
        settings: Settings,
        spawn: Callable[[Settings], subprocess.Popen[bytes]] = start_worker_process,
        max_backoff_s: float = 60.0,
    ) -> None:
        self._settings, self._spawn, self._max = settings, spawn, max_backoff_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="worker-supervisor")

    def start(self) -> WorkerSupervisor:
        self.proc = self._spawn(self._settings)
        log.info("started embedded Celery worker (pid %d)", self.proc.pid)
        self._thread.start()
        return self

    def status(self) -> dict[str, object]:
        with self._lock:
            proc = self.proc
            alive = proc is not None and proc.poll() is None
            return {
                "pid": proc.pid if proc is not None else None,
                "alive": alive,
                "restarts": self.restarts,
                "last_exit": self.last_exit,
            }

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            proc = self.proc
            assert proc is not None
            started = time.monotonic()
            while proc.poll() is None:
                if self._stop.wait(0.5):
                    return
            if self._stop.is_set():
                return
            with self._lock:
                self.last_exit = proc.returncode
            if time.monotonic() - started > 60:
                backoff = 1.0
            log.error(
                "embedded worker (pid %d) exited with %s; restarting in %.0fs",
                proc.pid,
                proc.returncode,
                backoff,
            )
            # The worker ran in its own session: anything it left behind goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self._max)
            new = self._spawn(self._settings)
            with self._lock:
                self.proc = new
                self.restarts += 1
            log.info("restarted embedded Celery worker (pid %d)", new.pid)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.proc is not None:
            stop_process(self.proc)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: assume it is reachable from elsewhere


def public_bind_error(settings: Settings, host: str) -> str | None:
    """Why serving on `host` is refused (no API keys on a public interface), or None."""
    if is_loopback(host) or settings.api_key_set or settings.allow_public_without_keys:
        return None
    return (
        f"refusing to serve on {host}: a non-loopback interface needs SELFLM_API_KEYS "
        "(comma-separated bearer keys). Behind your own authenticating proxy, set "
        "SELFLM_ALLOW_PUBLIC_WITHOUT_KEYS=true instead."
    )


def exit_on_sigterm() -> None:
    # uvicorn restores this handler after its graceful shutdown and re-raises SIGTERM; the
    # default action would kill the process before `finally` stops the embedded worker.
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
