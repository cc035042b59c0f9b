"""RL benchmark on a d4 model: rollout tokens/s (prefill once, sample many vs a prefill per sample) and
optimisation tokens/s of the policy-gradient update.

    python -m bench.rl --samples 16 --tokens 128
"""

import argparse
import json
import time

import torch

from bench.inference import Vocab, make
from nanochat.engine import Engine
from nanochat.grpo import group_advantages, policy_gradient_loss, rollout_batch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args(argv)
    model = make(args.depth, args.vocab_size, 2048)
    vocab = Vocab(args.vocab_size)
    engine = Engine(model, vocab, use_tools=False)
    prompt = [vocab.get_bos_token_id()] + torch.randint(0, 256, (args.prompt_len - 1,)).tolist()
    engine.generate_batch(prompt, 2, max_tokens=4)  # warm up

    t0 = time.perf_counter()
    sequences, masks = engine.generate_batch(prompt, args.samples, max_tokens=args.tokens, temperature=1.0, top_k=50)
    shared = time.perf_counter() - t0
    sampled = sum(len(s) - len(prompt) for s in sequences)

    t0 = time.perf_counter()
    for i in range(args.samples):
        engine.generate_batch(prompt, 1, max_tokens=args.tokens, temperature=1.0, top_k=50, seed=i)
    naive = time.perf_counter() - t0

    model.train()
    optimizer = model.setup_optimizer()
    inputs, targets = rollout_batch(sequences, masks, vocab.get_bos_token_id())
    advantages = group_advantages(torch.rand(args.samples).round())
    t0 = time.perf_counter()
    steps = 3
    for _ in range(steps):
        loss = policy_gradient_loss(model(inputs), targets, advantages, int((targets >= 0).sum()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    optimise = (time.perf_counter() - t0) / steps
    print(json.dumps({"depth": args.depth, "vocab_size": args.vocab_size, "prompt_len": args.prompt_len,
                      "samples": args.samples, "new_tokens": args.tokens,
                      "rollout_tok_s_prefill_once": round(sampled / shared, 1),
                      "rollout_tok_s_naive_prefill_each": round(args.samples * args.tokens / naive, 1),
                      "rollout_speedup": round(naive / shared, 2),
                      "optimisation_tok_s": round(inputs.numel() / optimise, 1)}))


if __name__ == "__main__":
    main()
