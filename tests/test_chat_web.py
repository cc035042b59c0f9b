"""The web API through a real uvicorn server on 127.0.0.1: OpenAI-compatible, validated, concurrent, cancellable."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import psutil
import pytest

from webserver import ChatServer, save_long_talking_model

SLOTS = 4
READ_TIMEOUT = 3  # seconds the module's server gives a client for its headers, and again for its body


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    """One server for the module: a tiny model that talks until max_tokens (default 24 per request here)."""
    base = tmp_path_factory.mktemp("web")
    save_long_talking_model(base, tiny_tokenizer)
    s = ChatServer(base, "--slots", str(SLOTS), "--max-tokens", "24", "--temperature", "1.0",
                   "--allowed-host", "chat.example", "--read-timeout", str(READ_TIMEOUT))
    yield s
    s.stop()


def chat(content="Hello there", **kwargs):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8}
    body.update(kwargs)
    return body


def sse_data(response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def stats(server) -> dict:
    return httpx.get(server.url + "/stats").json()["workers"][0]


def wait_until_idle(server, timeout=30.0) -> dict:
    deadline = time.time() + timeout
    while True:
        worker = stats(server)
        if (worker["active"] == 0 and worker["waiting"] == 0) or time.time() > deadline:
            return worker
        time.sleep(0.1)


def test_health_models_and_the_page(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "nanochat-d2-sft"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<title>nanochat</title>" in page.text
    assert "<script src" not in page.text and "<link" not in page.text  # nothing fetched at runtime (no CDN)


def test_openai_non_streaming_completion_with_usage(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(n=2, temperature=0.5), timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["message"]["role"] == "assistant" and c["finish_reason"] == "length" for c in body["choices"])
    usage = body["usage"]
    assert usage["completion_tokens"] == 16  # two choices × max_tokens
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_streaming_format(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(stream=True), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_data(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    assert content and all(set(d) == {"content"} and d["content"] for d in content)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert all(c["choices"] and "usage" not in c for c in chunks)  # every chunk has choices[0] (the usual loop)


def test_usage_chunk_only_when_the_client_asks_for_it(server):
    body = chat(stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(e) for e in sse_data(r)[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_streaming_and_non_streaming_agree_for_a_seed(server):
    body = chat("Tell me about cats", temperature=1.0, top_k=20, seed=1234, max_tokens=12)
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(e) for e in sse_data(r)[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"] and streamed


def test_max_completion_tokens_is_accepted_for_max_tokens(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["usage"][
        "completion_tokens"] == 3


def test_n_streaming_choices_each_finish(server):
    body = chat(stream=True, n=3, stream_options={"include_usage": True})
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(e) for e in sse_data(r)[:-1]]
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert finished == [0, 1, 2] and chunks[-1]["usage"]["completion_tokens"] == 24


def test_ui_stream_sends_parts_and_done(server):
    with httpx.stream("POST", server.url + "/chat/completions", json=chat(), timeout=60) as r:
        events = [json.loads(e) for e in sse_data(r)]
    assert events[-1]["done"] is True and events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 8
    assert events[:-1] and all(e["part"] == "text" for e in events[:-1])


def test_assistant_turns_with_tool_parts_are_accepted(server):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": [{"type": "python", "text": "2+3"},
                                                  {"type": "python_output", "text": "5"},
                                                  {"type": "text", "text": "It is 5."}]},
                {"role": "user", "content": [{"type": "text", "text": "And 3+4?"}]}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text


LONG = "word " * 1600  # 8,000 characters


@pytest.mark.parametrize("body, status, fragment", [
    ({"messages": []}, 400, "non-empty list"),
    ([1, 2], 400, "JSON object"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"content": "hi"}]}, 400, "role"),
    ({"messages": ["hi"]}, 400, "messages[0]"),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "string"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "empty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, 400, "content[0]"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, 400, "8000"),
    ({"messages": [{"role": "user", "content": LONG}] * 5}, 400, "32000"),
    ({"messages": [{"role": "user", "content": "hi"}] * 501}, 400, "too many"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, 400, "surrogate"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "last message"),
    ({"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}, 400, "start with"),
    (chat(temperature=3), 400, "temperature"),
    (chat(temperature="hot"), 400, "temperature"),
    (chat(top_k=500), 400, "top_k"),
    (chat(top_k=2.5), 400, "integer"),
    (chat(top_p=1.5), 400, "top_p"),
    (chat(max_tokens=0), 400, "max_tokens"),
    (chat(max_tokens=5000), 400, "max_tokens"),
    (chat(max_tokens="lots"), 400, "max_tokens"),
    (chat(n=9), 400, "'n'"),
    (chat(stream="yes"), 400, "stream"),
    (chat(seed=-1), 400, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "1"}]},
     400, "tool calls are not supported"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x",
                                                      "tool_calls": [{"id": "1"}]}]}, 400, "not supported"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "'tools' is not supported"),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "'stop'"),
    (chat(stop=""), 400, "'stop'"),
    (chat(stop=7), 400, "'stop'"),
    (chat(stream_options="yes"), 400, "stream_options"),
    (chat(model=5), 400, "'model'"),
])
def test_invalid_requests_get_clear_4xx(server, body, status, fragment):
    for path in ("/v1/chat/completions", "/chat/completions"):
        r = httpx.post(server.url + path, content=json.dumps(body), timeout=30,  # ASCII JSON, lone surrogates too
                       headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert fragment in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe garbage", b'{"messages": [NaN]}'])
def test_malformed_json_is_a_400(server, content):
    r = httpx.post(server.url + "/chat/completions", content=content, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert "malformed JSON" in r.json()["error"]["message"] or "messages[0]" in r.json()["error"]["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_declared_json_is_refused(server, content_type):
    """A web page may POST text/plain or a form cross-site without a CORS preflight; JSON needs one."""
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/chat/completions", "/chat/completions"):
        r = httpx.post(server.url + path, content=json.dumps(chat()), headers=headers, timeout=30)
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]


def test_health_states_the_limits(server):
    health = httpx.get(server.url + "/health").json()
    assert health["auth"] is False
    assert health["limits"]["max_tokens"] == [1, 4096] and health["limits"]["concurrent_generations_per_client"] == 16


def test_developer_is_the_system_role_and_the_served_model_is_named(server):
    def reply(role, **extra):
        body = {"messages": [{"role": role, "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
                "max_tokens": 8, "seed": 7, "temperature": 1.0, **extra}
        return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    as_system, as_developer = reply("system"), reply("developer", model="my-alias")
    assert as_developer["choices"][0]["message"] == as_system["choices"][0]["message"]
    assert as_developer["model"] == as_system["model"] == "nanochat-d2-sft"


def test_a_large_model_field_is_not_multiplied_into_the_stream(server):
    """The request's `model` used to be echoed into every chunk: 195 KiB in, megabytes out."""
    body = chat(model="x" * 150_000, stream=True, max_tokens=8)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        streamed = b"".join(r.iter_bytes())
    chunks = [json.loads(line[6:]) for line in streamed.decode().splitlines() if line.startswith("data: {")]
    assert r.status_code == 200 and all(c["model"] == "nanochat-d2-sft" for c in chunks)
    assert len(streamed) < 16_000  # ten chunks of a few hundred bytes, whatever the request held


