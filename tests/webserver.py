"""A real `python -m scripts.chat_web` on a free loopback port, for the API and browser tests."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_long_talking_model(base_dir: Path, tokenizer, phase: str = "sft", sequence_len: int = 8192):
    """A tiny chat model (tag d2) with a long context whose special tokens (stops and tool markup) get logit 0 while
    about half of the others are above it, so top-k sampling practically never stops and never writes a tool part:
    replies are plain text until max_tokens (long enough to be stopped or disconnected from). Saved with the
    tokenizer under base_dir."""
    import torch
    from conftest import make_tiny_model, tiny_meta
    from nanochat.checkpoint import PHASE_DIRS, save_checkpoint
    from nanochat.tokenizer import SPECIAL_TOKENS
    tokenizer.save(base_dir / "tokenizer")
    model = make_tiny_model(tokenizer.get_vocab_size(), sequence_len=sequence_len)
    with torch.no_grad():
        # every special token, not only the stops: a stray <|output_start|> in the top-k made a random-seed reply
        # stream a python_output part now and then (test_ui_stream_sends_parts_and_done failed once in CI)
        for name in SPECIAL_TOKENS:
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    save_checkpoint(base_dir / PHASE_DIRS[phase] / "d2", 1, model, tiny_meta(model, phase))
    return model


class ChatServer:
    """`host=None` leaves --host to chat_web's default; `env` adds environment variables (NANOCHAT_API_KEY)."""

    def __init__(self, base_dir, *args, host: str | None = "127.0.0.1", env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(base_dir) / f"chat_web-{self.port}.log"
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", **(env or {}))
        host_args = ["--host", host] if host else []
        with open(self.log_path, "w") as log:  # a file, not a pipe nobody reads, which could fill up and block
            self.proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", *host_args,
                                          "--port", str(self.port), "--device-type", "cpu", *args], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("chat_web exited: " + self.log())
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("chat_web did not start: " + self.log())

    def log(self) -> str:
        return self.log_path.read_text()[-3000:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
