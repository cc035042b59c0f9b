"""What the server's operator sees, through a real `python -m scripts.chat_web` on 127.0.0.1: Prometheus metrics at
/metrics, one JSON access-log line per request, and a SIGTERM that drains the streams in flight and exits 0."""

import json
import signal
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from webserver import ChatServer, save_long_talking_model

PROMPT = "Tell me about the weather in the mountains this week, and what I should pack for a three day hike there"


def chat(content=PROMPT, **kwargs):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 1.0, **kwargs}


def scrape(url: str, **kwargs) -> dict:
    """{(sample name, sorted labels): value} of one /metrics scrape."""
    r = httpx.get(url + "/metrics", **kwargs)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def sse_data(response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    base = tmp_path_factory.mktemp("ops")
    save_long_talking_model(base, tiny_tokenizer)
    s = ChatServer(base, "--slots", "4")
    yield s
    s.stop()


def test_metrics_move_with_requests(server):
    before = scrape(server.url)
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(n=2), timeout=60)
    assert r.status_code == 200
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    with httpx.stream("POST", server.url + "/chat/completions", json=chat(), timeout=60) as r:
        assert json.loads(sse_data(r)[-1])["finish_reason"] == "length"
    after = scrape(server.url)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert moved("nanochat_requests_total", outcome="length") == 3  # three choices, each cut at max_tokens
    assert moved("nanochat_generated_tokens_total") == 24
    assert moved("nanochat_prompt_tokens_total") == 3 * prompt_tokens
    assert moved("nanochat_time_to_first_token_seconds_count") == 3
    assert moved("nanochat_time_to_first_token_seconds_sum") > 0
    assert moved("nanochat_time_per_output_token_seconds_count") == 3 * 7  # between consecutive tokens
    assert moved("nanochat_http_responses_total", method="POST", path="/v1/chat/completions", status="200") == 1
    worker = {"worker": "0"}
    assert after[("nanochat_queue_depth", tuple(worker.items()))] == 0
    assert after[("nanochat_batch_occupancy", tuple(worker.items()))] == 0  # all done
    # the second choice and the UI request start with the same prompt: their keys and values were reused
    assert after[("nanochat_prefix_cache_hit_rate", tuple(worker.items()))] > 0
    assert moved("nanochat_prefix_cache_reused_tokens_total", **worker) > 0
    assert 0 < after[("nanochat_prefix_cache_used_bytes", tuple(worker.items()))] <= \
        after[("nanochat_prefix_cache_capacity_bytes", tuple(worker.items()))]


def test_batch_occupancy_and_cancellations_show_a_stream_in_flight(server):
    before = scrape(server.url)
    worker = (("worker", "0"),)
    with httpx.stream("POST", server.url + "/chat/completions", json=chat(max_tokens=4096), timeout=60) as r:
        lines = r.iter_lines()  # kept: a closed iterator would close the connection
        next(line for line in lines if line.startswith("data: "))  # generating now
        during = scrape(server.url)
    assert during[("nanochat_active_sequences", worker)] == 1
    assert during[("nanochat_batch_occupancy", worker)] == 0.25  # one of the module server's 4 slots
    for _ in range(100):  # the hang-up cancels it as soon as the server notices
        after = scrape(server.url)
        if after.get(("nanochat_requests_total", (("outcome", "cancelled"),)), 0) > \
                before.get(("nanochat_requests_total", (("outcome", "cancelled"),)), 0):
            break
        time.sleep(0.1)
    assert after[("nanochat_requests_total", (("outcome", "cancelled"),))] == \
        before.get(("nanochat_requests_total", (("outcome", "cancelled"),)), 0) + 1


def test_refused_requests_are_counted_by_status(server):
    before = scrape(server.url)
    assert httpx.post(server.url + "/v1/chat/completions", json={"messages": []}).status_code == 400
    after = scrape(server.url)
    key = ("nanochat_http_responses_total",
           tuple(sorted({"method": "POST", "path": "/v1/chat/completions", "status": "400"}.items())))
    assert after[key] - before.get(key, 0.0) == 1


def test_one_access_log_line_per_request_without_the_prompt(server):
    secret = "zebra-umbrella-quartz"
    httpx.post(server.url + "/v1/chat/completions", json=chat(f"{PROMPT} {secret}"), timeout=60)
    httpx.get(server.url + "/health")
    log = server.log_path.read_text()
    assert secret not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    chat_line = [x for x in lines if x["path"] == "/v1/chat/completions" and x["status"] == 200][-1]
    assert chat_line["method"] == "POST" and chat_line["client"] == "127.0.0.1"
    assert chat_line["prompt_tokens"] > 0 and chat_line["generated_tokens"] == 8 and chat_line["duration_s"] > 0
    health = [x for x in lines if x["path"] == "/health"][-1]
    assert health["status"] == 200 and "prompt_tokens" not in health


# ---------------------------------------------------------------------------------------------------------------------
# In this process, with a scripted worker: the key, tool calls by outcome, one registry per app

