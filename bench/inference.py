"""Inference benchmark: prefill and KV-cached decode tokens/s, continuous batching, HTTP time to first token, and
KV-cache decoding against recomputing the whole prefix.

    python -m bench.inference --depth 4 6
    python -m bench.inference --depth 4 --tokens 64 --vocab-size 8192      # a quick check
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
from nanochat.engine import Engine
from nanochat.scheduler import BatchScheduler, Request
from nanochat.gpt import GPTConfig
from nanochat.scaling import model_shape


class Vocab:
    """Just enough tokenizer for the engine and the server: special ids at the end of the vocabulary, one byte per
    ordinary token below 256."""

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

    def render_for_completion(self, conversation):
        return [self.get_bos_token_id()] + self.encode(conversation["messages"][-1]["content"])


def make(depth: int, vocab: int, seq: int):
    """A random d{depth} model (head_dim 64) that never stops on its own: its special tokens get logit 0, below about
    half of the vocabulary, so top-k sampling never picks them and every run decodes its full length."""
    width, heads = model_shape(depth, head_dim=64)
    config = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=width)
    torch.manual_seed(0)
    model = build_model(asdict(config), "cpu").eval()
    with torch.no_grad():
        for token in Vocab(vocab).special.values():
            model.lm_head.weight[token] = 0.0
    return model


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@torch.no_grad()
def prefill_rate(model, prompt: list[int], repeats: int = 3) -> float:
    """Prompt tokens/s into a KV cache, with the next-token logits of the last position, as the engine prefills."""
    engine = Engine(model, Vocab(model.config.vocab_size), use_tools=False)
    x = torch.tensor([prompt])

    def prefill():
        engine.forward_last(x, engine.new_cache(1, len(prompt)), [0])

    prefill()  # warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        prefill()
    return repeats * len(prompt) / (time.perf_counter() - t0)


def decode_rate(engine: Engine, prompt: list[int], batch: int, tokens: int) -> tuple[float, float]:
    """(decode tokens/s after the first token, total seconds including the prefill) for `batch` samples."""
    t0 = time.perf_counter()
    first, steps = None, 0
    for _ in engine.generate(prompt, num_samples=batch, max_tokens=tokens, temperature=1.0, top_k=50):
        steps += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return (steps - 1) * batch / (end - first), end - t0


@torch.no_grad()
def recompute_seconds(model, prompt: list[int], tokens: int, probes: int = 12) -> float:
    """Time to generate `tokens` tokens without a cache (a full forward pass over the whole prefix per token),
    estimated from `probes` prefix lengths spread over the run (the cost grows with the prefix)."""
    lengths = [len(prompt) + round(i * (tokens - 1) / (probes - 1)) for i in range(probes)]
    seconds = []
    for n in lengths:
        x = torch.tensor([(prompt * (n // len(prompt) + 1))[:n]])
        t0 = time.perf_counter()
        model(x, last_only=True)[0, -1].argmax()  # the fair baseline: no LM head for the other positions
        seconds.append(time.perf_counter() - t0)
    return statistics.fmean(seconds) * tokens


def continuous_batching(model, vocab, prompt, requests: int, tokens: int, slots: int, gap: float) -> dict:
    """Requests arriving every `gap` seconds with different lengths; all generated tokens / wall time."""
    scheduler = BatchScheduler(model, vocab, slots=slots, use_tools=False)
    try:
        submitted = []
        t0 = time.perf_counter()
        for i in range(requests):
            length = tokens // 2 + (i % 4) * tokens // 6
            submitted.append(scheduler.submit(Request(tokens=prompt, max_tokens=length, temperature=1.0, seed=i)))
            time.sleep(gap)
        count = sum(len(list(r.stream(timeout=1800))) for r in submitted)
        return {"tok_s": count / (time.perf_counter() - t0), "requests": requests, "slots": slots,
                "tokens": count, "arrival_gap_s": gap}
    finally:
        scheduler.shutdown()


def http_ttft(model, vocab, clients: int, prompt_chars: int, tokens: int) -> float:
    """Median seconds from sending a streaming request to its first content chunk, `clients` at once."""
    import httpx
    import uvicorn
    from nanochat.server import create_app
    scheduler = BatchScheduler(model, vocab, slots=16, use_tools=False)
    app = create_app([scheduler], vocab, "bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    firsts = []
    body = {"messages": [{"role": "user", "content": "x" * prompt_chars}], "max_tokens": tokens, "stream": True}

    def client():
        t0 = time.perf_counter()
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=600) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {") and '"content"' in line and '"content": ""' not in line:
                    firsts.append(time.perf_counter() - t0)
                    break
            for _ in lines:  # read the rest, so every request runs to its end as a real client's would
                pass

    try:
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.should_exit = True
        thread.join(10)
        scheduler.shutdown()
    return statistics.median(firsts) if firsts else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, nargs="+", default=[4, 6])
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256, help="generated tokens per sequence")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--cb-requests", type=int, default=16)
    p.add_argument("--cb-slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for depth in args.depth:
        log(f"d{depth}: building")
        model = make(depth, args.vocab_size, 2048)
        vocab = Vocab(args.vocab_size)
        engine = Engine(model, vocab, use_tools=False)
        prompt = [vocab.get_bos_token_id()] + torch.randint(0, 256, (args.prompt_len - 1,),
                                                            generator=torch.Generator().manual_seed(0)).tolist()
        result = {"depth": depth, "params": model.num_params()["total"], "vocab_size": args.vocab_size,
                  "prompt_len": args.prompt_len, "generated": args.tokens, "threads": torch.get_num_threads()}
        result["prefill_tok_s"] = round(prefill_rate(model, prompt), 1)
        engine.generate_batch(prompt, 2, max_tokens=4)  # warm up
        for batch in args.batches:
            log(f"d{depth}: decode batch {batch}")
            rate, seconds = decode_rate(engine, prompt, batch, args.tokens)
            result[f"decode_tok_s_batch{batch}"] = round(rate, 1)
            if batch == 1:
                kv_seconds = seconds
        log(f"d{depth}: recompute baseline")
        recompute = recompute_seconds(model, prompt, args.tokens)
        result["kv_cache_s"] = round(kv_seconds, 2)  # prefill + args.tokens decode steps, one sequence
        result["recompute_s_estimated"] = round(recompute, 2)
        result["kv_cache_speedup_vs_recompute"] = round(recompute / kv_seconds, 1)
        log(f"d{depth}: continuous batching")
        cb = continuous_batching(model, vocab, prompt, args.cb_requests, args.tokens, args.cb_slots, gap=0.05)
        result["continuous_batching_tok_s"] = round(cb.pop("tok_s"), 1)
        result["continuous_batching"] = cb
        for clients in (1, 16):
            log(f"d{depth}: HTTP time to first token, {clients} client(s)")
            result[f"http_ttft_s_{clients}_client{'s' if clients > 1 else ''}"] = round(
                http_ttft(model, vocab, clients, args.prompt_len - 1, min(args.tokens, 32)), 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
