"""Chat-model evaluation as the reference defines it: per-task accuracy (pass@k for generative tasks) and ChatCORE.

Categorical tasks (ARC, MMLU) are answered by the highest logit among the choices' letter tokens after the prompt.
Generative tasks (GSM8K, HumanEval, SpellingBee) sample `num_samples` completions of up to 512 new tokens; a
problem counts as solved when any of them passes (pass@k; greedy with one sample by default). Each task's rows are
in the order of Hugging Face's Dataset.shuffle(seed=42) (tasks/common.hf_shuffled), so --max-problems takes the
reference's slice. ChatCORE is the mean over ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval of accuracy
centered by chance, (acc − b) / (1 − b) with b = 0.25 for the four-choice tasks and 0 for the generative ones;
SpellingBee is reported beside it, not inside it.
"""

from contextlib import nullcontext

import torch
import torch.distributed as dist

from nanochat.common import UserError
from nanochat.engine import Engine
from nanochat.loss_eval import accumulator_dtype, pad_rows
from nanochat.sandbox.execution import UNSAFE_ENV, refusal_reason
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spelling import SpellingBee

CHATCORE_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
ALL_TASKS = CHATCORE_TASKS + ["SpellingBee"]
CHANCE = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
MAX_NEW_TOKENS = 512
GENERATIVE_SIZES = {"GSM8K": 1319, "HumanEval": 164, "SpellingBee": 256}  # problems of the generative tasks' tests
CODE_TASKS = ["GSM8K", "HumanEval"]  # scored with model-written code: the python tool's calls, the task's unit tests


def require_python_tool(names: list[str]) -> None:
    """Stop before evaluating tasks whose scores need code to run when the python tool would refuse to run it:
    every refused call would count as a wrong answer and the task would report a meaningless zero."""
    needing = [n for n in names if n in CODE_TASKS]
    why = refusal_reason()
    if needing and why is not None:
        raise UserError(f"{' and '.join(needing)} run model-written code, and there is no kernel sandbox here "
                        f"({why}): pass --unsafe-python-tool (or set {UNSAFE_ENV}=1) to run it with rlimits only, "
                        f"or leave {' and '.join(needing)} out of -a")


def planned_decode_steps(names: list[str], max_problems: int | None, max_new_tokens: int, world: int = 1) -> int:
    """The most decode steps that evaluating these tasks takes on one rank (every answer at full length; the
    categorical tasks decode nothing): what `DecodePolicy.for_device` weighs against compiling the step."""
    problems = sum(min(size, max_problems or size) for name, size in GENERATIVE_SIZES.items() if name in names)
    return -(-problems // world) * max_new_tokens


def make_task(name: str):
    makers = {"ARC-Easy": lambda: ARC("ARC-Easy", "test"), "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
              "MMLU": lambda: MMLU("all", "test"), "GSM8K": lambda: GSM8K("main", "test"),
              "HumanEval": HumanEval,
              "SpellingBee": lambda: SpellingBee(size=GENERATIVE_SIZES["SpellingBee"], split="test")}
    if name not in makers:
        raise UserError(f"unknown task {name!r}: choose from {', '.join(ALL_TASKS)}")
    return makers[name]()


@torch.no_grad()
def run_categorical(task, model, tokenizer, indices: list[int], batch_size: int, autocast) -> list[bool]:
    """Answer = the letter whose token has the highest logit after the prompt (other tokens are ignored)."""
    device = next(model.parameters()).device
    letter_ids = {}
    results = []
    for b in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[b:b + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        x = pad_rows(prompts, tokenizer.get_bos_token_id(), device)
        with autocast():
            logits = model(x)  # (B, T, V)
        for i, (conv, p) in enumerate(zip(convs, prompts)):
            for letter in conv["letters"]:
                if letter not in letter_ids:
                    ids = tokenizer.encode(letter)
                    if len(ids) != 1:
                        raise UserError(f"the tokenizer splits the answer letter {letter!r} into {len(ids)} tokens; "
                                        "categorical tasks need one token per letter (retrain the tokenizer)")
                    letter_ids[letter] = ids[0]
            scores = logits[i, len(p) - 1, [letter_ids[letter] for letter in conv["letters"]]]
            results.append(task.evaluate(conv, conv["letters"][int(scores.argmax())]))
    return results


def run_generative(task, engine: Engine, tokenizer, indices: list[int], num_samples: int, max_new_tokens: int,
                   temperature: float, top_k: int | None) -> list[bool]:
    """Per problem: whether any of num_samples completions passes (pass@num_samples)."""
    results = []
    for i in indices:
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        outputs, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=i)
        completions = [tokenizer.decode([t for t in out[len(prompt):] if t not in engine.tools.stops])
                       for out in outputs]
        outcomes = [bool(task.evaluate(conv, c)) for c in completions]  # every sample graded, as in the reference
        results.append(any(outcomes))
    return results


def run_chat_eval(task_name: str, model, tokenizer, engine: Engine | None = None, batch_size: int = 8,
                  max_problems: int | None = None, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0,
                  top_k: int | None = 50, autocast=None, num_samples: int = 1) -> float:
    """Accuracy of the model on the task's first max_problems rows (pass@num_samples for generative tasks);
    problems are split over ranks and the counts all-reduced."""
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, not {num_samples}")
    autocast = autocast or nullcontext
    task = make_task(task_name)
    n = len(task) if max_problems is None else min(max_problems, len(task))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, n, world))
    if task.eval_type == "categorical":
        results = run_categorical(task, model, tokenizer, mine, batch_size, autocast)
    else:
        engine = engine or Engine(model, tokenizer)
        results = run_generative(task, engine, tokenizer, mine, num_samples, max_new_tokens, temperature, top_k)
    device = next(model.parameters()).device
    dtype = accumulator_dtype(device)
    counts = torch.tensor([float(sum(results)), float(len(results))], dtype=dtype, device=device)
    if world > 1:
        dist.all_reduce(counts)
    return (counts[0] / counts[1].clamp(min=1)).item()


def centered(task_name: str, accuracy: float) -> float:
    chance = CHANCE[task_name]
    return (accuracy - chance) / (1 - chance)


def chat_core(accuracies: dict[str, float]) -> float:
    """Mean centered accuracy over the ChatCORE tasks present in `accuracies` (others, e.g. SpellingBee, are
    ignored); the full metric needs all five."""
    scores = [centered(name, acc) for name, acc in accuracies.items() if name in CHANCE]
    return sum(scores) / max(1, len(scores))
