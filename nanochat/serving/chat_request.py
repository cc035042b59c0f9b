"""What a chat request may contain: the OpenAI-style body checked field by field, with one-line reasons.

Everything here raises `BadRequest` (status 400 unless said otherwise) with the message the client sees; the limits
are in LIMITS and reported by the server's /health.
"""

import asyncio
import hmac
import json

from fastapi import Request as HTTPRequest

LIMITS = {"max_messages": 500, "max_message_chars": 8000, "max_total_chars": 32000,
          "temperature": (0.0, 2.0), "top_k": (0, 200), "top_p": (0.0, 1.0), "max_tokens": (1, 4096), "n": (1, 8),
          "seed": (0, 2 ** 63 - 1), "max_stop_sequences": 4, "max_stop_chars": 64}
MAX_BODY_BYTES = 1 << 20  # the largest valid conversation is ~32k characters; anything far beyond is refused unread
ROLES = ("system", "developer", "user", "assistant")  # OpenAI's newer "developer" is its system prompt
PART_TYPES = {"system": ("text",), "developer": ("text",), "user": ("text",),
              "assistant": ("text", "python", "python_output")}
NO_TOOL_CALLS = ("nanochat has no function calling ('tools', 'tool_calls', role 'tool'): its Python tool runs inside "
                 "the assistant's own reply")


class BadRequest(Exception):
    """A request we refuse, with the one-line reason the client sees."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


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
    return {"messages": chat, **_options(body, defaults)}


def validate_completion(body, defaults: dict) -> dict:
    """Check a text completion request (a `prompt` to continue, OpenAI's /v1/completions); returns normalised
    parameters or raises BadRequest with a one-line reason."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string (one prompt per request; use 'n' for several samples)",
                         "prompt")
    if len(prompt) > LIMITS["max_total_chars"]:
        raise BadRequest(f"the prompt is {len(prompt)} characters, over the limit of {LIMITS['max_total_chars']}",
                         "prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("'prompt' is not valid Unicode (a lone surrogate)", "prompt") from None
    return {"prompt": prompt, **_options(body, defaults)}


def _options(body: dict, defaults: dict) -> dict:
    """The sampling and streaming options chat and text completions share."""
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
    model = body.get("model")  # picks one of the models served; the reply names it (see server.OpenAIChoices)
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {model!r}", "model")
    return {"temperature": _number(body, "temperature", defaults["temperature"], float),
            "top_k": _number(body, "top_k", defaults["top_k"], int),
            "top_p": _number(body, "top_p", 1.0, float),
            "max_tokens": _number(body, "max_tokens", defaults["max_tokens"], int),
            "n": _number(body, "n", 1, int),
            "seed": _number(body, "seed", None, int),
            "stream": stream, "include_usage": options.get("include_usage", False), "stop": _stop(body.get("stop")),
            "model": model}


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


async def read_json(http: HTTPRequest, timeout: float):
    """The request body as JSON, refusing other content types (a cross-site form or `text/plain` POST needs no CORS
    preflight; JSON does), bodies over MAX_BODY_BYTES before reading them whole, bodies that take longer than
    `timeout` seconds to arrive (a slow client would hold its connection) and JSON nested too deeply to parse
    (json.loads recurses)."""
    content_type = http.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise BadRequest(f"the request body must be JSON sent with 'Content-Type: application/json', got "
                         f"{content_type or 'no content type'!r}", status=415)
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in http.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
    except TimeoutError:
        raise BadRequest(f"the request body did not arrive within {timeout:g} s", status=408) from None
    try:
        return json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON in the request body: {e}") from None
    except RecursionError:
        raise BadRequest("the request body's JSON is nested too deeply") from None


def authorized(http: HTTPRequest, api_key: str | None) -> None:
    """With a key set, every API call must carry `Authorization: Bearer <key>` (what OpenAI clients send)."""
    if not api_key:
        return
    scheme, _, token = http.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise BadRequest("missing or wrong API key: send 'Authorization: Bearer <key>' with the key the server was "
                         "started with (--api-key or NANOCHAT_API_KEY)", status=401)
