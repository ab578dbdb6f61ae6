"""Running the app: uvicorn on a socket we bound, the model loaded while /health answers 503, and a
drain on SIGTERM / SIGINT.

Drain: stop accepting connections, refuse new requests with 503, let the running ones finish for up
to `drain_timeout` seconds, cut the rest (finish_reason "abort", so their clients still get a
well-formed end), then stop. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from serve.app import AppState

BACKLOG = 2048  # uvicorn's default
# After the engine is idle, how long uvicorn may take to send the last bytes and close connections.
CLOSE_GRACE_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn.Server whose exit signals start our drain: uvicorn's own handler would stop at once
    and re-raise the signal after shutdown (the exit status would be the signal's, not 0)."""

    def __init__(self, config: uvicorn.Config, on_first_signal: Callable[[], None]):
        super().__init__(config)
        self._on_first_signal = on_first_signal
        self.signals = 0

    def handle_exit(self, sig, frame) -> None:
        self.signals += 1
        if self.signals == 1:
            self._on_first_signal()
        else:
            self.should_exit = True
            self.force_exit = True


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound and listening before the slow start-up: a taken port fails at once,
    and /health answers (503) while the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named explicitly: asyncio sets TCP_NODELAY only on connections whose socket says IPPROTO_TCP;
    # with proto 0, Nagle held each stream's first chunks ~40 ms (the client's delayed ACK) on keep-alive
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(BACKLOG)  # from here connections wait in the kernel until uvicorn accepts them
    sock.set_inheritable(True)
    return sock


async def serve(
    app,
    state: AppState,
    sock: socket.socket,
    load: Callable[[], tuple[Any, Any]],
    on_ready: Callable[[], None],
    drain_timeout: float,
    log: Callable[[str], None],
    log_level: str = "warning",
) -> bool:
    """Serve `app` on `sock` until a signal's drain ends. `load()` runs on a thread while the port
    already answers (503): it returns (ServedModel, started Scheduler). Returns False when the
    server stopped before loading finished (the loading thread is still running)."""
    loop = asyncio.get_running_loop()
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=CLOSE_GRACE_S
    )
    drain_started = asyncio.Event()
    server = _Server(config, on_first_signal=lambda: loop.call_soon_threadsafe(drain_started.set))

    async def drain() -> None:
        await drain_started.wait()
        state.draining = True
        for listener in server.servers:
            listener.close()
        scheduler = state.scheduler
        if scheduler is not None:
            scheduler.begin_drain()
            stats = scheduler.stats()
            log(f"draining: {stats.running} running, {stats.waiting} waiting (up to {drain_timeout:g} s)")
            if not await scheduler.wait_idle(drain_timeout):
                stats = scheduler.stats()
                log(f"drain timeout: aborting {stats.running + stats.waiting} requests")
                scheduler.abort_all()
                await scheduler.wait_idle(CLOSE_GRACE_S)
        server.should_exit = True

    loaded: asyncio.Future = loop.create_future()

    def load_in_thread() -> None:
        try:
            result = load()
        except BaseException as e:  # handed to the event loop, which re-raises it
            loop.call_soon_threadsafe(_settle, loaded, None, e)
        else:
            loop.call_soon_threadsafe(_settle, loaded, result, None)

    loader = threading.Thread(target=load_in_thread, name="qwen2-serve-load", daemon=True)
    serve_task = asyncio.create_task(server.serve(sockets=[sock]))
    drain_task = asyncio.create_task(drain())
    loader.start()
    try:
        await asyncio.wait({loaded, serve_task}, return_when=asyncio.FIRST_COMPLETED)
        if not loaded.done():  # stopped (a signal) before the model was ready
            await serve_task
            return False
        error = loaded.exception()
        if error is not None:
            server.should_exit = True
            await serve_task
            raise error
        model, scheduler = loaded.result()
        if not state.draining:
            while not server.started and not serve_task.done():
                await asyncio.sleep(0.01)
            state.model, state.scheduler = model, scheduler
            on_ready()
        else:
            server.should_exit = True
        await serve_task
        scheduler.shutdown()
        return True
    finally:
        drain_task.cancel()


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
