"""The chat web service: the UI's streaming endpoint and an OpenAI-compatible API over continuous-batching workers.

Generation happens in each worker's scheduler thread, never inside an async handler; handlers only wait on the
request's event queue, so one slow client never blocks the others. A client that disconnects cancels its request
and frees its slot.
"""

import asyncio
import itertools
import json
import queue
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanochat.engine import BatchScheduler, Request, TextStream

LIMITS = {"max_messages": 500, "max_message_chars": 8000, "max_total_chars": 32000,
          "temperature": (0.0, 2.0), "top_k": (0, 200), "top_p": (0.0, 1.0), "max_tokens": (1, 4096), "n": (1, 8)}
ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _number(body: dict, key: str, default, cast):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{key}' must be a number", key)
    low, high = LIMITS[key]
    if not low <= value <= high:
        raise BadRequest(f"'{key}' must be between {low} and {high}, got {value}", key)
    return cast(value)


def validate(body, defaults: dict) -> dict:
    """Check a chat request; returns normalised parameters or raises BadRequest with a one-line reason."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    if len(messages) > LIMITS["max_messages"]:
        raise BadRequest(f"too many messages: {len(messages)} > {LIMITS['max_messages']}", "messages")
    total = 0
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str) or not content.strip():
            raise BadRequest(f"messages[{i}].content must be a non-empty string", "messages")
        if len(content) > LIMITS["max_message_chars"]:
            raise BadRequest(f"messages[{i}] is {len(content)} characters, over {LIMITS['max_message_chars']}",
                             "messages")
        total += len(content)
        clean.append({"role": m["role"], "content": content})
    if total > LIMITS["max_total_chars"]:
        raise BadRequest(f"the conversation is {total} characters, over {LIMITS['max_total_chars']}", "messages")
    system = [m for m in clean if m["role"] == "system"]
    chat = [m for m in clean if m["role"] != "system"]
    if not chat or chat[-1]["role"] != "user":
        raise BadRequest("the last message must be from the user", "messages")
    merged = []  # merge consecutive same-role messages so roles alternate
    for m in chat:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    if merged[0]["role"] != "user":
        raise BadRequest("the conversation must start with a user message", "messages")
    if system:
        merged = [{"role": "system", "content": "\n\n".join(m["content"] for m in system)}] + merged
    return {"messages": merged,
            "temperature": _number(body, "temperature", defaults["temperature"], float),
            "top_k": _number(body, "top_k", defaults["top_k"], int),
            "top_p": _number(body, "top_p", 1.0, float),
            "max_tokens": _number(body, "max_tokens", defaults["max_tokens"], int),
            "n": _number(body, "n", 1, int),
            "stream": bool(body.get("stream", False)),
            "seed": body.get("seed") if isinstance(body.get("seed"), int) else None}


def create_app(workers: list[BatchScheduler], tokenizer, model_name: str = "nanochat",
               defaults: dict | None = None) -> FastAPI:
    defaults = defaults or {"temperature": 0.8, "top_k": 50, "max_tokens": 512}
    app = FastAPI(title="nanochat")
    ui = (Path(__file__).parent / "ui.html").read_text(encoding="utf-8")
    counter = itertools.count()
    special = tokenizer.encode_special
    kinds = {special("<|python_start|>"): ("python", True), special("<|python_end|>"): ("text", False),
             special("<|output_start|>"): ("python_output", True), special("<|output_end|>"): ("text", False)}
    stops = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    def pick_worker() -> BatchScheduler:
        return min(workers, key=lambda w: (w.status()["active"] + w.status()["waiting"], next(counter)))

    def submit(params: dict, sample: int = 0) -> Request:
        tokens = tokenizer.render_for_completion({"messages": params["messages"]})
        seed = params["seed"] if params["seed"] is not None else int(time.time() * 1000) % 2 ** 31
        request = Request(tokens=tokens, max_tokens=params["max_tokens"], temperature=params["temperature"],
                          top_k=params["top_k"] or None, top_p=params["top_p"], seed=seed + sample)
        return pick_worker().submit(request)

    async def events(request: Request, http: HTTPRequest):
        """(kind, token, mask) events until the request is done; cancels it if the client goes away."""
        try:
            while True:
                try:
                    event = await asyncio.to_thread(request.events.get, True, 0.5)
                except queue.Empty:
                    if await http.is_disconnected():
                        request.cancel()
                        return
                    continue
                yield event
                if event[0] == "done":
                    return
        finally:
            request.cancel()  # no-op when finished; frees the slot when the client disconnected mid-stream

    async def parse(http: HTTPRequest) -> dict:
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise BadRequest("malformed JSON in the request body")
        return validate(body, defaults)

    @app.exception_handler(BadRequest)
    async def bad_request(_, exc: BadRequest):
        return JSONResponse(status_code=400, content={"error": {"message": str(exc), "type": "invalid_request_error",
                                                                "param": exc.param}})

    @app.exception_handler(ValueError)
    async def too_long(_, exc: ValueError):
        return JSONResponse(status_code=400, content={"error": {"message": str(exc), "type": "invalid_request_error",
                                                                "param": "messages"}})

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return ui

    @app.get("/health")
    async def health():
        return {"status": "ok", "workers": len(workers), "model": model_name}

    @app.get("/stats")
    async def stats():
        return {"workers": [w.status() for w in workers]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def ui_chat(http: HTTPRequest):
        """The UI's stream: data: {"part": "text"|"python"|"python_output", "delta": "..."} … data: {"done": ...}."""
        params = await parse(http)
        request = submit(params)

        async def stream():
            part, text = "text", TextStream(tokenizer)
            async for event in events(request, http):
                if event[0] == "done":
                    yield f"data: {json.dumps({'done': True, 'finish_reason': event[1]})}\n\n"
                    return
                token = event[1]
                if token in stops:
                    continue
                if token in kinds:
                    part, _ = kinds[token]
                    text = TextStream(tokenizer)
                    yield f"data: {json.dumps({'part': part, 'delta': ''})}\n\n"
                    continue
                delta = text.push(token)
                if delta:
                    yield f"data: {json.dumps({'part': part, 'delta': delta})}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def openai_chat(http: HTTPRequest):
        params = await parse(http)
        requests = [submit(params, i) for i in range(params["n"])]
        prompt_tokens = len(requests[0].tokens)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def chunk(index: int, delta: dict, finish: str | None) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(body)}\n\n"

        def finish_reason(reason: str) -> str:
            return "length" if reason == "length" else "stop"

        if params["stream"]:
            async def stream():
                completion_tokens = 0
                for index, request in enumerate(requests):
                    yield chunk(index, {"role": "assistant", "content": ""}, None)
                    text = TextStream(tokenizer)
                    async for event in events(request, http):
                        if event[0] == "done":
                            yield chunk(index, {}, finish_reason(event[1]))
                            break
                        completion_tokens += 1
                        if event[1] in stops:
                            continue
                        delta = text.push(event[1])
                        if delta:
                            yield chunk(index, {"content": delta}, None)
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
                yield f"data: {json.dumps({'id': completion_id, 'object': 'chat.completion.chunk', 'created': created, 'model': model_name, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        choices, completion_tokens = [], 0
        for index, request in enumerate(requests):
            tokens, reason = [], "stop"
            async for event in events(request, http):
                if event[0] == "done":
                    reason = event[1]
                    break
                completion_tokens += 1
                if event[1] not in stops:
                    tokens.append(event[1])
            choices.append({"index": index, "message": {"role": "assistant", "content": tokenizer.decode(tokens)},
                            "finish_reason": finish_reason(reason)})
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                              "total_tokens": prompt_tokens + completion_tokens}}

    return app
