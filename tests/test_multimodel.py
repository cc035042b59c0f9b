"""Several models behind one API, conversations longer than the context, and the server's first impressions: a real
`python -m scripts.chat_web` on loopback serving the base, SFT and RL stages of one run."""

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import httpx
import openai
import pytest

from webserver import ChatServer, save_long_talking_model

CONTEXTS = {"base": 256, "sft": 128, "rl": 512}  # a different context per stage shows which model answered
IDS = {stage: f"nanochat-d2-{stage}" for stage in CONTEXTS}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("multimodel")
    for stage, context in CONTEXTS.items():
        save_long_talking_model(folder, tiny_tokenizer, stage, sequence_len=context)
    return folder


@pytest.fixture(scope="module")
def server(base):
    s = ChatServer(base, "--model", "sft", "--model", "base:d2", "--model", "rl:d2:1", "--slots", "2",
                   "--max-tokens", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def one(base):
    """The simple default: one model (the SFT stage, 128 tokens of context), chosen the way it always was."""
    s = ChatServer(base, "-i", "sft", "--slots", "2", "--max-tokens", "8")
    yield s
    s.stop()


def chat(content="Hello there", **kwargs):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **kwargs}


def sse_events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def long_conversation(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Tell me about the river number {i} and its long banks."},
                     {"role": "assistant", "content": f"The river number {i} is long and its banks are green."}]
    return messages + [{"role": "user", "content": "And the last one?"}]


# ---------------------------------------------------------------------------------------------------------------------
# Several models

def test_models_lists_each_with_its_stage_tag_step_and_context_the_default_first(server):
    data = httpx.get(server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == [IDS["sft"], IDS["base"], IDS["rl"]]
    for m in data:
        assert m["object"] == "model" and m["tag"] == "d2" and m["step"] == 1
        assert m["context"] == CONTEXTS[m["stage"]] and m["id"] == IDS[m["stage"]]
    assert httpx.get(server.url + "/health").json()["models"] == [m["id"] for m in data]
    assert [w["model"] for w in httpx.get(server.url + "/stats").json()["workers"]] == [m["id"] for m in data]


@pytest.mark.parametrize("stage", ["base", "rl"])
def test_the_request_model_picks_the_model_that_answers(server, stage):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    reply = client.chat.completions.create(model=IDS[stage], messages=chat()["messages"], max_tokens=4)
    assert reply.model == IDS[stage]
    assert reply.model_extra["nanochat"]["context"] == CONTEXTS[stage]  # its own model's context: its own workers


def test_a_request_without_model_gets_the_default(server):
    body = httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=60).json()
    assert body["model"] == IDS["sft"] and body["nanochat"]["context"] == CONTEXTS["sft"]


def test_the_page_stream_can_name_a_model(server):
    with httpx.stream("POST", server.url + "/chat/completions", json=chat(model=IDS["rl"]), timeout=60) as r:
        events = sse_events(r)
    assert events[-1]["done"] and events[-1]["nanochat"]["model"] == IDS["rl"]
    assert events[-1]["nanochat"]["context"] == CONTEXTS["rl"]


def test_an_unknown_model_is_a_404_in_openai_shape(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=chat()["messages"])
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model" and IDS["sft"] in error["message"]
    r = httpx.post(server.url + "/chat/completions", json=chat(model="x" * 100_000), timeout=60)
    assert r.status_code == 404 and len(r.text) < 1000  # the name is not echoed whole


def test_model_ids_add_the_step_only_where_two_would_share_a_name():
    from scripts.chat_web import model_ids
    meta = lambda phase, step: SimpleNamespace(model_tag="d12", phase=phase, step=step)  # noqa: E731
    assert model_ids([meta("sft", 5), meta("base", 5)]) == ["nanochat-d12-sft", "nanochat-d12-base"]
    assert model_ids([meta("sft", 5), meta("sft", 9)]) == ["nanochat-d12-sft-5", "nanochat-d12-sft-9"]
    with pytest.raises(Exception, match="given twice"):
        model_ids([meta("sft", 5), meta("sft", 5)])


