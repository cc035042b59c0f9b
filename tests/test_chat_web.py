"""The web API through a real uvicorn server on 127.0.0.1: OpenAI-compatible, validated, concurrent, cancellable."""

import json
import threading
import time

import httpx
import pytest

from webserver import ChatServer


@pytest.fixture
def server(tiny_checkpoint, base_dir):
    s = ChatServer(base_dir, "--slots", "4", "--max-tokens", "24")
    yield s
    s.stop()


def chat(**kwargs):
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
    body.update(kwargs)
    return body


def sse_events(response):
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:])
    return events


def test_health_models_and_the_page(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"].startswith("nanochat")
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<title>nanochat</title>" in page.text and "cdn" not in page.text.lower()


def test_openai_non_streaming_completion_with_usage(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(n=2, temperature=0.5), timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and len(body["choices"]) == 2
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_streaming_chunks_end_with_done(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(stream=True), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_ui_stream_sends_parts_and_done(server):
    with httpx.stream("POST", server.url + "/chat/completions", json=chat(), timeout=60) as r:
        events = [json.loads(e) for e in sse_events(r)]
    assert events[-1]["done"] is True
    assert all("part" in e for e in events[:-1])


@pytest.mark.parametrize("body, fragment", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "8000"),
    ({"messages": [{"role": "user", "content": "x" * 7000}] * 5}, "32000"),
    ({"messages": [{"role": "user", "content": "hi"}] * 501}, "too many"),
    (chat(temperature=3), "temperature"),
    (chat(top_k=500), "top_k"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens="lots"), "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "last message"),
])
def test_invalid_requests_get_clear_400s(server, body, fragment):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert fragment in r.json()["error"]["message"]


def test_malformed_json_is_a_400(server):
    r = httpx.post(server.url + "/chat/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]


def test_a_client_disconnect_cancels_its_generation_and_frees_the_slot(server):
    body = chat(max_tokens=4000, temperature=1.0)
    body["messages"][0]["content"] = "Tell me a very long story"
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as r:
        for _ in r.iter_lines():
            break  # read one event, then hang up
    deadline = time.time() + 30
    while time.time() < deadline:
        worker = httpx.get(server.url + "/stats").json()["workers"][0]
        if worker["cancelled"] >= 1 and worker["active"] == 0:
            break
        time.sleep(0.2)
    assert worker["cancelled"] >= 1 and worker["active"] == 0 and worker["free_slots"] == worker["slots"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_sixteen_concurrent_streaming_clients_all_complete(server):
    results = [None] * 16

    def client(i):
        with httpx.stream("POST", server.url + "/v1/chat/completions",
                          json=chat(stream=True, max_tokens=12, seed=i), timeout=120) as r:
            results[i] = sse_events(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(r is not None and r[-1] == "[DONE]" for r in results)
    stats = httpx.get(server.url + "/stats").json()["workers"][0]
    assert stats["completed"] >= 16 and stats["errors"] == 0
