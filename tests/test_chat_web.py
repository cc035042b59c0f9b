"""The web API through a real uvicorn server on 127.0.0.1: OpenAI-compatible, validated, concurrent, cancellable."""

import json
import threading
import time

import httpx
import pytest

from webserver import ChatServer, save_long_talking_model

SLOTS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    """One server for the module: a tiny model that talks until max_tokens (default 24 per request here)."""
    base = tmp_path_factory.mktemp("web")
    save_long_talking_model(base, tiny_tokenizer)
    s = ChatServer(base, "--slots", str(SLOTS), "--max-tokens", "24", "--temperature", "1.0")
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
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
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
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(stream=True, n=3), timeout=60) as r:
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


def test_an_oversized_body_is_refused(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * (2 << 20), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_conversation_over_the_context_is_a_400(tmp_path, tiny_tokenizer):
    save_long_talking_model(tmp_path, tiny_tokenizer, sequence_len=64)
    s = ChatServer(tmp_path, "--slots", "1")
    try:
        r = httpx.post(s.url + "/v1/chat/completions", json=chat("hello " * 200), timeout=30)
        assert r.status_code == 400 and "new conversation" in r.json()["error"]["message"]
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


@pytest.fixture(scope="module")
def scripted(tiny_tokenizer):
    """A real uvicorn server in this process whose worker replies with a tool call, an emoji split into bytes, and
    then either stops normally or fails (a prompt containing 'fail')."""
    import uvicorn
    from nanochat.server import create_app
    tok = tiny_tokenizer
    s = tok.encode_special
    sampled = lambda text: [("token", t, 1) for t in tok.encode(text)]  # noqa: E731
    forced = lambda ids: [("token", t, 0) for t in ids]  # noqa: E731
    reply = (sampled("Let me compute") + [("token", s("<|python_start|>"), 1)] + sampled("6*7")
             + [("token", s("<|python_end|>"), 1)]
             + forced([s("<|output_start|>")] + tok.encode("42") + [s("<|output_end|>")])
             + sampled(" so 42 🙂") + [("token", s("<|assistant_end|>"), 1)])

    def script(request):
        if "fail" in tok.decode(request.tokens):
            return reply[:3] + [("done", "error: RuntimeError: boom")]
        return reply + [("done", "stop")]

    app = create_app([ScriptedWorker(script)], tok, "scripted")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


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
    assert events[-1] == {"done": True, "finish_reason": "stop", "usage": events[-1]["usage"]}


def test_openai_content_carries_the_tool_markup(scripted):
    body = httpx.post(scripted + "/v1/chat/completions", json=chat(), timeout=30).json()
    assert body["choices"][0]["message"]["content"] == (
        "Let me compute<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> so 42 🙂")
    assert body["choices"][0]["finish_reason"] == "stop"


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
