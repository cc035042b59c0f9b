"""The chat web service: the UI's streaming endpoint and an OpenAI-compatible API over continuous-batching workers.

Generation happens in each worker's scheduler thread, never inside an async handler: the scheduler hands every
event to the event loop (`EventBridge`), and handlers only await their own queue, so one slow client never blocks
the others. A client that disconnects cancels its requests and frees their slots.
"""

import asyncio
import functools
import html
import itertools
import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h11
import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat.serving.chat_request import (LIMITS, MAX_BODY_BYTES, BadRequest, authorized, read_json, validate,
                                           validate_completion)
from nanochat.common import UserError
from nanochat.engine import TextStream
from nanochat.serving.drain import CLOSE_GRACE, DrainGate, Draining, DrainingServer
from nanochat.serving.metrics import AccessLog, RequestWatch, ServerMetrics
from nanochat.serving.scheduler import BatchScheduler, PromptTooLong, Request

MAX_WAITING = 256  # requests queued per worker beyond its slots before new ones are turned away (503)
CLIENT_LIMIT = 16  # concurrent generations (choices) per client address, so that a few clients cannot fill the queue
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}  # no framing
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
READ_TIMEOUT = 10.0  # seconds a client has to send a request's headers, and again its body
DRAIN_TIMEOUT = 30.0  # seconds in-flight requests get to finish after a SIGTERM before they are ended
CONTEXT_HEADER = "X-Nanochat-Context"  # how the prompt fit the model: {"dropped_messages", "context", "prompt_tokens"}
ROUTES = "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /chat/completions, GET /health, GET /stats, GET /docs"


class StopText:
    """Cuts a choice's text before the first of its `stop` strings, holding back just enough characters to see a
    stop string that arrives split over several deltas."""

    def __init__(self, stops: list[str]):
        self.stops, self.hold = stops, max(map(len, stops), default=1) - 1
        self.pending, self.stopped = "", False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)]
        cut = max(0, len(text) - self.hold)
        self.pending = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ClientLimiter:
    """Concurrent generations per client address. Runs on the event loop thread only, so it needs no lock."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, Counter()

    def acquire(self, client: str, n: int) -> None:
        if self.active[client] + n > self.limit:
            raise BadRequest(f"too many concurrent generations from this client ({self.active[client]} running, "
                             f"limit {self.limit}): wait for one to finish", status=429)
        self.active[client] += n

    def release(self, client: str) -> None:
        self.active[client] -= 1
        if self.active[client] <= 0:
            del self.active[client]


# ---------------------------------------------------------------------------------------------------------------------
# Who may talk to the app, and how slowly

def host_name(header: str) -> str:
    """The name in a Host header, without its port: 'localhost:8000' → 'localhost', '[::1]:8000' → '[::1]'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1] or header
    return header.partition(":")[0]


