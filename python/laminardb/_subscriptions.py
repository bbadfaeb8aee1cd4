"""asyncio and callback front ends over the blocking subscriptions.

An async subscription waits on an asyncio future that the engine resolves (one engine
thread, `laminardb-async`, wakes every async subscription through
`loop.call_soon_threadsafe` when its queue gets a batch or ends), so waiting holds no
thread of the application's executor and a cancelled task stops at once. A callback
subscription runs a daemon thread that calls `on_data` for every batch.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import threading
import traceback
import weakref
from typing import Any, Callable, Optional

from laminardb import _laminardb

_SLICE_MS = 50

# Background threads that wait inside the engine must be stopped before the interpreter
# finalizes (a daemon thread re-entering a finalizing interpreter aborts the process).
_running: "weakref.WeakSet[Any]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for runner in list(_running):
        runner._shutdown()
    from laminardb import _laminardb

    _laminardb._stop_async_waiter()


def _resolve(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


def _ready(sub: Any, loop: asyncio.AbstractEventLoop) -> "asyncio.Future[None]":
    """A future of `loop` resolved once `sub` has a batch or has ended."""
    fut = loop.create_future()
    sub._wait_async(functools.partial(loop.call_soon_threadsafe, _resolve, fut))
    return fut


def follow(sub: Any, on_batch: Callable[[Any], None], name: str) -> threading.Thread:
    """Runs `on_batch` for every batch of `sub` on a daemon thread (stopped at exit)."""
    runner = _Runner(sub, on_batch, None, name)
    return runner.thread


class _AsyncBase:
    def __init__(self, sub: Any) -> None:
        self._sub = sub

    @property
    def is_active(self) -> bool:
        return bool(self._sub.is_active)

    @property
    def schema(self) -> Any:
        return self._sub.schema

    def cancel(self) -> None:
        self._sub.cancel()

    def try_next(self) -> Any:
        return self._sub.try_next()

    def __aiter__(self) -> "_AsyncBase":
        return self

    async def __anext__(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._sub.try_next()
            if batch is not None:
                return batch
            if not self._sub.is_active:
                raise StopAsyncIteration
            await _ready(self._sub, loop)

    async def next_timeout(self, timeout: float) -> Any:
        """The next batch within `timeout` seconds; SubscriptionError (502) if none came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            batch = self._sub.try_next()
            if batch is not None:
                return batch
            if not self._sub.is_active:
                return None
            left = deadline - loop.time()
            if left <= 0:
                from laminardb import SubscriptionError

                err = SubscriptionError(f"Subscription timeout (502): no data within {int(timeout * 1000)} ms")
                err.code = 502
                raise err
            try:
                await asyncio.wait_for(_ready(self._sub, loop), left)
            except asyncio.TimeoutError:
                pass


class AsyncSubscription(_AsyncBase):
    """`async for batch in await conn.subscribe_async(sql)`."""

    def __repr__(self) -> str:
        return repr(self._sub).replace("Subscription", "AsyncSubscription", 1)


class AsyncStreamSubscription(_AsyncBase):
    """`async for batch in await conn.subscribe_stream_async(name)`."""

    def __repr__(self) -> str:
        return repr(self._sub).replace("StreamSubscription", "AsyncStreamSubscription", 1)


async def subscribe_async(conn: Any, sql: str) -> AsyncSubscription:
    return AsyncSubscription(conn.subscribe(sql))


async def subscribe_stream_async(conn: Any, name: str) -> AsyncStreamSubscription:
    return AsyncStreamSubscription(conn.subscribe_stream(name))


class _Runner:
    def __init__(
        self,
        sub: Any,
        on_data: Callable[[Any], None],
        on_error: Optional[Callable[[BaseException], None]],
        name: str,
    ) -> None:
        if not callable(on_data):
            raise TypeError("on_data must be callable")
        self._sub = sub
        self._on_data = on_data
        self._on_error = on_error
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        _running.add(self)
        self.thread.start()

    def _shutdown(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self.thread:
            self.thread.join(1.0)

    def _error(self, exc: BaseException) -> None:
        if not isinstance(exc, _laminardb.LaminarError):
            # Handlers get the package's errors; the original stays as the cause and in
            # the message.
            wrapped = _laminardb.SubscriptionError(f"{type(exc).__name__}: {exc}")
            wrapped.__cause__ = exc
            exc = wrapped
        if self._on_error is None:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            return
        try:
            self._on_error(exc)
        except Exception:  # an error handler's own error must not kill the thread
            traceback.print_exc()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._sub._poll(_SLICE_MS)
            except Exception as exc:
                self._error(exc)
                return
            if batch is None:
                if not self._sub.is_active:
                    try:
                        self._sub.try_next()  # surfaces a cancellation by cancel_query (402)
                    except Exception as exc:
                        self._error(exc)
                    return
                continue
            try:
                self._on_data(batch)
            except Exception as exc:
                self._error(exc)


class CallbackSubscription:
    """A running callback subscription: `on_data(batch)` for every batch, from a daemon
    thread; `on_error(exc)` for an error raised by the subscription or by `on_data`."""

    def __init__(
        self,
        sub: Any,
        on_data: Callable[[Any], None],
        on_error: Optional[Callable[[BaseException], None]] = None,
        target: str = "",
    ) -> None:
        self._sub = sub
        self._cancelled = False
        self._target = target
        self._runner = _Runner(sub, on_data, on_error, "laminardb-callback")

    @property
    def is_active(self) -> bool:
        return self._runner.thread.is_alive() and not self._runner._stop.is_set()

    def cancel(self) -> None:
        self._cancelled = True
        self._sub.cancel()
        self._runner._shutdown()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the subscription ends (cancelled, or its stream closed); returns
        whether it has ended."""
        self._runner.thread.join(timeout)
        return not self._runner.thread.is_alive()

    def __repr__(self) -> str:
        state = "active" if self.is_active else "cancelled" if self._cancelled else "finished"
        target = f"{self._target}, " if self._target else ""
        return f"CallbackSubscription({target}{state})"


SubscriptionHandle = CallbackSubscription
