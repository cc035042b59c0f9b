"""Training throughput on this machine: tokens/s, MFU, the step split into forward+backward and optimizer, peak
memory; and a memory proxy any machine can run: bytes saved for backward per token per layer.

    python -m bench.train                      # d4 and d6, seq 512, batch 16x512, fp32 and bf16, eager and compiled
    python -m bench.train --depth 4 --dtype bf16 --compile on --window-pattern SSSL
    python -m bench.train --device cuda --depth 12 --seq-len 2048 --batch 32 --dtype bf16 --compile on
    python -m bench.train --saved-bytes --depth 4   # the proxy only, eager, fp32 and bf16 policies

Prints one JSON object per configuration on stdout (progress on stderr). Synthetic tokens: the model's speed does
not depend on the data. The dtype is a policy as the scripts apply it: autocast to bf16 (the model then computes in
bf16 from embedding to logits) or none (fp32).

Peak memory is torch.cuda.max_memory_allocated on CUDA; on CPU it is the process's peak RSS so far, which only grows
across the configurations of one invocation (run one configuration per process to compare them).
"""

import argparse
import json
import resource
import sys
import time

import torch
from torch.autograd.graph import saved_tensors_hooks

from nanochat.checkpoint import build_model
from nanochat.common import autocast_ctx, synchronize
from nanochat.flops import device_peak_flops, measure_cpu_matmul_peak
from nanochat.gpt import GPTConfig
from nanochat.scaling import model_shape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_model(depth: int, vocab: int, seq: int, window_pattern: str, device: str):
    width, heads = model_shape(depth, head_dim=64)
    config = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=width,
                       window_pattern=window_pattern)
    torch.manual_seed(0)
    return build_model(config, device)


def saved_bytes(depth: int, dtype: str, vocab: int, seq: int, batch: int, window_pattern: str, device: str) -> dict:
    """Bytes autograd keeps for backward in one eager forward. Activations are counted per token per layer (saved
    while a block runs) and per token overall; each storage once. Parameters are not counted; copies of them cast
    to the compute dtype (a parameter's shape) are counted apart, per layer, since they do not grow with tokens."""
    model = make_model(depth, vocab, seq, window_pattern, device)
    x = torch.randint(0, vocab, (batch, seq), device=device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_shapes = {tuple(p.shape) for p in model.parameters()}
    storages: dict[int, tuple[int, bool, bool]] = {}  # storage pointer -> (bytes, inside a block, weight cast)
    inside = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in storages:
            storages[ptr] = (t.untyped_storage().nbytes(), inside[0], tuple(t.shape) in param_shapes)
        return t

    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: inside.__setitem__(0, True))
        block.register_forward_hook(lambda m, args, out: inside.__setitem__(0, False))
    with saved_tensors_hooks(pack, lambda t: t), autocast_ctx(device, DTYPES[dtype]):
        loss = model(x, x)
    del loss
    tokens = batch * seq
    activations = [(n, inb) for n, inb, cast in storages.values() if not cast]
    casts = sum(n for n, inb, cast in storages.values() if cast and inb)
    return {"proxy": "saved_for_backward", "depth": depth, "width": model.config.n_embd, "seq_len": seq,
            "batch": batch, "dtype": dtype, "window_pattern": window_pattern,
            "bytes_per_token_per_layer": round(sum(n for n, inb in activations if inb) / tokens / depth, 1),
            "bytes_per_token_total": round(sum(n for n, _ in activations) / tokens, 1),
            "weight_cast_bytes_per_layer": round(casts / depth)}


def bench_one(depth: int, dtype: str, compiled: bool, vocab: int, seq: int, batch: int, steps: int,
              window_pattern: str, device: str, peaks: dict) -> dict:
    model = make_model(depth, vocab, seq, window_pattern, device)
    optimizer = model.setup_optimizer()
    step_model = torch.compile(model, dynamic=False) if compiled else model
    x = torch.randint(0, vocab, (batch, seq), device=device)
    y = torch.randint(0, vocab, (batch, seq), device=device)

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        with autocast_ctx(device, DTYPES[dtype]):
            loss = step_model(x, y)
        loss.backward()
        synchronize(device)
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return t1 - t0, time.perf_counter() - t1

    t0 = time.perf_counter()
    step()
    step()
    warmup = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    splits = sorted((step() for _ in range(steps)), key=sum)
    fwd_bwd, opt = splits[len(splits) // 2]
    step_time = fwd_bwd + opt
    tokens_per_s = batch * seq / step_time
    flops = model.estimate_flops() * tokens_per_s
    peak = peaks[dtype]
    memory = (torch.cuda.max_memory_allocated() if device == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"device": device, "depth": depth, "width": model.config.n_embd, "vocab_size": vocab, "seq_len": seq,
            "batch": batch, "window_pattern": window_pattern, "dtype": dtype, "compiled": compiled,
            "tokens_per_s": round(tokens_per_s, 1), "step_time_s": round(step_time, 4),
            "fwd_bwd_s": round(fwd_bwd, 4), "optimizer_s": round(opt, 4),
            "mfu": round(flops / peak, 4), "mfu_vs_fp32_peak": round(flops / peaks["fp32"], 4),
            "peak_flops": round(peak / 1e9, 1), "warmup_s": round(warmup, 1),
            "peak_memory_mb": round(memory / 2 ** 20, 1),
            "peak_memory_kind": "cuda_max_memory_allocated" if device == "cuda" else "process_peak_rss",
            "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, nargs="+", default=[4, 6])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--window-pattern", nargs="+", default=["L"])
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--saved-bytes", action="store_true", help="only the saved-for-backward proxy (eager)")
    args = p.parse_args(argv)
    if args.saved_bytes:
        for depth in args.depth:
            for pattern in args.window_pattern:
                for dtype in args.dtype:
                    print(json.dumps(saved_bytes(depth, dtype, args.vocab_size, args.seq_len, args.batch, pattern,
                                                 args.device)), flush=True)
        return
    if args.device == "cuda":
        peaks = {name: device_peak_flops("cuda", dtype) for name, dtype in DTYPES.items()}
    else:
        peaks = {name: measure_cpu_matmul_peak(dtype) for name, dtype in DTYPES.items()}
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s",
          file=sys.stderr)
    for depth in args.depth:
        for pattern in args.window_pattern:
            for dtype in args.dtype:
                for compiled in args.compile:
                    print(f"d{depth} {pattern} {dtype} compile={compiled} ...", file=sys.stderr, flush=True)
                    print(json.dumps(bench_one(depth, dtype, compiled == "on", args.vocab_size, args.seq_len,
                                               args.batch, args.steps, pattern, args.device, peaks)), flush=True)


if __name__ == "__main__":
    main()
