"""Training throughput on this machine: tokens/s, MFU against the measured matmul peak, step time, peak memory.

    python -m bench.train                      # d4 and d6, seq 512, batch 16x512, fp32 and bf16, eager and compiled
    python -m bench.train --depth 4 --dtype bf16 --compile on --vocab-size 32768

Prints one JSON object per configuration on stdout (progress on stderr). Synthetic tokens: the model's speed does
not depend on the data.
"""

import argparse
import json
import resource
import sys
import time

import torch

from nanochat.checkpoint import build_model
from nanochat.common import autocast_ctx
from nanochat.flops import measure_cpu_matmul_peak
from nanochat.gpt import GPTConfig
from nanochat.scaling import model_shape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_one(depth: int, dtype: str, compiled: bool, vocab: int, seq: int, batch: int, steps: int,
              peaks: dict) -> dict:
    width, heads = model_shape(depth, head_dim=64)
    config = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=width)
    torch.manual_seed(0)
    model = build_model(vars(config), "cpu")
    optimizer = model.setup_optimizer()
    step_model = torch.compile(model, dynamic=False) if compiled else model
    x = torch.randint(0, vocab, (batch, seq))
    y = torch.randint(0, vocab, (batch, seq))

    def step():
        with autocast_ctx("cpu", DTYPES[dtype]):
            loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    step()
    step()
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_time = sorted(times)[len(times) // 2]
    tokens_per_s = batch * seq / step_time
    flops = model.estimate_flops() * tokens_per_s
    peak = peaks[dtype]
    return {"depth": depth, "width": width, "vocab_size": vocab, "seq_len": seq, "batch": batch, "dtype": dtype,
            "compiled": compiled, "tokens_per_s": round(tokens_per_s, 1), "step_time_s": round(step_time, 4),
            "mfu": round(flops / peak, 4), "mfu_vs_fp32_peak": round(flops / peaks["fp32"], 4),
            "peak_flops": round(peak / 1e9, 1), "warmup_s": round(warmup, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, nargs="+", default=[4, 6])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    peaks = {"fp32": measure_cpu_matmul_peak(torch.float32), "bf16": measure_cpu_matmul_peak(torch.bfloat16)}
    print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s",
          file=sys.stderr)
    for depth in args.depth:
        for dtype in args.dtype:
            for compiled in args.compile:
                print(f"d{depth} {dtype} compile={compiled} ...", file=sys.stderr, flush=True)
                print(json.dumps(bench_one(depth, dtype, compiled == "on", args.vocab_size, args.seq_len, args.batch,
                                           args.steps, peaks)), flush=True)


if __name__ == "__main__":
    main()
