"""The engine in one background thread, fed by a thread-safe inbox (DESIGN.md decision 5).

The asyncio side never touches the engine: it puts "add" and "abort" commands in the inbox and reads
RequestOutputs from its own asyncio.Queue, which the engine thread fills through
loop.call_soon_threadsafe. The thread sleeps on an Event while there is nothing to do, so an idle
server burns no CPU. Aborts are applied before the next step, which frees the request's blocks at
once (the engine's abort frees them synchronously).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from pagedeploy.runtime.outputs import RequestOutput
from pagedeploy.runtime.sampling_params import SamplingParams

from .metrics import ServerMetrics

log = logging.getLogger("pagedeploy.server")

STATS_INTERVAL_S = 0.05   # engine.stats() at most this often while busy; always when going idle


class EngineUnavailable(Exception):
    """The engine is loading, failed, or the server is shutting down (the server answers 503)."""


@dataclass
class _Tracked:
    """One engine request as the engine thread sees it: where its outputs go and its timings."""
    outbox: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float
    first_token: float | None = None
    last_token: float | None = None


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    tracked: _Tracked


@dataclass
class _Abort:
    request_id: str


class EngineThread:
    """Owns the engine. `load_engine` runs inside the thread, so the server answers /health (503)
    while the weights load."""

    def __init__(self, load_engine: Callable[[], object], metrics: ServerMetrics | None = None):
        self._load_engine = load_engine
        self.metrics = metrics
        self.engine = None
        self.ready = threading.Event()          # set once the engine is loaded
        self.load_error: BaseException | None = None
        self.dead: BaseException | None = None  # an engine step raised: an internal bug
        self.draining = False                   # shutdown began: refuse new requests
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._requests: dict[str, _Tracked] = {}   # engine thread only
        self._num_in_flight = 0                     # event-loop side count, for draining
        self._last_stats = 0.0
        self._thread = threading.Thread(target=self._run, name="pagedeploy-engine", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.load_error is not None or self.dead is not None:
            return "failed"
        if self.draining:
            return "draining"
        return "ready" if self.ready.is_set() else "loading"

    def start(self) -> None:
        self._thread.start()

    def check_available(self) -> None:
        state = self.state
        if state != "ready":
            raise EngineUnavailable({"loading": "The model is still loading; retry when /health says ready.",
                                     "draining": "The server is shutting down.",
                                     "failed": "The engine failed; see the server log."}[state])

    async def generate(self, requests: list[tuple[str, str | list[int], SamplingParams]]
                       ) -> AsyncIterator[RequestOutput]:
        """Submit engine requests and yield their outputs, interleaved, until all finished.
        Leaving early (client gone, task cancelled) aborts whatever is unfinished."""
        self.check_available()
        outbox: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        unfinished = {rid for rid, _, _ in requests}
        self._num_in_flight += 1
        try:
            for rid, prompt, params in requests:
                self._post(_Add(rid, prompt, params, _Tracked(outbox, loop, time.monotonic())))
            while unfinished:
                item = await outbox.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                yield item
        finally:
            self._num_in_flight -= 1
            for rid in unfinished:
                self._post(_Abort(rid))

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests, wait (bounded) for the in-flight ones, then stop the thread."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self._num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stop()

    def stop(self, join_timeout_s: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        # A thread still loading weights cannot be interrupted; it is a daemon and dies with us.
        if self.ready.is_set() and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(join_timeout_s)

    def _post(self, command) -> None:
        self._inbox.put(command)
        self._wake.set()

    # ---- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine = self._load_engine()
        except BaseException as e:   # reported by run_up and /health; the thread has nothing to do
            self.load_error = e
            log.exception("engine failed to load")
            self.ready.set()
            return
        self.ready.set()
        self._update_stats(force=True)
        while not self._stop:   # drain() waited for in-flight requests before setting it
            self._apply_commands()
            if self.engine.has_unfinished():
                if not self._step():
                    return
            else:
                self._update_stats(force=True)
                self._wake.wait()
                self._wake.clear()   # commands posted after this are still in the inbox
        self._abort_all()

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                self._add(cmd)
            elif cmd.request_id in self._requests:
                del self._requests[cmd.request_id]
                self.engine.abort(cmd.request_id)

    def _add(self, cmd: _Add) -> None:
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params)
        except Exception as e:   # RequestError and friends: the handler turns it into a 4xx
            cmd.tracked.loop.call_soon_threadsafe(cmd.tracked.outbox.put_nowait, e)
            return
        self._requests[cmd.request_id] = cmd.tracked

    def _step(self) -> bool:
        try:
            outputs = self.engine.step()
        except BaseException as e:
            log.exception("engine step failed")
            self.dead = e
            for tracked in self._requests.values():
                tracked.loop.call_soon_threadsafe(tracked.outbox.put_nowait, RuntimeError(
                    "The engine failed while generating; see the server log."))
            self._requests.clear()
            return False
        now = time.monotonic()
        for out in outputs:
            self._deliver(out, now)
        self._update_stats()
        return True

    def _deliver(self, out: RequestOutput, now: float) -> None:
        tracked = self._requests.get(out.request_id)
        if tracked is None:   # aborted while this step ran
            return
        if any(o.token_ids_delta for o in out.outputs):
            self._observe_token(tracked, now)
        if out.finished:
            del self._requests[out.request_id]
            if self.metrics is not None:
                reason = next((o.finish_reason for o in out.outputs if o.finish_reason), "stop")
                self.metrics.observe_finished(reason, now - tracked.arrival)
        tracked.loop.call_soon_threadsafe(tracked.outbox.put_nowait, out)

    def _observe_token(self, tracked: _Tracked, now: float) -> None:
        if self.metrics is not None:
            if tracked.first_token is None:
                self.metrics.ttft.observe(now - tracked.arrival)
            else:
                self.metrics.itl.observe(now - tracked.last_token)
        if tracked.first_token is None:
            tracked.first_token = now
        tracked.last_token = now

    def _update_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.metrics is None or (not force and now - self._last_stats < STATS_INTERVAL_S):
            return
        self._last_stats = now
        self.metrics.update_engine(self.engine.stats())

    def _abort_all(self) -> None:
        for rid in list(self._requests):
            with contextlib.suppress(Exception):
                self.engine.abort(rid)
        self._requests.clear()
        self._update_stats(force=True)
