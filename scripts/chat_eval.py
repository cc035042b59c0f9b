"""Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval and SpellingBee; print accuracies and ChatCORE.

    python -m scripts.chat_eval -i sft -a ARC-Easy,GSM8K --max-problems=200
    python -m scripts.chat_eval -i rl -a GSM8K -n 8 -t 1.0     # pass@8 with sampling

ChatCORE (nanochat/chat_eval.py) averages the five tasks ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval,
each centered by chance; SpellingBee is printed beside it.
"""

import argparse
import time

from nanochat.chat_eval import (ALL_TASKS, CHANCE, CHATCORE_TASKS, MAX_NEW_TOKENS, chat_core, planned_decode_steps,
                                require_python_tool, run_chat_eval)
from nanochat.checkpoint import load_model
from nanochat.common import UserError, compute_init, print0, run_cli
from nanochat.decode import DecodePolicy
from nanochat.engine import Engine
from nanochat.sandbox.execution import allow_unsafe_python_tool, python_tool_banner
from nanochat.report import get_report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Evaluate a chat model on multiple-choice and generative tasks.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--source", choices=["sft", "rl", "base"], default="sft", help="which checkpoints")
    p.add_argument("-a", "--task-name", default=",".join(ALL_TASKS), help="comma-separated tasks")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("-x", "--max-problems", type=int, default=None, help="problems per task (default: all)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="prompts per forward pass (categorical tasks)")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem: pass@n (generative tasks)")
    p.add_argument("-m", "--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("--device-type", default="")
    p.add_argument("--unsafe-python-tool", action="store_true",
                   help="run model-written code (GSM8K's tool calls, HumanEval's tests) without a kernel sandbox")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.task_name.split(",") if n.strip()]
    for name in names:
        if name not in ALL_TASKS:
            raise UserError(f"unknown task {name!r} in -a: choose from {', '.join(ALL_TASKS)}")
    if args.num_samples < 1:
        raise UserError(f"-n/--num-samples must be at least 1, not {args.num_samples}")
    if args.num_samples > 1 and args.temperature == 0:
        print0(f"note: -n {args.num_samples} with temperature 0 draws the same greedy completion each time; "
               "pass -t 1.0 for pass@k with sampling")
    if args.unsafe_python_tool:
        allow_unsafe_python_tool()
    compute = compute_init(args.device_type)
    print0(python_tool_banner())  # the sandbox layers in force, or why the python tool is off
    require_python_tool(names)
    if args.dry_run:
        print0(f"chat_eval dry run: {args.source} model, tasks {', '.join(names)}")
        return
    model, tokenizer, meta = load_model(args.source, compute.device, args.model_tag, args.step)
    planned = planned_decode_steps(names, args.max_problems, args.max_new_tokens, compute.dist.world_size)
    engine = Engine(model, tokenizer, dtype=compute.dtype, policy=DecodePolicy.for_device(compute.device, planned))
    accuracies = {}
    for name in names:
        t0 = time.time()
        accuracies[name] = run_chat_eval(name, model, tokenizer, engine, args.batch_size, args.max_problems,
                                         args.max_new_tokens, args.temperature, args.top_k, compute.autocast,
                                         args.num_samples)
        print0(f"{name:<14} accuracy {accuracies[name]:.4f} (chance {CHANCE.get(name, 0.0):.2f})   "
               f"({time.time() - t0:.1f} s)")
    results = dict(accuracies)
    results["chance"] = {name: CHANCE.get(name, 0.0) for name in names} | {"ChatCORE": 0.0}  # ChatCORE is centered
    present = [n for n in CHATCORE_TASKS if n in accuracies]
    if len(present) == len(CHATCORE_TASKS):
        results["ChatCORE"] = chat_core(accuracies)
        print0(f"ChatCORE: {results['ChatCORE']:.4f}")
    elif present:
        results["ChatCORE (partial)"] = chat_core(accuracies)
        print0(f"ChatCORE over {len(present)}/{len(CHATCORE_TASKS)} tasks: {results['ChatCORE (partial)']:.4f}")
    if compute.dist.is_master:
        get_report().log(f"Chat evaluation {args.source}",
                         [{"model_tag": meta.model_tag, "step": meta.step,
                           "max_problems": args.max_problems, "num_samples": args.num_samples,
                           "max_new_tokens": args.max_new_tokens, "temperature": args.temperature}, results])


if __name__ == "__main__":
    run_cli(main)
