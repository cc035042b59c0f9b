"""Inference benchmark: prefill and KV-cached decode tokens/s, continuous batching, HTTP time to first token.

    python -m bench.inference --depth 4 6
Random-weight models of the given depths (speed does not depend on the weights); one JSON object per depth.
"""

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict

import torch

from nanochat.checkpoint import build_model
from nanochat.engine import BatchScheduler, Engine, Request
from nanochat.gpt import GPTConfig
from nanochat.scaling import model_shape


class Vocab:
    """Just enough tokenizer for the engine: special ids at the end of the vocabulary, bytes for the rest."""

    def __init__(self, size: int):
        from nanochat.tokenizer import SPECIAL_TOKENS
        self.special = {name: size - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.size = size

    def encode_special(self, name):
        return self.special[name]

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def encode(self, text, *args, **kwargs):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


def make(depth: int, vocab: int, seq: int):
    width, heads = model_shape(depth, head_dim=64)
    config = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=width)
    torch.manual_seed(0)
    model = build_model(asdict(config), "cpu").eval()
    with torch.no_grad():  # keep the stop tokens out of reach so every run decodes its full length
        for name in ("<|assistant_end|>", "<|bos|>", "<|python_start|>"):
            model.lm_head.weight[Vocab(vocab).special[name]] = -1.0
    return model


def decode_rate(engine, prompt, batch, tokens) -> float:
    t0 = time.perf_counter()
    n = 0
    for column, _ in engine.generate(prompt, num_samples=batch, max_tokens=tokens, temperature=1.0, top_k=50):
        n += len(column)
    return n / (time.perf_counter() - t0)


@torch.no_grad()
def naive_rate(model, prompt, tokens) -> float:
    ids = list(prompt)
    t0 = time.perf_counter()
    for _ in range(tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return tokens / (time.perf_counter() - t0)


def continuous_batching(model, vocab, prompt, requests: int, tokens: int, slots: int) -> float:
    scheduler = BatchScheduler(model, vocab, slots=slots, use_tools=False)
    t0 = time.perf_counter()
    submitted = []
    for i in range(requests):
        submitted.append(scheduler.submit(Request(tokens=prompt, max_tokens=tokens // 2 + (i % 4) * tokens // 4,
                                                  temperature=1.0, seed=i)))
        time.sleep(0.01)  # staggered arrivals
    count = sum(len(list(r.stream(timeout=600))) for r in submitted)
    scheduler.shutdown()
    return count / (time.perf_counter() - t0)


def http_ttft(model, vocab, clients: int) -> float:
    import httpx
    import uvicorn
    from nanochat.server import create_app
    scheduler = BatchScheduler(model, vocab, slots=16, use_tools=False)

    class Tok(Vocab):
        def render_for_completion(self, conversation):
            return [self.get_bos_token_id()] + list(conversation["messages"][-1]["content"].encode())[:200]
    app = create_app([scheduler], Tok(vocab.size), "bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    firsts = []

    def client():
        t0 = time.perf_counter()
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300,
                          json={"messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 32,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"content": ""' not in line:
                    firsts.append(time.perf_counter() - t0)
                    break
            for _ in r.iter_lines():
                pass
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.should_exit = True
    thread.join(10)
    scheduler.shutdown()
    return statistics.median(firsts) if firsts else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, nargs="+", default=[4, 6])
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    for depth in args.depth:
        print(f"d{depth} ...", file=sys.stderr, flush=True)
        model = make(depth, args.vocab_size, 2048)
        vocab = Vocab(args.vocab_size)
        engine = Engine(model, vocab, use_tools=False)
        prompt = [vocab.get_bos_token_id()] + torch.randint(0, 256, (args.prompt_len - 1,)).tolist()
        with torch.no_grad():
            model(torch.tensor([prompt]))
            t0 = time.perf_counter()
            for _ in range(3):
                model(torch.tensor([prompt]))
            prefill = 3 * len(prompt) / (time.perf_counter() - t0)
        result = {"depth": depth, "vocab_size": args.vocab_size, "prompt_len": args.prompt_len,
                  "generated": args.tokens, "prefill_tok_s": round(prefill, 1)}
        for batch in (1, 8, 32):
            result[f"decode_tok_s_batch{batch}"] = round(decode_rate(engine, prompt, batch, args.tokens), 1)
        naive = naive_rate(model, prompt, min(args.tokens, 64))
        result["naive_recompute_tok_s"] = round(naive, 1)
        result["kv_cache_speedup_vs_recompute"] = round(result["decode_tok_s_batch1"] / naive, 1)
        result["continuous_batching_tok_s"] = round(continuous_batching(model, vocab, prompt, 16, args.tokens, 8), 1)
        result["http_ttft_s_1_client"] = round(http_ttft(model, vocab, 1), 3)
        result["http_ttft_s_16_clients"] = round(http_ttft(model, vocab, 16), 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