@pytest.mark.parametrize("argv, message", [
    (["--model", "chat"], "SOURCE one of base, sft, rl"),
    (["--model", "sft:d2:last"], "the step must be a number"),
    (["--model", "sft::3"], "SOURCE[:TAG[:STEP]]"),
    (["--model", "sft", "-i", "base"], "--model replaces -i"),
])
def test_bad_model_flags_get_one_line_errors(argv, message):
    from nanochat.common import UserError
    from scripts.chat_web import main
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        main(argv + ["--dry-run"])


def test_text_completions_continue_a_prompt_with_the_named_model(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    whole = client.completions.create(model=IDS["base"], prompt="The river", max_tokens=6, seed=7, temperature=1.0)
    assert whole.object == "text_completion" and whole.model == IDS["base"] and whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    streamed = client.completions.create(model=IDS["base"], prompt="The river", max_tokens=6, seed=7,
                                         temperature=1.0, stream=True)
    chunks = list(streamed)
    assert all(c.object == "text_completion" and c.model == IDS["base"] for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text != ""
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, param", [({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
                                         ({"prompt": "hi", "max_tokens": 0}, "max_tokens")])
def test_a_bad_text_completion_is_a_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


# ---------------------------------------------------------------------------------------------------------------------
# Conversations longer than the context

def test_a_conversation_longer_than_the_context_drops_its_oldest_turns_and_says_so(one):
    body = {"messages": long_conversation(12), "max_tokens": 16}  # far over the SFT model's 128 tokens
    r = httpx.post(one.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    fit = r.json()["nanochat"]
    assert fit["dropped_messages"] > 0 and fit["dropped_messages"] % 2 == 0 and fit["context"] == 128
    assert fit["prompt_tokens"] <= 128 - 16 and json.loads(r.headers["x-nanochat-context"]) == fit
    with httpx.stream("POST", one.url + "/chat/completions", json=body, timeout=60) as r:
        events = sse_events(r)
    assert events[-1]["done"] and events[-1]["nanochat"]["dropped_messages"] == fit["dropped_messages"]


def test_a_conversation_that_fits_drops_nothing(one):
    r = httpx.post(one.url + "/v1/chat/completions", json=chat(), timeout=60)
    assert r.json()["nanochat"]["dropped_messages"] == 0


def test_a_last_message_longer_than_the_context_is_a_clear_400(one):
    r = httpx.post(one.url + "/v1/chat/completions", json=chat("river banks " * 400), timeout=60)
    assert r.status_code == 400 and "shorten it" in r.json()["error"]["message"]


def test_a_reply_cut_by_the_context_finishes_with_length(one):
    body = {"messages": long_conversation(12), "max_tokens": 4096}
    reply = httpx.post(one.url + "/v1/chat/completions", json=body, timeout=120).json()
    fit = reply["nanochat"]
    assert reply["choices"][0]["finish_reason"] == "length"
    assert fit["prompt_tokens"] + reply["usage"]["completion_tokens"] == CONTEXTS["sft"]
    with httpx.stream("POST", one.url + "/chat/completions", json=body, timeout=120) as r:
        assert sse_events(r)[-1]["finish_reason"] == "length"


# ---------------------------------------------------------------------------------------------------------------------
# Routes and first impressions

@pytest.mark.parametrize("method, path, status", [
    ("POST", "/v1/embeddings", 404), ("GET", "/v1/anything/else", 404), ("GET", "/v1/chat/completions", 405),
    ("GET", "/v1/completions", 405),
])
def test_unknown_api_routes_answer_in_openai_error_shape(one, method, path, status):
    r = httpx.request(method, one.url + path, json={}, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"} and path in error["message"]


def test_the_api_docs_load_nothing_from_elsewhere(one):
    page = httpx.get(one.url + "/docs", timeout=30)
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert "<script" not in page.text and "cdn" not in page.text.lower() and "<link" not in page.text


def test_a_busy_port_fails_before_claiming_to_serve(base):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--port", str(port), "--device-type", "cpu",
                              "-i", "sft"], env={**os.environ, "NANOCHAT_BASE_DIR": str(base)},
                             capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "serving" not in run.stdout + run.stderr
    assert f"cannot listen on 127.0.0.1 port {port}" in run.stdout + run.stderr
