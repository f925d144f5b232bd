"""One thread that drives many paho clients through epoll: the simulated fleet's event loop.

Why one event loop and not one paho thread per device: paho's threaded loop waits with
``select.select``, which cannot watch file descriptors above 1023; each threaded client holds
three (socket + wake-up socket pair), so one process tops out near 340 devices, and beyond
that the loop threads die with "filedescriptor out of range". Measured here (2 cores): 500
threaded clients, only 339 ever subscribed. So the fleet drives every paho client from one
thread with ``selectors`` (epoll): paho's socket callbacks register each socket,
``loop_read``/``loop_write`` run when it is ready and ``loop_misc`` (keepalive) once a second.
All paho calls happen on that thread; other threads hand work over with ``call_soon``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("cloud_batch.sim")

MISC_INTERVAL_S = 1.0


class EventLoop:
    """One thread that drives many paho clients through epoll, plus thread-safe calls and timers."""

    def __init__(self, name: str = "simfleet-loop") -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._timers: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._clients: set[mqtt.Client] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread.is_alive():
            self.call_soon(self._set_stopping)
            self._thread.join(timeout_s)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _set_stopping(self) -> None:
        self._stopping = True

    @property
    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    # -- scheduling (any thread) ----------------------------------------------------
    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._calls.append((fn, args))
        if not self.in_loop:
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # the buffer is full of wake-ups already, or the loop is closing

    def call_later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
        if self.in_loop:
            heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._seq), fn, args))
        else:
            self.call_soon(self.call_later, delay_s, fn, *args)

    def run_sync(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 10.0) -> Any:
        """Run ``fn`` on the loop thread and return its result (from another thread)."""
        fut: Future[Any] = Future()

        def call() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        self.call_soon(call)
        return fut.result(timeout_s)

    # -- paho clients (loop thread) -----------------------------------------------------
    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_want_write
        client.on_socket_unregister_write = self._on_done_writing
        self._clients.add(client)

    def detach(self, client: mqtt.Client) -> None:
        self._clients.discard(client)
        sock = client.socket()
        if sock is not None:
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass

    def _on_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._sel.register(sock, selectors.EVENT_READ, client)

    def _on_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def _on_done_writing(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        last_misc = time.monotonic()
        while not self._stopping:
            timeout = MISC_INTERVAL_S
            if self._calls:
                timeout = 0
            elif self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
            for key, mask in self._sel.select(timeout):
                self._ready(key.data, mask)
            for _ in range(len(self._calls)):
                fn, args = self._calls.popleft()
                self._safe(fn, args)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn, args = heapq.heappop(self._timers)
                self._safe(fn, args)
            if now - last_misc >= MISC_INTERVAL_S:
                last_misc = now
                for client in list(self._clients):
                    if client.socket() is not None:
                        self._safe(client.loop_misc, ())

    def _ready(self, client: mqtt.Client | None, mask: int) -> None:
        """One ready socket: a paho client's, or the wake-up pair (``client`` None)."""
        if client is None:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass
            return
        try:
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        except Exception:
            log.exception("simulated fleet: a network step failed")

    @staticmethod
    def _safe(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("simulated fleet: %r failed", fn)
