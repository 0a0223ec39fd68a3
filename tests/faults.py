"""Fault injection for tests: a TCP proxy that can pass, cut or blackhole a connection.

Put it between the service and PostgreSQL or Redis (point the URL at ``proxy.port``):

* ``pass``: bytes flow both ways.
* ``cut``: every open connection is reset and new ones are refused (a crashed peer).
* ``blackhole``: connections stay open but nothing arrives either way, and new ones are
  accepted and then ignored (a network partition: the failure that hangs clients without
  timeouts).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType
from typing import Literal

Mode = Literal["pass", "cut", "blackhole"]


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self._listener = socket.create_server((listen_host, 0))
        self.host = listen_host
        self.port: int = int(self._listener.getsockname()[1])
        self._mode: Mode = "pass"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="tcp-proxy")
        self._thread.start()

    # -- control ---------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode) -> None:
        with self._lock:
            self._mode = mode
            if mode == "cut":
                for s in self._conns:
                    _reset(s)
                self._conns.clear()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._conns:
                _reset(s)
            self._conns.clear()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            mode = self._mode
            if mode == "cut":
                _reset(client)
                continue
            upstream: socket.socket | None = None
            if mode == "pass":
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    _reset(client)
                    continue
            with self._lock:
                self._conns.append(client)
                if upstream is not None:
                    self._conns.append(upstream)
            if upstream is None:  # blackhole: swallow whatever the client sends
                threading.Thread(target=self._pump, args=(client, None), daemon=True).start()
            else:
                threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if dst is None or self._mode == "blackhole":
                    continue  # dropped on the floor; the sender waits for an answer forever
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if self._mode != "blackhole":
                for s in (src, dst):
                    if s is not None:
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)


def _reset(s: socket.socket) -> None:
    # SO_LINGER 0: close sends RST, like a peer that crashed.
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.close()
