"""Sharded optimizer sizing from shapes alone (a meta-device model): optimizer state per rank and bytes each rank
sends per step, sharded vs. the previous replicated optimizer (every rank held the whole state; one all-reduce of all
gradients plus one broadcast per Muon matrix); the communication buffers a sharded step allocates and frees; and the
aten calls of one one-process step (counted on the meta device: host overhead grows with them).

    python -m bench.optim_shard                      # d20 on 8 ranks, the speedrun
    python -m bench.optim_shard --depth 26 --world 16

Prints one JSON object. Ring algorithms: a reduce-scatter or all-gather of N bytes sends (W−1)/W·N per rank, an
all-reduce twice that, a broadcast of N bytes (W−1)/W·N per rank on average.
"""

import argparse
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim_shard import state_bytes
from nanochat.scaling import model_shape


class AtenCalls(TorchDispatchMode):
    """Counts the aten calls made under it (on the meta device: shapes only, nothing computed)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def one_process_step_calls(model) -> int:
    """Aten calls of a one-process optimizer step after the first (which also creates the state)."""
    optimizer = model.setup_optimizer()
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    optimizer.step()
    with AtenCalls() as calls:
        optimizer.step()
    return calls.count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args()
    width, heads = model_shape(args.depth)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth,
                              n_head=heads, n_kv_head=heads, n_embd=width))
    groups = model.setup_optimizer().param_groups
    w = args.world
    whole, sharded = state_bytes(groups, 1), state_bytes(groups, w)
    params = sum(p.numel() for g in groups for p in g["params"])
    muon = [p for g in groups if g["kind"] == "muon" for p in g["params"]]
    muon_elements = sum(p.numel() for p in muon)
    ring = (w - 1) / w
    before = 4 * (2 * ring * params + ring * muon_elements)
    after = 4 * 2 * ring * sharded["padded_elements"]
    print(json.dumps({
        "depth": args.depth, "world_size": w, "parameters": params, "muon_matrices": len(muon),
        "state_bytes_per_rank_before": whole["state_bytes_per_rank"],
        "state_bytes_per_rank_after": sharded["state_bytes_per_rank"],
        "state_ratio": round(sharded["state_bytes_per_rank"] / whole["state_bytes_per_rank"], 4),
        "padded_elements": sharded["padded_elements"],
        "static_bytes_per_rank": sharded["state_bytes_per_rank"],  # nothing else persists between steps
        "step_buffer_bytes_per_rank": 4 * (w + 2) * sharded["segment_elements"],  # peak: (W, S) + 2 segments
        "aten_calls_per_step_one_process": one_process_step_calls(model),
        "sent_bytes_per_rank_per_step_before": round(before),
        "sent_bytes_per_rank_per_step_after": round(after),
        "collectives_per_step_before": 1 + len(muon), "collectives_per_step_after": 2,
        "formula_after": "2·(W−1)/W·W·S·4 bytes (reduce-scatter + all-gather of the padded fp32 buffer)",
        "formula_before": "2·(W−1)/W·P·4 (all-reduce) + (W−1)/W·M·4 (Muon broadcasts)",
    }, indent=1))


if __name__ == "__main__":
    main()
