"""Inference benchmark: prefill and KV-cached decode tokens/s with their hardware utilisation (prefill MFU, decode
memory-bandwidth utilisation), continuous batching, HTTP time to first token, KV-cache decoding against
recomputing the whole prefix, and time to first token along a conversation with and without prefix reuse.

    python -m bench.inference --depth 4 6
    python -m bench.inference --depth 4 --tokens 64 --vocab-size 8192 --parts decode      # a quick check
    python -m bench.inference --device cuda --depth 12 --prompt-len 512 --batches 1 8 32 --parts decode
    python -m bench.inference --device cuda --source sft --model-tag d20 --parts decode     # a checkpoint
    python -m bench.inference --depth 4 --parts turns         # TTFT at turns 1, 5, 10 (~2,000 tokens of history)
Random-weight models of the given depths (speed does not depend on the weights), or a saved checkpoint; one JSON
object per model. Generation never stops early: stop tokens are ignored, so every run decodes its full length.

With CUDA graphs (the default on CUDA), a decode step timed without its graph (a failed capture) makes the run exit 1
after its JSON, which counts them (`decode_uncaptured_steps_batch*`).

Bandwidth utilisation = bytes that a decode step must read (every weight once, the embedding rows of its tokens,
each row's keys and values up to its position) / step time / the device's peak memory bandwidth (a table for known
GPUs, `--peak-bandwidth` to give it, a memcpy measurement on CPUs).
"""

import argparse
import json
import statistics
import sys
import threading
import time

import torch

from nanochat.checkpoint import build_model
from nanochat.common import autodetect_device_type, get_compute_dtype
from nanochat.decode import DecodePolicy
from nanochat.engine import Engine
from nanochat.flops import device_peak_flops
from nanochat.gpt import GPTConfig
from nanochat.scaling import model_shape
from nanochat.serving.scheduler import BatchScheduler, Request
from nanochat.tokenizer import SPECIAL_TOKENS, STOP_TOKENS, TOOL_MARKUP

GPU_PEAK_BANDWIDTH = {  # bytes/s of device memory, by a substring of torch.cuda.get_device_name(); first match wins
    "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "B200": 8.0e12, "A100-SXM4-40GB": 1.555e12,
    "A100": 2.039e12, "L40S": 0.864e12, "A10": 0.6e12, "RTX 4090": 1.008e12, "RTX 3090": 0.936e12,
}
PARTS = ("decode", "recompute", "cb", "http", "turns")
MEASURED_TURNS = (1, 5, 10)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Vocab:
    """Just enough tokenizer for the engine and the server: special ids at the end of the vocabulary, one byte per
    ordinary token below 256."""

    def __init__(self, size: int):
        self.special = {name: size - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.size = size

    def encode_special(self, name):
        return self.special[name]

    def stop_tokens(self):
        return {self.special[name] for name in STOP_TOKENS}

    def tool_markup(self):
        return {self.special[name]: part for name, part in TOOL_MARKUP.items()}

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def encode(self, text, *args, **kwargs):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")

    def render_for_completion(self, conversation):
        return [self.get_bos_token_id()] + self.encode(conversation["messages"][-1]["content"])


def make(depth: int, vocab: int, seq: int, device: str = "cpu", head_dim: int = 64):
    """A random d{depth} model; its special tokens get logit 0, below about half of the vocabulary, so that even
    without ignoring stop tokens (bench/rl.py) top-k sampling never picks them."""
    width, heads = model_shape(depth, head_dim=head_dim)
    config = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=width)
    torch.manual_seed(0)
    model = build_model(config, device).eval()
    with torch.no_grad():
        for token in Vocab(vocab).special.values():
            model.lm_head.weight[token] = 0.0
    return model


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_memcpy_bandwidth(megabytes: int = 256, repeats: int = 8) -> float:
    """Best observed bytes/s of copying a buffer much larger than the CPU's caches (read + write counted)."""
    src = torch.ones(megabytes * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - t0))
    return best


