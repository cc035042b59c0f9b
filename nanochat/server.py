"""The chat web service: the UI's streaming endpoint and an OpenAI-compatible API over continuous-batching workers.

Generation happens in each worker's scheduler thread, never inside an async handler: the scheduler hands every
event to the event loop (`EventBridge`), and handlers only await their own queue, so one slow client never blocks
the others. A client that disconnects cancels its requests and frees their slots.
"""

import asyncio
import hmac
import itertools
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from nanochat.common import UserError
from nanochat.engine import TextStream
from nanochat.scheduler import BatchScheduler, PromptTooLong, Request

LIMITS = {"max_messages": 500, "max_message_chars": 8000, "max_total_chars": 32000,
          "temperature": (0.0, 2.0), "top_k": (0, 200), "top_p": (0.0, 1.0), "max_tokens": (1, 4096), "n": (1, 8),
          "seed": (0, 2 ** 63 - 1), "max_stop_sequences": 4, "max_stop_chars": 64}
MAX_BODY_BYTES = 1 << 20  # the largest valid conversation is ~32k characters; anything far beyond is refused unread
MAX_WAITING = 256  # requests queued per worker beyond its slots before new ones are turned away (503)
CLIENT_LIMIT = 16  # concurrent generations (choices) per client address, so that a few clients cannot fill the queue
ROLES = ("system", "developer", "user", "assistant")  # OpenAI's newer "developer" is its system prompt
PART_TYPES = {"system": ("text",), "developer": ("text",), "user": ("text",),
              "assistant": ("text", "python", "python_output")}
NO_TOOL_CALLS = ("nanochat has no function calling ('tools', 'tool_calls', role 'tool'): its Python tool runs inside "
                 "the assistant's own reply")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class BadRequest(Exception):
    """A request we refuse, with the one-line reason the client sees."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


# ---------------------------------------------------------------------------------------------------------------------
# Validation

def _number(body: dict, key: str, default, cast):
    value = body.get(key)
    if value is None:
        return default
    low, high = LIMITS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{key}' must be a number between {low} and {high}, got {value!r}", key)
    if not low <= value <= high:  # also refuses NaN
        raise BadRequest(f"'{key}' must be between {low} and {high}, got {value}", key)
    if cast is int and value != int(value):
        raise BadRequest(f"'{key}' must be an integer, got {value}", key)
    return cast(value)


def _message(m, i: int) -> tuple[str, str | list[dict], int]:
    """(role, content, characters) of one message; content is a string or, for the assistant, a list of parts."""
    if not isinstance(m, dict):
        raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
    role = m.get("role")
    if role == "tool" or (role == "assistant" and m.get("tool_calls")):
        raise BadRequest(f"messages[{i}]: tool calls are not supported: {NO_TOOL_CALLS}", "messages")
    if role not in ROLES:
        raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
    content = m.get("content")
    if isinstance(content, list):  # OpenAI content parts; the assistant's may also be python calls and outputs
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") not in PART_TYPES[role] or not isinstance(p.get("text"), str):
                raise BadRequest(f"messages[{i}].content[{j}] must be {{'type': one of "
                                 f"{', '.join(PART_TYPES[role])}, 'text': string}}", "messages")
            parts.append({"type": p["type"], "text": p["text"]})
        text = "".join(p["text"] for p in parts)
        content = parts if any(p["type"] != "text" for p in parts) else text
    elif isinstance(content, str):
        text = content
    else:
        raise BadRequest(f"messages[{i}].content must be a string or a list of parts", "messages")
    if not text.strip():
        raise BadRequest(f"messages[{i}].content must not be empty", "messages")
    if len(text) > LIMITS["max_message_chars"]:
        raise BadRequest(f"messages[{i}] is {len(text)} characters, over the limit of {LIMITS['max_message_chars']}",
                         "messages")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"messages[{i}].content is not valid Unicode (a lone surrogate)", "messages") from None
    return role, content, len(text)


def _join(a: str | list[dict], b: str | list[dict]) -> str | list[dict]:
    """Two consecutive messages of one role as one (the chat format alternates user and assistant)."""
    if isinstance(a, str) and isinstance(b, str):
        return a + "\n\n" + b
    as_parts = lambda c: [{"type": "text", "text": c}] if isinstance(c, str) else c  # noqa: E731
    return as_parts(a) + [{"type": "text", "text": "\n\n"}] + as_parts(b)


def validate(body, defaults: dict) -> dict:
    """Check a chat request; returns normalised parameters or raises BadRequest with a one-line reason."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    if len(messages) > LIMITS["max_messages"]:
        raise BadRequest(f"too many messages: {len(messages)} > {LIMITS['max_messages']}", "messages")
    system, chat, total = [], [], 0
    for i, m in enumerate(messages):
        role, content, chars = _message(m, i)
        total += chars
        if role in ("system", "developer"):
            system.append(content if isinstance(content, str) else "".join(p["text"] for p in content))
        elif chat and chat[-1]["role"] == role:
            chat[-1]["content"] = _join(chat[-1]["content"], content)
        else:
            chat.append({"role": role, "content": content})
    if total > LIMITS["max_total_chars"]:
        raise BadRequest(f"the conversation is {total} characters, over the limit of {LIMITS['max_total_chars']}",
                         "messages")
    if not chat or chat[-1]["role"] != "user":
        raise BadRequest("the last message must be from the user", "messages")
    if chat[0]["role"] != "user":
        raise BadRequest("the conversation must start with a user message (after any system message)", "messages")
    if system:
        chat.insert(0, {"role": "system", "content": "\n\n".join(system)})
    if body.get("max_tokens") is None and "max_completion_tokens" in body:  # newer OpenAI clients' name for it
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {stream!r}", "stream")
    if body.get("tools"):
        raise BadRequest(f"'tools' is not supported: {NO_TOOL_CALLS}", "tools")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {model!r}", "model")
    return {"messages": chat,
            "temperature": _number(body, "temperature", defaults["temperature"], float),
            "top_k": _number(body, "top_k", defaults["top_k"], int),
            "top_p": _number(body, "top_p", 1.0, float),
            "max_tokens": _number(body, "max_tokens", defaults["max_tokens"], int),
            "n": _number(body, "n", 1, int),
            "seed": _number(body, "seed", None, int),
            "stream": stream, "include_usage": options.get("include_usage", False), "stop": _stop(body.get("stop")),
            "model": model or None}