class LoopbackHostsOnly:
    """ASGI middleware for a server without an API key: only requests addressed to a loopback name, or to one of
    `extra` (--allowed-host), reach the app; others get a 421. A page on a DNS-rebinding domain reaches 127.0.0.1
    with its own name in Host:, and without this check could drive the API and read the replies."""

    def __init__(self, app, extra: list[str] = ()):
        self.app, self.allowed = app, {*LOOPBACK_NAMES, *(host_name(h) for h in extra)}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.allowed:
                message = (f"this server answers requests for {', '.join(sorted(self.allowed))} only, not Host "
                           f"{header!r}: start it with --allowed-host NAME to serve that name (or with an API key)")
                response = JSONResponse(status_code=421, content={
                    "error": {"message": message, "type": "invalid_request_error", "param": None}})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers, which uvicorn lacks: without one, a client
    that sends a byte now and then holds its connection open forever. (The body's deadline is in `read_json`.)"""

    def __init__(self, *args, header_timeout: float = READ_TIMEOUT, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.header_deadline = header_timeout, None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:  # the next request's headers get the full time again
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        self.header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _headers_overdue(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no complete headers yet
            message = f"the request headers did not arrive within {self.header_timeout:g} s"
            self.transport.write(f"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                 f"content-length: {len(message)}\r\nconnection: close\r\n\r\n{message}".encode())
            self.transport.close()


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, opened before the server says it is serving: a busy port is an error then,
    not a message after the claim."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT; Linux still
    try:                                                          # refuses a port another socket listens on
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host} port {port}: {e.strerror or e} (is another server running there? "
                        "stop it or pick another --port)") from None
    sock.listen(2048)
    return sock


def serve_http(app: FastAPI, host: str, port: int, read_timeout: float = READ_TIMEOUT,
               drain_timeout: float = DRAIN_TIMEOUT, sock: socket.socket | None = None) -> None:
    """Run `app` with uvicorn until interrupted, giving each request `read_timeout` seconds for its headers, on
    `sock` (see `listen`) when given; a SIGTERM drains it (see nanochat/serving/drain.py) for up to `drain_timeout`
    seconds."""
    protocol = functools.partial(HeaderDeadlineProtocol, header_timeout=read_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=protocol,
                            timeout_graceful_shutdown=CLOSE_GRACE)
    server = DrainingServer(config, app.state.draining, drain_timeout)
    server.run(sockets=[sock] if sock else None)
    if not server.started:  # as uvicorn.run: the port could not be bound
        raise SystemExit(3)


# ---------------------------------------------------------------------------------------------------------------------
# From the scheduler thread to the event loop

class EventBridge:
    """A request's event sink: the scheduler thread `put`s, the handler awaits `queue` (events tagged by choice).
    `on_done` runs on the loop when the request finishes, however it finishes (the scheduler always says "done")."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int,
                 on_done: Callable[[], None] | None = None):
        self.loop, self.queue, self.index, self.on_done = loop, queue, index, on_done

    def put(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, event))
            if event[0] == "done" and self.on_done is not None:
                self.loop.call_soon_threadsafe(self.on_done)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


async def drain(requests: list[Request], queue: asyncio.Queue, http: HTTPRequest, poll: float = 0.5):
    """(index, event) of all `requests` until each is done; stops early if the client goes away. Always cancels
    whatever is still running on exit (a disconnect, an error, or the response being torn down)."""
    remaining, checked = len(requests), time.monotonic()
    try:
        while remaining:
            try:
                index, event = await asyncio.wait_for(queue.get(), timeout=poll)
            except asyncio.TimeoutError:
                index, event = None, None
            if time.monotonic() - checked >= poll:  # also while tokens keep coming
                checked = time.monotonic()
                if await http.is_disconnected():
                    return
            if event is None:
                continue
            if event[0] == "done":
                remaining -= 1
            yield index, event
    finally:
        for request in requests:
            request.cancel()  # a no-op for finished ones


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def failure(reason: str) -> str | None:
    """The error message of an abnormal finish, else None."""
    if reason.startswith("error"):
        return "generation failed: " + reason.removeprefix("error: ")
    if reason == "shutdown":
        return "the server is shutting down"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# From the scheduler's token events to response chunks

class UIStream:
    """The web page's stream of one reply (POST /chat/completions): {"part": "text"|"python"|"python_output",
    "delta": str} events (a new part starts with an empty delta), then {"done": true, "finish_reason", "usage"};
    {"error": str} before it on a failure. `context` (see `prompt_within`) goes into the done event as "nanochat"."""

    def __init__(self, tokenizer, prompt_tokens: int, context: dict | None = None):
        self.tokenizer, self.prompt_tokens, self.context = tokenizer, prompt_tokens, context or {}
        self.stops, self.part_after = tokenizer.stop_tokens(), tokenizer.tool_markup()

    async def stream(self, events: AsyncIterator[tuple[int, tuple]]) -> AsyncIterator[str]:
        part, text, generated = "text", TextStream(self.tokenizer), 0
        async for _, event in events:
            if event[0] == "done":
                if tail := text.flush():
                    yield sse({"part": part, "delta": tail})
                if message := failure(event[1]):
                    yield sse({"error": message})
                usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": generated}
                yield sse({"done": True, "finish_reason": event[1], "usage": usage, "nanochat": self.context})
                return
            token = event[1]
            generated += 1
            if token in self.stops:
                continue
            if token in self.part_after:
                if tail := text.flush():
                    yield sse({"part": part, "delta": tail})
                part = self.part_after[token]
                yield sse({"part": part, "delta": ""})
            elif delta := text.push(token):
                yield sse({"part": part, "delta": delta})


def escape_markup(text: str) -> str:
    """Printed text that looks like tool markup, made unmistakable: every "<|" becomes "<\\|"."""
    return text.replace("<|", "<\\|")


class ContentText:
    """One choice's OpenAI `content`, token by token: the reply's text with its tool markup inline. Ordinary tokens can
    spell markup too (a program that prints "<|output_end|>", a model that writes it out), so in their text every
    "<|" is sent as "<\\|" (`escape_markup`): in the content, "<|" only ever starts a special token's markup. A text
    that ends in "<" is held back until the next token shows whether a "|" follows."""

    def __init__(self, tokenizer):
        self.tokenizer, self.text, self.held = tokenizer, TextStream(tokenizer), ""
        self.special = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}

    def push(self, token: int) -> str:
        if token in self.special:
            return self.flush() + self.tokenizer.decode([token])
        text = self.held + self.text.push(token)
        cut = len(text) - text.endswith("<")
        self.held = text[cut:]
        return escape_markup(text[:cut])

    def flush(self) -> str:
        out, self.held = self.held + self.text.flush(), ""
        return escape_markup(out)


class OpenAIChoices:
    """OpenAI's chat completions (POST /v1/chat/completions) for the n choices of one request: a stream of
    chat.completion.chunk events, or one chat.completion. Tool calls and outputs appear inline in the content as
    the model's own <|python_start|>…<|python_end|><|output_start|>…<|output_end|> markup (see ContentText). A choice
    that reaches one of the `stop` strings is cut before it and cancelled (finish_reason "stop"). Every chunk names
    the model that answers by its id, never the request's `model` as sent: echoing it would let a large `model` field
    multiply into every chunk."""
    id_prefix, object_name, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer, requests: list[Request], params: dict, prompt_tokens: int, model_name: str,
                 context: dict | None = None):
        self.tokenizer, self.requests, self.prompt_tokens, self.context = tokenizer, requests, prompt_tokens, context
        self.stop, self.include_usage = params["stop"], params["include_usage"]
        self.stops = tokenizer.stop_tokens()
        self.head = {"id": f"{self.id_prefix}{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}
        n = len(requests)
        self.texts, self.cutters = [ContentText(tokenizer) for _ in range(n)], [StopText(self.stop) for _ in range(n)]

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def finish_reason(self, index: int, reason: str) -> str:
        return "length" if reason == "length" and not self.cutters[index].stopped else "stop"

    def text_of(self, index: int, token: int) -> str:
        """The choice's next visible text, cancelling the choice once it reaches a stop string."""
        cutter = self.cutters[index]
        if token in self.stops or cutter.stopped:
            return ""
        out = cutter.push(self.texts[index].push(token))
        if cutter.stopped:
            self.requests[index].cancel()
        return out

    def tail_of(self, index: int) -> str:
        out = self.cutters[index].push(self.texts[index].flush())
        return out + self.cutters[index].flush()

    def chunk(self, index: int, delta: dict, finish: str | None) -> str:
        return sse({**self.head, "object": self.chunk_object,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})

    def choice(self, index: int, text: str, finish: str) -> dict:
        return {"index": index, "finish_reason": finish, "message": {"role": "assistant", "content": text}}

    async def stream(self, events: AsyncIterator[tuple[int, tuple]]) -> AsyncIterator[str]:
        n = len(self.requests)
        generated, finished = [0] * n, 0
        for index in range(n):
            yield self.chunk(index, {"role": "assistant", "content": ""}, None)
        async for index, event in events:
            if event[0] == "done":
                finished += 1
                if tail := self.tail_of(index):
                    yield self.chunk(index, {"content": tail}, None)
                if not self.cutters[index].stopped and (message := failure(event[1])):
                    yield sse({"error": {"message": message, "type": "server_error", "param": None}})
                yield self.chunk(index, {}, self.finish_reason(index, event[1]))
                continue
            generated[index] += 1
            if delta := self.text_of(index, event[1]):
                yield self.chunk(index, {"content": delta}, None)
        if finished == n:
            if self.include_usage:  # OpenAI sends this choice-less chunk only when asked to
                yield sse({**self.head, "object": self.chunk_object, "choices": [],
                           "usage": self.usage(sum(generated))})
            yield sse("[DONE]")

    async def complete(self, events: AsyncIterator[tuple[int, tuple]]) -> dict | Response:
        n = len(self.requests)
        tokens, reasons = [[] for _ in range(n)], [None] * n
        async for index, event in events:
            if event[0] == "done":
                reasons[index] = "stop" if self.cutters[index].stopped else event[1]
            elif not self.cutters[index].stopped:
                tokens[index].append(event[1])
                if self.stop:
                    self.text_of(index, event[1])
        if any(r is None for r in reasons):  # the client went away: nobody to answer
            return Response(status_code=499)
        if message := next(filter(None, map(failure, reasons)), None):
            return JSONResponse(status_code=500 if "failed" in message else 503, content={
                "error": {"message": message, "type": "server_error", "param": None}})
        choices = [self.choice(i, self.content(ts), self.finish_reason(i, reasons[i])) for i, ts in enumerate(tokens)]
        return {**self.head, "object": self.object_name, "choices": choices,
                "usage": self.usage(sum(len(ts) for ts in tokens)), "nanochat": self.context or {}}

    def content(self, tokens: list[int]) -> str:
        stream = ContentText(self.tokenizer)
        text = "".join(stream.push(t) for t in tokens if t not in self.stops) + stream.flush()
        return text[:min([i for i in (text.find(s) for s in self.stop) if i >= 0], default=len(text))]


class OpenAITextChoices(OpenAIChoices):
    """OpenAI's text completions (POST /v1/completions), the way to use a base model: the prompt continued as plain
    text, in text_completion objects whose choices carry `text` instead of a message or delta."""
    id_prefix, object_name, chunk_object = "cmpl-", "text_completion", "text_completion"

    def chunk(self, index: int, delta: dict, finish: str | None) -> str:
        if "role" in delta:  # a chat stream's opening chunk: text completions have none
            return ""
        return sse({**self.head, "object": self.chunk_object, "choices": [
            {"index": index, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}]})

    def choice(self, index: int, text: str, finish: str) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def api_docs_page(schema: dict) -> str:
    """/docs: every endpoint with its description, from the OpenAPI schema, in one page that loads nothing else.
    FastAPI's Swagger UI and ReDoc pages fetch their scripts from a CDN, so they stay blank on a machine offline."""
    rows = "".join(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                   f"<pre>{html.escape(op.get('description') or op.get('summary') or '')}</pre>"
                   for path, ops in schema.get("paths", {}).items() for method, op in ops.items())
    return ("<!doctype html><meta charset=utf-8><title>nanochat API</title><h1>nanochat API</h1>"
            f"<p>OpenAI-compatible; the machine-readable schema is <a href=/openapi.json>/openapi.json</a>.</p>{rows}")


def prompt_within(tokenizer, context: int | None, messages: list[dict], max_tokens: int) -> tuple[list[int], dict]:
    """The prompt of a conversation and how it fit the model's `context`: {"dropped_messages", "context",
    "prompt_tokens"}. The CLI's rule (`Tokenizer.render_within`): a conversation longer than the context minus room
    for the reply (`max_tokens`, at most half the context) drops its oldest turns, keeping the system prompt and the
    last message; a last message too long for that room alone still gets whatever room the context leaves. A worker
    that does not say its context (a test's stand-in) gets the whole conversation."""
    conversation = {"messages": messages}
    if context is None:
        tokens, dropped = tokenizer.render_for_completion(conversation), 0
    else:
        try:
            tokens, dropped = tokenizer.render_within(conversation, context - min(max_tokens, context // 2))
        except UserError:
            tokens, dropped = tokenizer.render_within(conversation, context - 1)
    return tokens, {"dropped_messages": dropped, "context": context, "prompt_tokens": len(tokens)}


# ---------------------------------------------------------------------------------------------------------------------
# The models served

@dataclass
class ServedModel:
    """One checkpoint behind the API: `id` is what a request's `model` names and every reply carries, `workers` its
    own schedulers (one per device), `info` what /v1/models says of it beside the id and context (stage, tag, step,
    description, and for a tiny model what to expect of it)."""
    id: str
    workers: list[BatchScheduler]
    tokenizer: object
    info: dict = field(default_factory=dict)

    @property
    def context(self) -> int | None:
        """The tokens the model attends to (None for a stand-in worker that does not say: no turns are dropped)."""
        return getattr(self.workers[0], "max_seq_len", None)


# ---------------------------------------------------------------------------------------------------------------------
# The app

def create_app(workers: list[BatchScheduler], tokenizer, model_name: str = "nanochat",
               defaults: dict | None = None, api_key: str | None = None, client_limit: int = CLIENT_LIMIT,
               allowed_hosts: list[str] = (), read_timeout: float = READ_TIMEOUT,
               models: list[ServedModel] | None = None) -> FastAPI:
    """The app; with `api_key`, everything but the page, /health and the favicon needs `Authorization: Bearer` (the
    API docs too); without one, only requests for a loopback name or one of `allowed_hosts` are answered.
    `models` serves several checkpoints in place of the one of `workers`, `tokenizer` and `model_name`: a request's
    `model` picks one by id (the first when it names none), and an id not served is a 404. With one model, any name
    is answered by it, as before (clients that insist on a name of their own keep working)."""
    models = models or [ServedModel(model_name, workers, tokenizer)]
    if len({m.id for m in models}) != len(models):
        raise UserError(f"two of the models have the same id ({', '.join(m.id for m in models)}): serve each once")
    by_id, workers, model_name = {m.id: m for m in models}, [w for m in models for w in m.workers], models[0].id
    tokenizer = models[0].tokenizer  # the tool markup the metrics count (every served model shares the tokenizer)
    defaults = {"temperature": 0.8, "top_k": 50, "max_tokens": 512, **(defaults or {})}
    limiter = ClientLimiter(client_limit)
    limits = {**LIMITS, "max_body_bytes": MAX_BODY_BYTES, "max_waiting_per_worker": MAX_WAITING,
              "concurrent_generations_per_client": client_limit, "read_timeout_s": read_timeout}
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)  # served below, with the key
    if not api_key:
        app.add_middleware(LoopbackHostsOnly, extra=list(allowed_hosts))
    app.state.draining, metrics = Draining(workers), ServerMetrics(workers, tokenizer)
    app.add_middleware(DrainGate, draining=app.state.draining)
    app.add_middleware(AccessLog, metrics=metrics)  # the outermost: it logs the refusals of the others too
    ui = (Path(__file__).parent / "ui.html").read_text(encoding="utf-8")
    started = time.time()
    turn = itertools.count()

    def pick_worker(model: ServedModel) -> BatchScheduler:
        def load(w):
            s = w.status()
            return s["active"] + s["waiting"]
        return min(model.workers, key=lambda w: (load(w), next(turn)))

    def pick_model(name: str | None) -> ServedModel:
        if len(models) == 1 or name is None:
            return models[0]
        if name not in by_id:
            shown = name if len(name) <= 80 else name[:80] + "…"
            raise BadRequest(f"the model {shown!r} is not served here: use one of {', '.join(by_id)} (GET /v1/models "
                             "lists them)", "model", status=404, code="model_not_found")
        return by_id[name]

    async def read_request(http: HTTPRequest, check=validate) -> dict:
        authorized(http, api_key)
        return check(await read_json(http, read_timeout), defaults)

    def submit(params: dict, http: HTTPRequest, model: ServedModel) -> tuple[list[Request], asyncio.Queue, dict]:
        """Queue n requests for the conversation; (requests, their shared event queue, the prompt's fit as
        `prompt_within` says it)."""
        try:
            if "prompt" in params:  # a text completion: the prompt as a document, nothing dropped
                tokens = model.tokenizer.encode(params["prompt"], prepend=model.tokenizer.get_bos_token_id())
                fit = {"dropped_messages": 0, "context": model.context, "prompt_tokens": len(tokens)}
            else:
                tokens, fit = prompt_within(model.tokenizer, model.context, params["messages"], params["max_tokens"])
        except UserError as e:
            raise BadRequest(str(e), "messages") from None
        seed = params["seed"] if params["seed"] is not None else int.from_bytes(os.urandom(4), "little")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        worker, requests = pick_worker(model), []
        if worker.status()["waiting"] >= MAX_WAITING:
            raise BadRequest("the server is busy: try again in a moment", status=503)
        client = http.client.host if http.client else "unknown"
        limiter.acquire(client, params["n"])
        http.state.watch = watch = RequestWatch(metrics, len(tokens))  # for /metrics and the access log
        release = lambda: limiter.release(client)  # noqa: E731
        try:
            for i in range(params["n"]):
                requests.append(worker.submit(Request(
                    tokens=tokens, max_tokens=params["max_tokens"], temperature=params["temperature"],
                    top_k=params["top_k"], top_p=params["top_p"], seed=seed + i,
                    events=watch.choice(EventBridge(loop, queue, i, release)))))
        except PromptTooLong as e:
            for r in requests:
                r.cancel()  # each still finishes with "done", which releases its share
            for _ in range(params["n"] - len(requests)):
                release()
            raise BadRequest(str(e), "prompt" if "prompt" in params else "messages") from None
        return requests, queue, fit

    @app.exception_handler(BadRequest)
    async def bad_request(_, exc: BadRequest):
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        return JSONResponse(status_code=exc.status, content={
            "error": {"message": str(exc), "type": kind, "param": exc.param, "code": exc.code}})

    @app.exception_handler(HTTPException)
    async def no_such_route(http: HTTPRequest, exc: HTTPException):
        """Unknown routes and methods in OpenAI's error shape, which its clients read (not FastAPI's "detail")."""
        if exc.status_code == 404:
            message, code = f"no such endpoint: {http.method} {http.url.path} (this server has {ROUTES})", "not_found"
        elif exc.status_code == 405:
            message, code = f"{http.method} is not allowed on {http.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return JSONResponse(status_code=exc.status_code, headers=exc.headers, content={
            "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})

    @app.exception_handler(Exception)
    async def server_error(_, exc: Exception):
        return JSONResponse(status_code=500, content={
            "error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error", "param": None}})

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(ui, headers=PAGE_HEADERS)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(http: HTTPRequest):
        authorized(http, api_key)
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    @app.get("/redoc", include_in_schema=False)
    async def docs(http: HTTPRequest):
        authorized(http, api_key)
        return HTMLResponse(api_docs_page(app.openapi()), headers=PAGE_HEADERS)

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **models[0].info, "context": models[0].context,
                "models": list(by_id), "workers": len(workers), "auth": bool(api_key), "limits": limits}

    @app.get("/stats")
    async def stats(http: HTTPRequest):
        authorized(http, api_key)
        return {"model": model_name, "uptime_s": round(time.time() - started, 1),
                "workers": [{"model": m.id, **w.status()} for m in models for w in m.workers]}

    @app.get("/metrics")
    async def prometheus_metrics(http: HTTPRequest):
        """Prometheus text format (see nanochat/serving/metrics.py)."""
        authorized(http, api_key)
        body, content_type = metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})

    @app.get("/v1/models")
    async def list_models(http: HTTPRequest):
        """Every model served, the default first: its id (a request's `model`) and its stage, tag, step, context."""
        authorized(http, api_key)
        return {"object": "list", "data": [{"id": m.id, "object": "model", "created": int(started),
                                            "owned_by": "nanochat", "context": m.context, **m.info} for m in models]}

    @app.post("/chat/completions")
    async def ui_chat(http: HTTPRequest):
        """The UI's stream (see UIStream); always one choice."""
        params = await read_request(http)
        params["n"] = 1
        model = pick_model(params["model"])
        requests, queue, fit = submit(params, http, model)
        reply = UIStream(model.tokenizer, fit["prompt_tokens"], {"model": model.id, **fit})
        return StreamingResponse(reply.stream(drain(requests, queue, http)), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, CONTEXT_HEADER: json.dumps(fit)})

    @app.post("/v1/chat/completions")
    async def openai_chat(http: HTTPRequest):
        """OpenAI's chat completions, streamed or not (see OpenAIChoices)."""
        params = await read_request(http)
        model = pick_model(params["model"])
        requests, queue, fit = submit(params, http, model)
        choices = OpenAIChoices(model.tokenizer, requests, params, fit["prompt_tokens"], model.id, fit)
        events = drain(requests, queue, http)
        headers = {CONTEXT_HEADER: json.dumps(fit)}
        if params["stream"]:
            return StreamingResponse(choices.stream(events), media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **headers})
        reply = await choices.complete(events)
        if isinstance(reply, Response):
            return reply
        return JSONResponse(reply, headers=headers)

    @app.post("/v1/completions")
    async def openai_completions(http: HTTPRequest):
        """OpenAI's text completions, streamed or not (see OpenAITextChoices): a base model continues `prompt`."""
        params = await read_request(http, validate_completion)
        model = pick_model(params["model"])
        requests, queue, fit = submit(params, http, model)
        choices = OpenAITextChoices(model.tokenizer, requests, params, fit["prompt_tokens"], model.id, fit)
        events = drain(requests, queue, http)
        if params["stream"]:
            return StreamingResponse(choices.stream(events), media_type="text/event-stream", headers=SSE_HEADERS)
        return await choices.complete(events)

    return app
