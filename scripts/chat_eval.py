"""Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval and SpellingBee; print accuracies and ChatCORE.

    python -m scripts.chat_eval -i sft -a ARC-Easy,GSM8K --max-problems=200
"""

import argparse
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint import load_model
from nanochat.common import UserError, compute_init, print0, run_cli
from nanochat.engine import Engine
from nanochat.execution import python_tool_banner

ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25}  # generative tasks: 0


def make_task(name: str):
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.mmlu import MMLU
    from tasks.spelling import SpellingBee
    makers = {"ARC-Easy": lambda: ARC("ARC-Easy", "test"), "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
              "MMLU": lambda: MMLU("all", "test"), "GSM8K": lambda: GSM8K("main", "test"),
              "HumanEval": HumanEval, "SpellingBee": lambda: SpellingBee(size=256, split="test")}
    if name not in makers:
        raise UserError(f"unknown task {name!r}: choose from {', '.join(ALL_TASKS)}")
    return makers[name]()


@torch.no_grad()
def run_categorical(task, model, tokenizer, indices: list[int], batch_size: int, autocast) -> list[bool]:
    """Answer = the letter whose token has the highest logit after the prompt (other tokens are ignored)."""
    device = next(model.parameters()).device
    results = []
    for b in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[b:b + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        T = max(len(p) for p in prompts)
        x = torch.full((len(prompts), T), tokenizer.get_bos_token_id(), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            x[i, :len(p)] = torch.tensor(p, device=device)
        with autocast():
            logits = model(x)
        for i, (conv, p) in enumerate(zip(convs, prompts)):
            letter_ids = [tokenizer.encode(letter)[0] for letter in conv["letters"]]
            scores = logits[i, len(p) - 1, letter_ids]
            results.append(task.evaluate(conv, conv["letters"][int(scores.argmax())]))
    return results


def run_generative(task, engine: Engine, tokenizer, indices: list[int], max_new_tokens: int, temperature: float,
                   top_k: int | None) -> list[bool]:
    results = []
    for i in indices:
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        outputs, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=i)
        completion = tokenizer.decode([t for t in outputs[0][len(prompt):] if t not in engine.tools.stops])
        results.append(bool(task.evaluate(conv, completion)))
    return results


def run_chat_eval(task_name: str, model, tokenizer, engine: Engine | None = None, batch_size: int = 8,
                  max_problems: int | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                  top_k: int | None = 50, autocast=None) -> float:
    """Accuracy of the model on a task (problems split over ranks, counts all-reduced)."""
    from contextlib import nullcontext
    autocast = autocast or nullcontext
    task = make_task(task_name)
    n = len(task) if max_problems is None else min(max_problems, len(task))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, n, world))
    if task.eval_type == "categorical":
        results = run_categorical(task, model, tokenizer, mine, batch_size, autocast)
    else:
        engine = engine or Engine(model, tokenizer, autocast)
        results = run_generative(task, engine, tokenizer, mine, max_new_tokens, temperature, top_k)
    device = next(model.parameters()).device
    counts = torch.tensor([sum(results), len(results)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    return (counts[0] / counts[1].clamp(min=1)).item()


def chat_core(accuracies: dict[str, float]) -> float:
    """Mean over tasks of accuracy centered against chance (0.25 for 4-choice tasks, 0 for generative ones)."""
    centered = [(acc - BASELINES.get(name, 0.0)) / (1 - BASELINES.get(name, 0.0)) for name, acc in accuracies.items()]
    return sum(centered) / max(1, len(centered))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Evaluate a chat model on multiple-choice and generative tasks.")
    p.add_argument("-i", "--source", choices=["sft", "rl", "base"], default="sft", help="which checkpoints")
    p.add_argument("-a", "--task-name", default=",".join(ALL_TASKS), help="comma-separated tasks")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--max-problems", type=int, default=None, help="problems per task (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (categorical tasks)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--device-type", default="")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.task_name.split(",") if n.strip()]
    for name in names:
        if name not in ALL_TASKS:
            raise UserError(f"unknown task {name!r} in -a: choose from {', '.join(ALL_TASKS)}")
    compute = compute_init(args.device_type)
    print0(python_tool_banner())  # the sandbox layers in force, or why the python tool is off
    if args.dry_run:
        print0(f"chat_eval dry run: {args.source} model, tasks {', '.join(names)}")
        return
    model, tokenizer, meta = load_model(args.source, compute.device, args.model_tag, args.step)
    engine = Engine(model, tokenizer, compute.autocast)
    accuracies = {}
    for name in names:
        t0 = time.time()
        accuracies[name] = run_chat_eval(name, model, tokenizer, engine, args.batch_size, args.max_problems,
                                         args.max_new_tokens, args.temperature, args.top_k, compute.autocast)
        print0(f"{name:<14} accuracy {accuracies[name]:.4f}   ({time.time() - t0:.1f} s)")
    results = dict(accuracies)
    if set(names) == set(ALL_TASKS):
        results["ChatCORE"] = chat_core(accuracies)
        print0(f"ChatCORE: {results['ChatCORE']:.4f}")
    else:
        results["ChatCORE (partial)"] = chat_core(accuracies)
        print0(f"ChatCORE over {len(names)}/{len(ALL_TASKS)} tasks: {results['ChatCORE (partial)']:.4f}")
    if compute.dist.is_master:
        from nanochat.report import get_report
        get_report().log(f"Chat evaluation {args.source}",
                         [{"model_tag": meta.get("model_tag") or meta["args"].get("model_tag"), "step": meta["step"],
                           "max_problems": args.max_problems}, results])


if __name__ == "__main__":
    run_cli(main)