def _stop(value) -> list[str]:
    """OpenAI's `stop`: null, a string, or a list of up to max_stop_sequences strings."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    most, longest = LIMITS["max_stop_sequences"], LIMITS["max_stop_chars"]
    if (not isinstance(stops, list) or not 1 <= len(stops) <= most
            or not all(isinstance(s, str) and 0 < len(s) <= longest for s in stops)):
        raise BadRequest(f"'stop' must be a string or a list of 1 to {most} non-empty strings of at most {longest} "
                         f"characters, got {value!r}", "stop")
    return stops


async def read_json(http: HTTPRequest):
    """The request body as JSON, refusing other content types (a cross-site form or `text/plain` POST needs no CORS
    preflight; JSON does) and bodies over MAX_BODY_BYTES before reading them whole."""
    content_type = http.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise BadRequest(f"the request body must be JSON sent with 'Content-Type: application/json', got "
                         f"{content_type or 'no content type'!r}", status=415)
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
    try:
        return json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON in the request body: {e}") from None


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


def authorized(http: HTTPRequest, api_key: str | None) -> None:
    """With a key set, every API call must carry `Authorization: Bearer <key>` (what OpenAI clients send)."""
    if not api_key:
        return
    scheme, _, token = http.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise BadRequest("missing or wrong API key: send 'Authorization: Bearer <key>' with the key the server was "
                         "started with (--api-key or NANOCHAT_API_KEY)", status=401)


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


# ---------------------------------------------------------------------------------------------------------------------
# The app

def create_app(workers: list[BatchScheduler], tokenizer, model_name: str = "nanochat",
               defaults: dict | None = None, api_key: str | None = None, client_limit: int = CLIENT_LIMIT) -> FastAPI:
    """The app; with `api_key`, everything but the page, /health and the favicon needs `Authorization: Bearer`."""
    defaults = {"temperature": 0.8, "top_k": 50, "max_tokens": 512, **(defaults or {})}
    limiter = ClientLimiter(client_limit)
    limits = {**LIMITS, "max_body_bytes": MAX_BODY_BYTES, "max_waiting_per_worker": MAX_WAITING,
              "concurrent_generations_per_client": client_limit}
    app = FastAPI(title="nanochat")
    ui = (Path(__file__).parent / "ui.html").read_text(encoding="utf-8")
    started = time.time()
    turn = itertools.count()
    special = tokenizer.encode_special
    part_after = {special("<|python_start|>"): "python", special("<|python_end|>"): "text",
                  special("<|output_start|>"): "python_output", special("<|output_end|>"): "text"}
    stops = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    def pick_worker() -> BatchScheduler:
        def load(w):
            s = w.status()
            return s["active"] + s["waiting"]
        return min(workers, key=lambda w: (load(w), next(turn)))

    async def read_request(http: HTTPRequest) -> dict:
        authorized(http, api_key)
        return validate(await read_json(http), defaults)

    def submit(params: dict, http: HTTPRequest) -> tuple[list[Request], asyncio.Queue, int]:
        """Queue n requests for the conversation; (requests, their shared event queue, prompt tokens)."""
        try:
            tokens = tokenizer.render_for_completion({"messages": params["messages"]})
        except UserError as e:
            raise BadRequest(str(e), "messages") from None
        seed = params["seed"] if params["seed"] is not None else int.from_bytes(os.urandom(4), "little")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        worker, requests = pick_worker(), []
        if worker.status()["waiting"] >= MAX_WAITING:
            raise BadRequest("the server is busy: try again in a moment", status=503)
        client = http.client.host if http.client else "unknown"
        limiter.acquire(client, params["n"])
        release = lambda: limiter.release(client)  # noqa: E731
        try:
            for i in range(params["n"]):
                requests.append(worker.submit(Request(
                    tokens=tokens, max_tokens=params["max_tokens"], temperature=params["temperature"],
                    top_k=params["top_k"], top_p=params["top_p"], seed=seed + i,
                    events=EventBridge(loop, queue, i, release))))
        except PromptTooLong as e:
            for r in requests:
                r.cancel()  # each still finishes with "done", which releases its share
            for _ in range(params["n"] - len(requests)):
                release()
            raise BadRequest(str(e), "messages") from None
        return requests, queue, len(tokens)

    def failure(reason: str) -> str | None:
        """The error message of an abnormal finish, else None."""
        if reason.startswith("error"):
            return "generation failed: " + reason.removeprefix("error: ")
        if reason == "shutdown":
            return "the server is shutting down"
        return None

    @app.exception_handler(BadRequest)
    async def bad_request(_, exc: BadRequest):
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        return JSONResponse(status_code=exc.status, content={
            "error": {"message": str(exc), "type": kind, "param": exc.param}})

    @app.exception_handler(Exception)
    async def server_error(_, exc: Exception):
        return JSONResponse(status_code=500, content={
            "error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error", "param": None}})

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return ui

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "workers": len(workers), "auth": bool(api_key), "limits": limits}

    @app.get("/stats")
    async def stats(http: HTTPRequest):
        authorized(http, api_key)
        return {"model": model_name, "uptime_s": round(time.time() - started, 1),
                "workers": [w.status() for w in workers]}

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        authorized(http, api_key)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def ui_chat(http: HTTPRequest):
        """The UI's stream: {"part": "text"|"python"|"python_output", "delta": str} events (a new part starts with
        an empty delta), then {"done": true, "finish_reason", "usage"}; {"error": str} before it on a failure."""
        params = await read_request(http)
        params["n"] = 1
        requests, queue, prompt_tokens = submit(params, http)

        async def stream():
            part, text, generated = "text", TextStream(tokenizer), 0
            async for _, event in drain(requests, queue, http):
                if event[0] == "done":
                    if tail := text.flush():
                        yield sse({"part": part, "delta": tail})
                    if message := failure(event[1]):
                        yield sse({"error": message})
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated}
                    yield sse({"done": True, "finish_reason": event[1], "usage": usage})
                    return
                token = event[1]
                generated += 1
                if token in stops:
                    continue
                if token in part_after:
                    if tail := text.flush():
                        yield sse({"part": part, "delta": tail})
                    part = part_after[token]
                    yield sse({"part": part, "delta": ""})
                elif delta := text.push(token):
                    yield sse({"part": part, "delta": delta})

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def openai_chat(http: HTTPRequest):
        """OpenAI's chat completions: tool calls and outputs appear inline in the content as the model's own
        <|python_start|>…<|python_end|><|output_start|>…<|output_end|> markup. A choice that reaches one of the
        `stop` strings is cut before it and cancelled (finish_reason "stop")."""
        params = await read_request(http)
        requests, queue, prompt_tokens = submit(params, http)
        n = len(requests)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        head = {"id": completion_id, "created": created, "model": params["model"] or model_name}
        texts, cutters = [TextStream(tokenizer) for _ in range(n)], [StopText(params["stop"]) for _ in range(n)]

        def usage(completion_tokens: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        def finish_reason(index: int, reason: str) -> str:
            return "length" if reason == "length" and not cutters[index].stopped else "stop"

        def text_of(index: int, token: int) -> str:
            """The choice's next visible text, cancelling the choice once it reaches a stop string."""
            if token in stops or cutters[index].stopped:
                return ""
            out = cutters[index].push(texts[index].push(token))
            if cutters[index].stopped:
                requests[index].cancel()
            return out

        def tail_of(index: int) -> str:
            out = cutters[index].push(texts[index].flush())
            return out + cutters[index].flush()

        if params["stream"]:
            def chunk(index: int, delta: dict, finish: str | None) -> str:
                return sse({**head, "object": "chat.completion.chunk",
                            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})

            async def stream():
                generated, finished = [0] * n, 0
                for index in range(n):
                    yield chunk(index, {"role": "assistant", "content": ""}, None)
                async for index, event in drain(requests, queue, http):
                    if event[0] == "done":
                        finished += 1
                        if tail := tail_of(index):
                            yield chunk(index, {"content": tail}, None)
                        if not cutters[index].stopped and (message := failure(event[1])):
                            yield sse({"error": {"message": message, "type": "server_error", "param": None}})
                        yield chunk(index, {}, finish_reason(index, event[1]))
                        continue
                    generated[index] += 1
                    if delta := text_of(index, event[1]):
                        yield chunk(index, {"content": delta}, None)
                if finished == n:
                    if params["include_usage"]:  # OpenAI sends this choice-less chunk only when asked to
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                                   "usage": usage(sum(generated))})
                    yield sse("[DONE]")

            return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

        tokens, reasons = [[] for _ in range(n)], [None] * n
        async for index, event in drain(requests, queue, http):
            if event[0] == "done":
                reasons[index] = "stop" if cutters[index].stopped else event[1]
            elif not cutters[index].stopped:
                tokens[index].append(event[1])
                if params["stop"]:
                    text_of(index, event[1])
        if any(r is None for r in reasons):  # the client went away: nobody to answer
            return Response(status_code=499)
        if message := next(filter(None, map(failure, reasons)), None):
            return JSONResponse(status_code=500 if "failed" in message else 503, content={
                "error": {"message": message, "type": "server_error", "param": None}})

        def content(ts: list[int]) -> str:
            text = tokenizer.decode([t for t in ts if t not in stops])
            return text[:min([i for i in (text.find(s) for s in params["stop"]) if i >= 0], default=len(text))]

        choices = [{"index": i, "finish_reason": finish_reason(i, reasons[i]),
                    "message": {"role": "assistant", "content": content(ts)}} for i, ts in enumerate(tokens)]
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": usage(sum(len(ts) for ts in tokens))}

    return app
