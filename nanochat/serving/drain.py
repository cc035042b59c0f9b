"""Graceful shutdown: on SIGTERM the server stops taking requests (503), lets those in flight finish for up to
`--drain-timeout` seconds, then ends the rest with a proper final event and exits 0.

The requests still running at the deadline are ended by shutting the workers down: the scheduler finishes each with
the reason "shutdown", so a stream sends its error and final event ([DONE] on the OpenAI API) instead of being torn
off mid-token, and a waiting non-streaming request gets a 503. A second SIGTERM, or Ctrl-C, stops at once.
"""

import asyncio
import signal
import sys

import uvicorn
from fastapi.responses import JSONResponse

CLOSE_GRACE = 5.0  # seconds for the responses of cancelled requests to be sent after their workers stopped


class Draining:
    """The app's shutdown state, shared by the `DrainGate` middleware and the `DrainingServer`."""

    def __init__(self, workers: list):
        self.workers, self.active, self.in_flight = workers, False, 0

    def stop_workers(self) -> None:
        """Finish every request still running or waiting with "shutdown" (blocks: run it off the event loop)."""
        for worker in self.workers:
            if hasattr(worker, "shutdown"):
                worker.shutdown()


class DrainGate:
    """ASGI middleware: counts the requests in flight, and answers 503 (with Connection: close) once draining."""

    def __init__(self, app, draining: Draining):
        self.app, self.draining = app, draining

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.draining.active:
            response = JSONResponse(status_code=503, headers={"Connection": "close"}, content={"error": {
                "message": "the server is shutting down: retry on another server or after it restarts",
                "type": "server_error", "param": None}})
            return await response(scope, receive, send)
        self.draining.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.draining.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM starting a drain of at most `timeout` seconds instead of an immediate stop
    (uvicorn's own waits for streams without a bound, or tears them off after `timeout_graceful_shutdown`)."""

    def __init__(self, config: uvicorn.Config, draining: Draining, timeout: float):
        super().__init__(config)
        self.draining, self.timeout, self.drain_task = draining, timeout, None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.draining.active or self.should_exit:
            self.force_exit = self.draining.active  # a second signal while draining: stop now
            return super().handle_exit(sig, frame)
        self.draining.active = True  # from here on, new requests get a 503
        self.loop.call_soon_threadsafe(self.start_drain)

    def start_drain(self) -> None:
        self.drain_task = self.loop.create_task(self.drain())

    async def drain(self) -> None:
        d, loop = self.draining, self.loop
        print(f"SIGTERM: draining {d.in_flight} request(s) for up to {self.timeout:g} s (--drain-timeout); new "
              "requests get 503", file=sys.stderr, flush=True)
        deadline = loop.time() + self.timeout
        while d.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if d.in_flight:
            print(f"drain timeout: ending the {d.in_flight} request(s) still in flight", file=sys.stderr, flush=True)
            await asyncio.to_thread(d.stop_workers)
            deadline = loop.time() + CLOSE_GRACE
            while d.in_flight and loop.time() < deadline:
                await asyncio.sleep(0.05)
        self.should_exit = True