HOSTS_SERVED = ["127.0.0.1", "localhost", "[::1]", "LocalHost", "chat.example", "chat.example:443"]
HOSTS_REFUSED = ["evil.example", "127.0.0.1.evil.example", "localhost.evil.example:80", "[::2]", ""]


def test_without_a_key_only_loopback_and_allowed_host_names_are_served(server):
    """DNS rebinding: a page on evil.example, once its name points at 127.0.0.1, sends `Host: evil.example`."""
    for host in HOSTS_SERVED:
        name = host if ":" in host.replace("[::1]", "") else f"{host}:{server.port}"
        assert httpx.get(server.url + "/v1/models", headers={"Host": name}).status_code == 200, host
    for host in HOSTS_REFUSED:
        for method, path in (("GET", "/"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                             ("POST", "/chat/completions"), ("GET", "/health")):
            r = httpx.request(method, server.url + path, json=chat(), headers={"Host": host}, timeout=30)
            assert r.status_code == 421, (host, path)
            assert "--allowed-host" in r.json()["error"]["message"]


def test_json_nested_too_deeply_is_a_400(server):
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(server.url + "/v1/chat/completions", content=deep, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def answer_to(server, request: bytes) -> bytes:
    """What the server sends back on a raw connection that sends `request` and then nothing, up to its message."""
    answer = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10 * READ_TIMEOUT) as s:
        s.sendall(request)
        while b"did not arrive" not in answer and (more := s.recv(65536)):
            answer += more
    return answer


def test_a_client_too_slow_with_its_headers_or_body_gets_a_408(server):
    head = answer_to(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the blank line never comes
    assert head.startswith(b"HTTP/1.1 408") and b"headers did not arrive" in head
    body = answer_to(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                             b"application/json\r\nContent-Length: 100\r\n\r\n{\"messages\"")
    assert body.startswith(b"HTTP/1.1 408") and b"body did not arrive" in body
    assert httpx.get(server.url + "/health").status_code == 200


def test_the_page_may_not_be_framed(server):
    page = httpx.get(server.url + "/")
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["content-security-policy"] == "frame-ancestors 'none'"


def test_a_stop_string_ends_the_reply_before_it(server):
    body = chat("Tell me about dogs", seed=99, temperature=1.0, max_tokens=24)
    free = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    text = free["choices"][0]["message"]["content"]
    stop = text[6:9]
    expected = text[:text.find(stop)]
    cut = httpx.post(server.url + "/v1/chat/completions", json={**body, "stop": [stop, "\x00never"]},
                     timeout=60).json()
    assert cut["choices"][0] == {"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": expected}}
    assert cut["usage"]["completion_tokens"] < free["usage"]["completion_tokens"]  # generation was cancelled
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stop": stop, "stream": True},
                      timeout=60) as r:
        chunks = [json.loads(e) for e in sse_data(r)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_openai_client_streaming_loop_works_unchanged(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed-here")
    stream = client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=8, stream=True)
    text = ""
    for chunk in stream:  # the loop of OpenAI's documentation
        text += chunk.choices[0].delta.content or ""
    whole = client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=8, stop=["\x00"])
    assert text and whole.choices[0].message.content and whole.model == "nanochat-d2-sft"
    with_usage = list(client.chat.completions.create(
        model="nanochat", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    assert with_usage[-1].usage.completion_tokens == 8 and not with_usage[-1].choices


def test_an_oversized_body_is_refused(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * (2 << 20), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_conversation_over_the_context_is_a_400(tmp_path, tiny_tokenizer):
    save_long_talking_model(tmp_path, tiny_tokenizer, sequence_len=64)
    s = ChatServer(tmp_path, "--slots", "1")
    try:
        r = httpx.post(s.url + "/v1/chat/completions", json=chat("hello " * 200), timeout=30)
        assert r.status_code == 400 and "shorten it" in r.json()["error"]["message"]
    finally:
        s.stop()


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_a_streaming_client_that_disconnects_frees_its_slot(server, path):
    before = stats(server)["cancelled"]
    body = chat("Tell me a very long story", max_tokens=4000, stream=True)
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        for _ in r.iter_lines():
            break  # read one event, then hang up
    worker = wait_until_idle(server)
    assert worker["cancelled"] == before + 1
    assert worker["active"] == 0 and worker["free_slots"] == SLOTS


def test_a_waiting_non_streaming_client_that_disconnects_frees_its_slot(server):
    before = stats(server)["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=4000), timeout=1.0)
    worker = wait_until_idle(server)
    assert worker["cancelled"] == before + 1 and worker["free_slots"] == SLOTS


def test_sixteen_concurrent_streaming_clients_all_complete_with_their_own_replies(server):
    """More clients than slots: all finish, and each gets exactly the reply it gets when alone (no mixing)."""
    prompts = [f"Question number {i}: what is {i} + {i}?" for i in range(16)]
    results = [None] * 16

    def client(i):
        body = chat(prompts[i], stream=True, max_tokens=10, temperature=0.0)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            results[i] = sse_data(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(r is not None and r[-1] == "[DONE]" for r in results)
    for i in (0, 7, 15):
        alone = httpx.post(server.url + "/v1/chat/completions", json=chat(prompts[i], max_tokens=10, temperature=0.0),
                           timeout=60).json()["choices"][0]["message"]["content"]
        chunks = [json.loads(e) for e in results[i][:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == alone
    worker = wait_until_idle(server)
    assert worker["errors"] == 0 and worker["free_slots"] == SLOTS


# ---------------------------------------------------------------------------------------------------------------------
# The server's event → SSE mapping, driven by a scripted worker (tool parts, split characters, failures)

class ScriptedWorker:
    """Stands in for a BatchScheduler: plays `script(request)`'s events into the request from its own thread."""

    def __init__(self, script):
        self.script = script

    def status(self):
        return {"active": 0, "waiting": 0}

    def submit(self, request):
        def play(events):
            for event in events:
                request.events.put(event)
        threading.Thread(target=play, args=(self.script(request),), daemon=True).start()
        return request


@contextmanager
def serve(app):
    """A real uvicorn server for `app` in this process, on a free loopback port; yields its URL."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def scripted(tiny_tokenizer):
    """A real uvicorn server in this process whose worker replies with a tool call, an emoji split into bytes, and
    then either stops normally or fails (a prompt containing 'fail')."""
    from nanochat.serving.server import create_app
    tok = tiny_tokenizer
    s = tok.encode_special
    sampled = lambda text: [("token", t, 1) for t in tok.encode(text)]  # noqa: E731
    forced = lambda ids: [("token", t, 0) for t in ids]  # noqa: E731
    reply = (sampled("Let me compute") + [("token", s("<|python_start|>"), 1)] + sampled("6*7")
             + [("token", s("<|python_end|>"), 1)]
             + forced([s("<|output_start|>")] + tok.encode("42") + [s("<|output_end|>")])
             + sampled(" so 42 🙂") + [("token", s("<|assistant_end|>"), 1)])

    printed = (sampled("Look") + [("token", s("<|python_start|>"), 1)] + sampled("print(x)")
               + [("token", s("<|python_end|>"), 1)]
               + forced([s("<|output_start|>")] + tok.encode("a<|output_end|>b<|python_start|>c")
                        + [s("<|output_end|>")])
               + sampled(" done <|not markup") + [("token", s("<|assistant_end|>"), 1)])

    def script(request):
        if "fail" in tok.decode(request.tokens):
            return reply[:3] + [("done", "error: RuntimeError: boom")]
        if "markup" in tok.decode(request.tokens):
            return printed + [("done", "stop")]
        return reply + [("done", "stop")]

    with serve(create_app([ScriptedWorker(script)], tok, "scripted")) as url:
        yield url


def test_ui_stream_shows_tool_calls_and_outputs_as_parts(scripted):
    with httpx.stream("POST", scripted + "/chat/completions", json=chat(), timeout=30) as r:
        events = [json.loads(e) for e in sse_data(r)]
    parts = []
    for e in events[:-1]:
        if not parts or e["delta"] == "" or parts[-1][0] != e["part"]:
            parts.append([e["part"], ""])
        parts[-1][1] += e["delta"]
    assert [tuple(p) for p in parts if p[1]] == [("text", "Let me compute"), ("python", "6*7"),
                                                  ("python_output", "42"), ("text", " so 42 🙂")]
    assert all("\ufffd" not in e.get("delta", "") for e in events)  # the emoji's bytes arrived as one character
    assert events[-1] == {"done": True, "finish_reason": "stop", "usage": events[-1]["usage"],
                          "nanochat": {"model": "scripted", "dropped_messages": 0, "context": None,
                                       "prompt_tokens": events[-1]["usage"]["prompt_tokens"]}}


def test_openai_content_carries_the_tool_markup(scripted):
    body = httpx.post(scripted + "/v1/chat/completions", json=chat(), timeout=30).json()
    assert body["choices"][0]["message"]["content"] == (
        "Let me compute<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> so 42 🙂")
    assert body["choices"][0]["finish_reason"] == "stop"


def test_markup_a_program_printed_is_escaped_in_the_content(scripted):
    """In the content "<|" only starts real markup: text that spells it (here a program's output, then the model's
    own words) has "<\\|" instead."""
    expected = ("Look<|python_start|>print(x)<|python_end|><|output_start|>a<\\|output_end|>b<\\|python_start|>c"
                "<|output_end|> done <\\|not markup")
    body = httpx.post(scripted + "/v1/chat/completions", json=chat("show markup"), timeout=30).json()
    assert body["choices"][0]["message"]["content"] == expected
    with httpx.stream("POST", scripted + "/v1/chat/completions", json=chat("show markup", stream=True),
                      timeout=30) as r:
        chunks = [json.loads(e) for e in sse_data(r)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    with httpx.stream("POST", scripted + "/chat/completions", json=chat("show markup"), timeout=30) as r:
        events = [json.loads(e) for e in sse_data(r)]  # the page's parts need no escaping
    printed = "".join(e["delta"] for e in events if e.get("part") == "python_output")
    assert printed == "a<|output_end|>b<|python_start|>c"


def test_a_failed_generation_is_reported_not_hidden(scripted):
    r = httpx.post(scripted + "/v1/chat/completions", json=chat("please fail"), timeout=30)
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    with httpx.stream("POST", scripted + "/chat/completions", json=chat("please fail"), timeout=30) as r:
        events = [json.loads(e) for e in sse_data(r)]
    assert "boom" in events[-2]["error"] and events[-1]["done"] is True
    with httpx.stream("POST", scripted + "/v1/chat/completions", json=chat("please fail", stream=True),
                      timeout=30) as r:
        events = sse_data(r)
    assert any("boom" in e for e in events) and events[-1] == "[DONE]"


def test_a_stop_string_split_across_tokens_cuts_the_scripted_reply(scripted):
    body = httpx.post(scripted + "/v1/chat/completions", json=chat(stop=[" compute", "zz"]), timeout=30).json()
    assert body["choices"][0]["message"]["content"] == "Let me" and body["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", scripted + "/v1/chat/completions", json=chat(stop="me comp", stream=True),
                      timeout=30) as r:
        chunks = [json.loads(e) for e in sse_data(r)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Let "


class HoldingWorker:
    """Generates nothing until the request is cancelled (its client hangs up): a generation that stays running."""

    def status(self):
        return {"active": 0, "waiting": 0}

    def submit(self, request):
        def hold():
            request.cancelled.wait(60)
            request.events.put(("done", "cancelled"))
        threading.Thread(target=hold, daemon=True).start()
        return request


@pytest.fixture
def guarded(tiny_tokenizer):
    from nanochat.serving.server import create_app
    with serve(create_app([HoldingWorker()], tiny_tokenizer, "held", api_key="s3cret key", client_limit=3)) as url:
        yield url


AUTH = {"Authorization": "Bearer s3cret key"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret key"},
                                     {"Authorization": "Basic s3cret key"}])
def test_a_missing_or_wrong_key_is_refused(guarded, headers):
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/chat/completions"), ("GET", "/v1/models"),
                         ("GET", "/stats")):
        r = httpx.request(method, guarded + path, json=chat(), headers=headers, timeout=10)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"], path
    health = httpx.get(guarded + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["auth"] is True  # for load balancers, and says a key is needed


def test_the_right_key_is_accepted(guarded):
    assert httpx.get(guarded + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"] == "held"


def test_with_a_key_any_host_name_is_served(guarded):
    r = httpx.get(guarded + "/v1/models", headers={**AUTH, "Host": "evil.example"}, timeout=10)
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_the_api_docs_need_the_key(guarded, path):
    r = httpx.get(guarded + path, timeout=10)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(guarded + path, headers=AUTH, timeout=10).status_code == 200


def test_one_client_cannot_hold_more_than_its_share(guarded):
    def open_stream(n=1):
        client = httpx.Client(timeout=10, headers=AUTH)
        response = client.send(client.build_request("POST", guarded + "/v1/chat/completions",
                                                    json=chat(stream=True, n=n)), stream=True)
        return client, response

    held = [open_stream(2), open_stream(1)]  # 3 generations: the limit
    assert all(r.status_code == 200 for _, r in held)
    r = httpx.post(guarded + "/v1/chat/completions", json=chat(), headers=AUTH, timeout=10)
    assert r.status_code == 429 and "limit 3" in r.json()["error"]["message"]
    client, response = held.pop()
    response.close()  # hang up: the server cancels it and frees its share
    client.close()
    deadline = time.time() + 10
    while True:
        again = open_stream(1)
        if again[1].status_code == 200 or time.time() > deadline:
            break
        again[1].close()
        again[0].close()
        time.sleep(0.2)
    assert again[1].status_code == 200
    for client, response in [*held, again]:
        response.close()
        client.close()


def non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    return None


def test_by_default_only_this_machine_can_connect_and_the_env_key_is_required(tmp_path, tiny_tokenizer):
    save_long_talking_model(tmp_path, tiny_tokenizer, sequence_len=256)
    s = ChatServer(tmp_path, "--slots", "1", host=None, env={"NANOCHAT_API_KEY": "from-env"})
    try:
        assert "127.0.0.1" in s.log() and "warning" not in s.log() and "python tool" in s.log()
        body = chat(max_tokens=2)
        assert httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30).status_code == 401
        ok = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30,
                        headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200
        address = non_loopback_ipv4()
        if address is None:
            pytest.skip("this machine has no non-loopback IPv4 address to try")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{address}:{s.port}/health", timeout=5)
    finally:
        s.stop()


def test_exposing_the_server_without_a_key_warns(base_dir):
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--host", "0.0.0.0", "--dry-run",
                           "--device-type", "cpu"], env={**env, "NANOCHAT_BASE_DIR": str(base_dir)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "warning: --host 0.0.0.0 without an API key" in proc.stdout and "--allowed-host NAME" in proc.stdout