def peak_bandwidth(device: torch.device, given_gb_s: float | None) -> tuple[float, str]:
    """(bytes/s, where the figure came from) of the device's memory."""
    if given_gb_s:
        return given_gb_s * 1e9, "--peak-bandwidth"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BANDWIDTH.items():
            if key in name:
                return peak, f"table: {key}"
        return float("inf"), f"unknown GPU {name!r}: give --peak-bandwidth"
    return measure_memcpy_bandwidth(), "memcpy probe"


def decode_bytes_per_step(model, batch: int, context: int, weight_bytes: int, kv_bytes: int,
                          shared: int = 0) -> float:
    """Bytes a decode step of `batch` rows at `context` positions must read: every weight once (embedding tables:
    only their rows for the batch's tokens), and each row's keys and values up to its position (or its window).
    `shared`: positions that the rows hold in common and the step reads once (the prompt of several samples, in a
    full-context layer; attention.shared_prefix_attention)."""
    c = model.config
    tables = model.wte.weight.numel() + sum(p.numel() for p in model.value_embeds.parameters())
    rows_of_tables = batch * (c.n_embd + len(model.value_embeds) * c.n_kv_head * c.head_dim)
    total = sum(p.numel() for p in model.parameters())
    weights = (total - tables + rows_of_tables) * weight_bytes
    positions = [shared + batch * (context - shared) if w >= context else batch * w for w in model.windows]
    kv = sum(2 * c.n_kv_head * c.head_dim * n for n in positions) * kv_bytes
    return weights + kv


def reads_prompt_once(device: torch.device, policy: DecodePolicy) -> bool:
    """Whether an engine's decode steps read the prompt its samples share once: CPU steps, eager or compiled
    (CUDA's captured graphs always mask)."""
    return device.type == "cpu" and not policy.graph


def prefill_flops(model, tokens: int) -> float:
    """Matmul FLOPs of prefilling `tokens` tokens (LM head for the last position only) + causal attention."""
    c = model.config
    matrices = sum(p.numel() for p in model.blocks.parameters())
    attention = sum(4 * c.n_head * c.head_dim * sum(min(t + 1, w) for t in range(tokens)) for w in model.windows)
    return 2 * matrices * tokens + 2 * model.lm_head.weight.numel() + attention