class ScriptedWorker:
    """Stands in for a BatchScheduler: plays `events` into every request from its own thread."""

    def __init__(self, events: list[tuple]):
        self.events = events

    def status(self):
        return {"active": 0, "waiting": 0}

    def submit(self, request):
        def play():
            for event in self.events:
                request.events.put(event)
        threading.Thread(target=play, daemon=True).start()
        return request


def scripted_app(tokenizer, outputs: list[str] = (), **kwargs):
    """An app whose worker replies with one tool call per entry of `outputs` (the output the tool gave), then stops."""
    from nanochat.serving.server import create_app
    special = tokenizer.encode_special
    events = [("token", t, 1) for t in tokenizer.encode("Sure")]
    for output in outputs:
        events += [("token", t, 1) for t in [special("<|python_start|>"), *tokenizer.encode("1+1"),
                                             special("<|python_end|>")]]
        events += [("token", t, 0) for t in [special("<|output_start|>"), *tokenizer.encode(output),
                                             special("<|output_end|>")]]
    events += [("token", special("<|assistant_end|>"), 1), ("done", "stop")]
    return create_app([ScriptedWorker(events)], tokenizer, "scripted", **kwargs)


def client_scrape(client, **kwargs) -> dict:
    r = client.get("/metrics", **kwargs)
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_tool_calls_are_counted_by_outcome(tiny_tokenizer):
    from starlette.testclient import TestClient
    app = scripted_app(tiny_tokenizer, ["2", "Error: timed out after 3 s", "Error: NameError: name 'x' is not defined",
                                        "Error: the python tool is off: no kernel sandbox"])
    with TestClient(app, base_url="http://localhost") as client:
        assert client.post("/v1/chat/completions", json=chat()).status_code == 200
        metrics = client_scrape(client)
    for outcome in ("ok", "timeout", "error", "refused"):
        assert metrics[("nanochat_tool_calls_total", (("outcome", outcome),))] == 1
    assert metrics[("nanochat_requests_total", (("outcome", "stop"),))] == 1


def test_metrics_need_the_key_when_one_is_set(tiny_tokenizer):
    from starlette.testclient import TestClient
    with TestClient(scripted_app(tiny_tokenizer, api_key="k3y"), base_url="http://localhost") as client:
        assert client.get("/metrics").status_code == 401
        assert ("nanochat_queue_depth", (("worker", "0"),)) in client_scrape(
            client, headers={"Authorization": "Bearer k3y"})


def test_each_app_counts_its_own_requests(tiny_tokenizer):
    from starlette.testclient import TestClient
    with TestClient(scripted_app(tiny_tokenizer), base_url="http://localhost") as busy, \
            TestClient(scripted_app(tiny_tokenizer), base_url="http://localhost") as idle:
        busy.post("/v1/chat/completions", json=chat())
        assert client_scrape(busy)[("nanochat_requests_total", (("outcome", "stop"),))] == 1
        assert ("nanochat_requests_total", (("outcome", "stop"),)) not in client_scrape(idle)


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM

def test_sigterm_ends_a_stream_cleanly_refuses_new_requests_and_exits_0(tmp_path, tiny_tokenizer):
    """A stream still running when the drain timeout runs out gets an error and its final chunk and [DONE]; while
    draining, a new request gets a 503; the process exits 0."""
    save_long_talking_model(tmp_path, tiny_tokenizer)
    s = ChatServer(tmp_path, "--slots", "2", "--drain-timeout", "1")
    try:
        body = chat(max_tokens=4096, stream=True)  # far longer than the drain: it has to be ended
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            events = []
            for line in lines:  # a few tokens in, the server is told to stop
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 3:
                    break
            s.proc.send_signal(signal.SIGTERM)
            refused = None
            for _ in range(50):  # the drain begins as soon as the signal is handled
                refused = httpx.post(s.url + "/v1/chat/completions", json=chat(), timeout=10)
                if refused.status_code == 503:
                    break
            events += [line[6:] for line in lines if line.startswith("data: ")]
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])
        assert final["choices"][0]["finish_reason"] == "stop"  # what OpenAI's shape has for an ended choice
        assert any("shutting down" in e for e in events[:-1])
        assert s.proc.wait(30) == 0, s.log()
    finally:
        s.stop()


def test_sigterm_lets_a_stream_in_flight_finish(tmp_path, tiny_tokenizer):
    save_long_talking_model(tmp_path, tiny_tokenizer)
    s = ChatServer(tmp_path, "--slots", "1", "--drain-timeout", "60")
    try:
        with httpx.stream("POST", s.url + "/chat/completions", json=chat(max_tokens=600), timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            s.proc.send_signal(signal.SIGTERM)
            events = [first[6:]] + [line[6:] for line in lines if line.startswith("data: ")]
        final = json.loads(events[-1])
        assert final["done"] is True and final["finish_reason"] == "length"
        assert final["usage"]["completion_tokens"] == 600
        assert s.proc.wait(30) == 0, s.log()
        assert "SIGTERM: draining 1 request(s)" in s.log()
    finally:
        s.stop()


def test_a_negative_drain_timeout_is_refused_in_one_line():
    from nanochat.common import UserError
    from scripts.chat_web import main
    with pytest.raises(UserError, match="--drain-timeout"):
        main(["--drain-timeout", "-1", "--dry-run"])
