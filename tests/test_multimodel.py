"""The server's first impressions: a real `python -m scripts.chat_web` on loopback serving the base, SFT and RL
stages of one run."""

import os
import socket
import subprocess
import sys

import httpx
import pytest

from webserver import ChatServer, save_long_talking_model

CONTEXTS = {"base": 256, "sft": 128, "rl": 512}  # a different context per stage shows which model answered


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("multimodel")
    for stage, context in CONTEXTS.items():
        save_long_talking_model(folder, tiny_tokenizer, stage, sequence_len=context)
    return folder


@pytest.fixture(scope="module")
def one(base):
    """The simple default: one model (the SFT stage, 128 tokens of context), chosen the way it always was."""
    s = ChatServer(base, "-i", "sft", "--slots", "2", "--max-tokens", "8")
    yield s
    s.stop()


# ---------------------------------------------------------------------------------------------------------------------
# Routes and first impressions

@pytest.mark.parametrize("method, path, status", [
    ("POST", "/v1/embeddings", 404), ("POST", "/v1/completions", 404), ("GET", "/v1/anything/else", 404),
    ("GET", "/v1/chat/completions", 405),
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