@torch.no_grad()
def prefill_rate(engine: Engine, prompt: list[int], repeats: int = 3) -> float:
    """Prompt tokens/s into a KV cache, with the next-token logits of the last position, as the engine prefills."""
    x = torch.tensor([prompt], device=engine.device)
    cache = engine.new_cache(1, len(prompt))

    def prefill():
        cache.reset()
        engine.forward_last(x, cache, [0])

    prefill()  # warm up
    synchronize(engine.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        prefill()
    synchronize(engine.device)
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


def uncaptured_during(engine: Engine, run):
    """run()'s result and how many of its decode steps ran without their CUDA graph (a failed capture); the engine
    may replace its decoder at the start of a call, so a new decoder's count is all this run's."""
    before, count = engine.decoder, engine.decoder.uncaptured_steps if engine.decoder is not None else 0
    result = run()
    return result, engine.decoder.uncaptured_steps - (count if engine.decoder is before else 0)


@torch.no_grad()
def recompute_seconds(model, prompt: list[int], tokens: int, probes: int = 12) -> float:
    """Time to generate `tokens` tokens without a cache (a full forward pass over the whole prefix per token),
    estimated from `probes` prefix lengths spread over the run (the cost grows with the prefix)."""
    device = next(model.parameters()).device
    lengths = [len(prompt) + round(i * (tokens - 1) / (probes - 1)) for i in range(probes)]
    seconds = []
    for n in lengths:
        x = torch.tensor([(prompt * (n // len(prompt) + 1))[:n]], device=device)
        t0 = time.perf_counter()
        int(model(x, last_only=True)[0, -1].argmax())  # the fair baseline: no LM head for the other positions
        seconds.append(time.perf_counter() - t0)
    return statistics.fmean(seconds) * tokens


def continuous_batching(model, vocab, prompt, requests: int, tokens: int, slots: int, gap: float, **engine) -> dict:
    """Requests arriving every `gap` seconds with different lengths; all generated tokens / wall time."""
    scheduler = BatchScheduler(model, vocab, slots=slots, use_tools=False, **engine)
    scheduler.tools.stops = set()
    try:
        submitted = []
        t0 = time.perf_counter()
        for i in range(requests):
            length = tokens // 2 + (i % 4) * tokens // 6
            submitted.append(scheduler.submit(Request(tokens=prompt, max_tokens=length, temperature=1.0, seed=i)))
            time.sleep(gap)
        count = sum(len(list(r.stream(timeout=1800))) for r in submitted)
        return {"tok_s": count / (time.perf_counter() - t0), "requests": requests, "slots": slots,
                "tokens": count, "arrival_gap_s": gap, "uncaptured_steps": scheduler.decoder.uncaptured_steps}
    finally:
        scheduler.shutdown()


def http_ttft(model, vocab, clients: int, prompt_chars: int, tokens: int, **engine) -> float:
    """Median seconds from sending a streaming request to its first content chunk, `clients` at once."""
    import httpx
    import uvicorn
    from nanochat.serving.server import create_app
    scheduler = BatchScheduler(model, vocab, slots=16, use_tools=False, **engine)
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


def conversation_ttft(model, vocab, user_len: int, reply_len: int, slots: int, **engine) -> dict:
    """Seconds from submitting each turn of a scripted conversation to its first token, at MEASURED_TURNS, with
    prefix reuse (the scheduler's default) and without; each turn a user message of `user_len` random tokens and
    a reply of `reply_len`, so turn t holds every earlier turn. Both schedulers serve the same prompts (those of
    the run with reuse, whose replies they hold) and generate every reply to its full length."""
    special = vocab.encode_special
    words = torch.randint(0, 256, (MEASURED_TURNS[-1], user_len), generator=torch.Generator().manual_seed(1))
    timings, prompts = {}, []
    for reuse in (True, False):
        scheduler = BatchScheduler(model, vocab, slots=slots, use_tools=False, prefix_cache=0.5 if reuse else 0,
                                   **engine)
        scheduler.tools.stops = set()
        try:
            needed = 1 + MEASURED_TURNS[-1] * (user_len + reply_len + 4)
            if needed > scheduler.max_seq_len:
                raise SystemExit(f"the scripted conversation needs {needed} positions, over the model's context of "
                                 f"{scheduler.max_seq_len}: lower --turn-len / --turn-reply")
            # two requests that share no block with the conversation first: the first prefills and steps of a
            # process and the prefix cache's first miss and store are not counted in turn 1
            for _ in range(2):
                warm = [vocab.get_bos_token_id()] + torch.randint(0, 256, (user_len + 3,)).tolist()
                list(scheduler.submit(Request(tokens=warm, max_tokens=2)).stream(timeout=1800))
            before = scheduler.status()["prefix_cache"]
            history, seconds = [vocab.get_bos_token_id()], {}
            for turn in range(1, MEASURED_TURNS[-1] + 1):
                if reuse:
                    prompt = (history + [special("<|user_start|>")] + words[turn - 1].tolist()
                              + [special("<|user_end|>"), special("<|assistant_start|>")])
                    prompts.append(prompt)
                else:
                    prompt = prompts[turn - 1]
                t0 = time.perf_counter()
                request = scheduler.submit(Request(tokens=prompt, max_tokens=reply_len, temperature=1.0, seed=turn))
                stream = request.stream(timeout=1800)
                reply = [next(stream)[0]]
                seconds[turn] = time.perf_counter() - t0
                reply += [token for token, _ in stream]
                history = prompt + reply + [special("<|assistant_end|>")]
            timings[reuse] = seconds
            if reuse:
                after = scheduler.status()["prefix_cache"]
                reused = after["reused_tokens"] - before["reused_tokens"]
                hit_rate = reused / (after["prompt_tokens"] - before["prompt_tokens"])
        finally:
            scheduler.shutdown()
    result = {"history_tokens": {f"turn{t}": len(prompts[t - 1]) for t in MEASURED_TURNS}}
    for reuse, name in ((True, "reuse"), (False, "no_reuse")):
        result[f"ttft_s_{name}"] = {f"turn{t}": round(timings[reuse][t], 4) for t in MEASURED_TURNS}
    last = f"turn{MEASURED_TURNS[-1]}"
    result[f"{last}_over_turn1_reuse"] = round(result["ttft_s_reuse"][last] / result["ttft_s_reuse"]["turn1"], 2)
    result[f"{last}_over_turn1_no_reuse"] = round(result["ttft_s_no_reuse"][last]
                                                  / result["ttft_s_no_reuse"]["turn1"], 2)
    result["prefix_hit_rate"] = round(hit_rate, 4)  # prompt tokens copied from the prefix cache / all prompt tokens
    return result


def load(args, device: torch.device):
    """(name, model, tokenizer) for each model to measure: random weights per --depth, or one checkpoint."""
    if args.source:
        from nanochat.checkpoint import load_model
        model, tokenizer, meta = load_model(args.source, device, args.model_tag, args.step)
        yield f"{args.source}/{meta.model_tag}", model, tokenizer
        return
    for depth in args.depth:
        log(f"d{depth}: building")
        yield f"d{depth}", make(depth, args.vocab_size, 2048, str(device), args.head_dim), Vocab(args.vocab_size)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="", help="cpu | cuda (default: autodetect)")
    p.add_argument("--depth", type=int, nargs="+", default=[4, 6], help="random-weight models of these depths")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--source", default="", choices=["", "base", "sft", "rl"], help="measure a checkpoint instead")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256, help="generated tokens per sequence")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--cb-requests", type=int, default=16)
    p.add_argument("--cb-slots", type=int, default=8, help="slots of the continuous-batching and turns parts")
    p.add_argument("--turn-len", type=int, default=160, help="user tokens per turn of the scripted conversation")
    p.add_argument("--turn-reply", type=int, default=40, help="reply tokens per turn of the scripted conversation")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="inference weights and KV cache")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile the decode step")
    p.add_argument("--graph", default="auto", choices=["auto", "on", "off"], help="CUDA-graph decode steps")
    p.add_argument("--peak-bandwidth", type=float, default=None, help="device memory GB/s (default: table/probe)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or autodetect_device_type())
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else get_compute_dtype(device.type)
    auto = DecodePolicy.for_device(device)
    policy = DecodePolicy(compile=auto.compile if args.compile == "auto" else args.compile == "on",
                          graph=auto.graph if args.graph == "auto" else args.graph == "on")
    bandwidth, bandwidth_source = peak_bandwidth(device, args.peak_bandwidth)
    for name, model, tokenizer in load(args, device):
        engine = Engine(model, tokenizer, use_tools=False, dtype=dtype, policy=policy)
        engine.tools.stops = set()  # decode every run to its full length
        bytes_per = engine.model.wte.weight.element_size()
        prompt = [tokenizer.get_bos_token_id()] + torch.randint(0, 256, (args.prompt_len - 1,),
                                                                generator=torch.Generator().manual_seed(0)).tolist()
        result = {"model": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "params": model.num_params()["total"], "vocab_size": model.config.vocab_size,
                  "prompt_len": args.prompt_len, "generated": args.tokens, "dtype": str(dtype).removeprefix("torch."),
                  "compiled": policy.compile, "cuda_graphs": policy.graph, "threads": torch.get_num_threads(),
                  "peak_bandwidth_gb_s": round(bandwidth / 1e9, 1), "peak_bandwidth_from": bandwidth_source}
        rate = prefill_rate(engine, prompt)
        result["prefill_tok_s"] = round(rate, 1)
        result["prefill_mfu"] = round(prefill_flops(engine.model, len(prompt)) * rate / len(prompt)
                                      / device_peak_flops(device.type, dtype), 4)
        kv_seconds = None
        if "decode" in args.parts:
            for batch in args.batches:
                log(f"{name}: decode batch {batch}")
                engine.generate_batch(prompt, batch, max_tokens=8, temperature=1.0, top_k=50)  # warm up this bucket
                (rate, seconds), uncaptured = uncaptured_during(
                    engine, lambda: decode_rate(engine, prompt, batch, args.tokens))
                if policy.graph:
                    result[f"decode_uncaptured_steps_batch{batch}"] = uncaptured
                step_s = batch / rate
                shared = args.prompt_len if reads_prompt_once(device, policy) else 0
                needed = decode_bytes_per_step(engine.model, batch, args.prompt_len + args.tokens // 2, bytes_per,
                                               bytes_per, shared)
                result[f"decode_tok_s_batch{batch}"] = round(rate, 1)
                result[f"decode_step_ms_batch{batch}"] = round(step_s * 1e3, 3)
                result[f"decode_bandwidth_util_batch{batch}"] = round(needed / step_s / bandwidth, 4)
                if batch == 1:
                    kv_seconds = seconds
        if "recompute" in args.parts and kv_seconds is not None:
            log(f"{name}: recompute baseline")
            recompute = recompute_seconds(engine.model, prompt, args.tokens)
            result["kv_cache_s"] = round(kv_seconds, 2)  # prefill + args.tokens decode steps, one sequence
            result["recompute_s_estimated"] = round(recompute, 2)
            result["kv_cache_speedup_vs_recompute"] = round(recompute / kv_seconds, 1)
        if "cb" in args.parts:
            log(f"{name}: continuous batching")
            cb = continuous_batching(model, tokenizer, prompt, args.cb_requests, args.tokens, args.cb_slots,
                                     gap=0.05, dtype=dtype, policy=policy)
            result["continuous_batching_tok_s"] = round(cb.pop("tok_s"), 1)
            if not policy.graph:
                cb.pop("uncaptured_steps")
            result["continuous_batching"] = cb
        if "http" in args.parts:
            for clients in (1, 16):
                log(f"{name}: HTTP time to first token, {clients} client(s)")
                result[f"http_ttft_s_{clients}_client{'s' if clients > 1 else ''}"] = round(
                    http_ttft(model, tokenizer, clients, args.prompt_len - 1, min(args.tokens, 32), dtype=dtype,
                              policy=policy), 3)
        if "turns" in args.parts:
            log(f"{name}: time to first token along a conversation, with and without prefix reuse")
            result["conversation"] = conversation_ttft(model, tokenizer, args.turn_len, args.turn_reply, args.cb_slots,
                                                       dtype=dtype, policy=policy)
        print(json.dumps(result), flush=True)
        uncaptured = sum(v for k, v in result.items() if k.startswith("decode_uncaptured_steps")) + \
            result.get("continuous_batching", {}).get("uncaptured_steps", 0)
        if uncaptured:  # the figures above are of uncaptured steps, not of what a working capture gives
            why = "; ".join(sorted(set(engine.decoder.capture_failures.values()))) if engine.decoder else ""
            print(f"error: {uncaptured} timed decode steps of {name} ran without their CUDA graph (capture failed: "
                  f"{why[:300] or 'see the warnings above'}); these decode figures are not those of captured steps",
                  file=sys.stderr, flush=True)
            sys.exit(1)


if __name__ == "__main__":
    main()
