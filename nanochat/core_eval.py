"""The CORE metric (DCLM): 22 in-context tasks scored by a base model, centered against random guessing.

Scored as the reference harness does, so figures compare with published ones (GPT-2: 0.2565): every prompt is
scored whole, however long, as the reference scores its own models (no crop to the training context). Each task's
items are shuffled with Random(1337) and cut to --max-per-task; item i of that list takes its few-shot examples
with Random(1234 + i) from the list's other items. Task types: multiple_choice (the choice with the lowest mean loss
over the tokens after the prefix all choices share), schema (the context under which the shared suffix, the
continuation, has the lowest mean loss) and language_modeling (every continuation token must be the model's
greedy prediction). CORE = mean over tasks of (acc − b) / (1 − b), b the random baseline. When task files are
missing (the offline mirror lacks squad) the result is labelled "CORE over K/22 tasks".
"""

import csv
import json
import random
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanochat.common import UserError, print0
from nanochat.download import zip_member
from nanochat.loss_eval import accumulator_dtype, pad_rows

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
NUM_CORE_TASKS = 22


def bundle_file(rel: str) -> Path:
    """A file of the eval bundle (a mirror's unpacked copy, or the real zip extracted once); a UserError (a
    DownloadError) when the bundle lacks it."""
    return zip_member("eval_bundle", BUNDLE_URL, rel)


def load_tasks() -> tuple[list[dict], dict[str, float], list[str]]:
    """(task configs with their items, random baselines in percent, labels of the missing tasks)."""
    config = yaml.safe_load(bundle_file("core.yaml").read_text())
    with open(bundle_file("eval_meta_data.csv"), encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks, missing = [], []
    for task in config["icl_tasks"]:
        try:
            path = bundle_file(f"eval_data/{task['dataset_uri']}")
        except UserError:
            missing.append(task["label"])
            continue
        with open(path, encoding="utf-8") as f:
            items = [json.loads(line) for line in f if line.strip()]
        tasks.append({"label": task["label"], "type": task["icl_task_type"],
                      "shots": task["num_fewshot"][0], "delimiter": task.get("continuation_delimiter", " "),
                      "items": items})
    return tasks, baselines, missing


def core_label(n_present: int) -> str:
    return "CORE" if n_present == NUM_CORE_TASKS else f"CORE over {n_present}/{NUM_CORE_TASKS} tasks"


# ---------------------------------------------------------------------------------------------------------------------
# Item order and few-shot examples

def prepare_items(items: list[dict], max_per_task: int = -1) -> list[dict]:
    """The items in scoring order: shuffled with Random(1337), then the first max_per_task (-1 = all)."""
    data = list(items)
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def fewshot_examples(data: list[dict], idx: int, shots: int) -> list[dict]:
    """Random(1234 + idx).sample of the other items of the prepared list, so an item is never its own example.

    When the list holds fewer than `shots` other items (a small --max-per-task), all of them are sampled; the
    reference would stop with an error there, and agrees everywhere else.
    """
    if shots <= 0:
        return []
    others = [j for j in range(len(data)) if j != idx]
    return [data[j] for j in random.Random(1234 + idx).sample(others, min(shots, len(others)))]


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and the scored span

def _solved_example(task_type: str, example: dict, delimiter: str) -> str:
    if task_type == "multiple_choice":
        return example["query"] + delimiter + example["choices"][example["gold"]]
    if task_type == "schema":
        return example["context_options"][example["gold"]] + delimiter + example["continuation"]
    return example["context"].strip() + delimiter + example["continuation"]


def render_prompts(task_type: str, item: dict, fewshot: list[dict], delimiter: str) -> list[str]:
    """Whole prompts: one per choice (multiple_choice), one per context (schema), or for language_modeling the
    prompt without and with the continuation. Solved examples come first, each followed by a blank line.

    LM contexts are stripped, and so is the prompt without the continuation: data with a context ending in
    whitespace would otherwise leave a space that the tokenizer merges into the continuation's first token, so
    the shorter prompt would not be a token prefix of the longer one.
    """
    head = "".join(_solved_example(task_type, ex, delimiter) + "\n\n" for ex in fewshot)
    if task_type == "multiple_choice":
        return [head + item["query"] + delimiter + choice for choice in item["choices"]]
    if task_type == "schema":
        return [head + context + delimiter + item["continuation"] for context in item["context_options"]]
    if task_type == "language_modeling":
        stem = head + item["context"].strip() + delimiter
        return [stem.strip(), stem + item["continuation"]]
    raise ValueError(f"unknown CORE task type {task_type!r}")


def common_prefix_length(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    return next((i for i in range(n) if any(s[i] != seqs[0][i] for s in seqs)), n)


def common_suffix_length(seqs: list[list[int]]) -> int:
    return common_prefix_length([s[::-1] for s in seqs])


def scored_spans(task_type: str, seqs: list[list[int]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """(rows to run, [start, end) of the scored tokens in each row), from the prompts' token sequences.

    multiple_choice: the choices share the question, so everything after the tokens common to all rows is scored
    (choices that begin with the same words are compared on where they differ). schema: the contexts differ and
    the continuation is shared, so the tokens common to the ends of all rows are scored. language_modeling: one
    row, the prompt with the continuation, scored after the tokens it shares with the prompt without it.
    """
    if task_type == "multiple_choice":
        start = common_prefix_length(seqs)
        return seqs, [(start, len(s)) for s in seqs]
    if task_type == "schema":
        suffix = common_suffix_length(seqs)
        return seqs, [(len(s) - suffix, len(s)) for s in seqs]
    if task_type == "language_modeling":
        without, full = seqs
        return [full], [(common_prefix_length([without, full]), len(full))]
    raise ValueError(f"unknown CORE task type {task_type!r}")


@torch.no_grad()
def score_item(model, tokenizer, task_type: str, prompts: list[str], device, autocast) -> int | bool:
    """Index of the option with the lowest mean loss over its scored span (multiple_choice, schema), or whether
    every continuation token is the model's greedy prediction (language_modeling).

    Whole prompts are scored, never cropped to the training context, as the reference scores its own models (its
    crop applies only to models that declare a max_seq_len): the rotary tables cover 10x the context (gpt.py), and a
    longer prompt gets tables of its own length.
    """
    seqs = [tokenizer.encode(p, prepend=tokenizer.get_bos_token_id()) for p in prompts]
    rows, spans = scored_spans(task_type, seqs)
    x = pad_rows(rows, tokenizer.get_bos_token_id(), device)
    with autocast():
        logits = model(x)  # (n, T, V)
    logits = logits.float()
    if task_type == "language_modeling":
        s, e = spans[0]
        return bool((logits[0, s - 1:e - 1].argmax(-1) == x[0, s:e]).all())
    # An empty span (a choice whose tokens are all shared) has a NaN mean, as in the reference; NaN never compares
    # lower, so such an option only wins from first place.
    means = [F.cross_entropy(logits[i, s - 1:e - 1], x[i, s:e]).item() if e > s else float("nan")
             for i, (s, e) in enumerate(spans)]
    return min(range(len(means)), key=means.__getitem__)


def evaluate_task(model, tokenizer, task: dict, device, max_per_task: int = -1, autocast=None) -> float:
    """Accuracy on one task, items split over ranks."""
    autocast = autocast or nullcontext
    data = prepare_items(task["items"], max_per_task)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    correct = torch.zeros(2, dtype=accumulator_dtype(device), device=device)
    for idx in range(rank, len(data), world):
        item = data[idx]
        prompts = render_prompts(task["type"], item, fewshot_examples(data, idx, task["shots"]), task["delimiter"])
        result = score_item(model, tokenizer, task["type"], prompts, device, autocast)
        ok = result if task["type"] == "language_modeling" else result == item["gold"]
        correct += torch.tensor([float(ok), 1.0], dtype=correct.dtype, device=device)
    if world > 1:
        dist.all_reduce(correct)
    return (correct[0] / correct[1].clamp(min=1)).item()


def evaluate_core(model, tokenizer, device, max_per_task: int = -1, autocast=None) -> dict:
    """{'tasks': {label: {'accuracy', 'chance', 'centered'}}, 'core': mean centered accuracy, 'label', 'missing'}."""
    tasks, baselines, missing = load_tasks()
    if missing:
        print(f"warning: CORE task files missing from the eval bundle: {', '.join(missing)}; "
              f"reporting {core_label(len(tasks))}", file=sys.stderr, flush=True)
    results = {}
    for task in tasks:
        accuracy = evaluate_task(model, tokenizer, task, device, max_per_task, autocast)
        b = baselines.get(task["label"], 0.0) / 100
        results[task["label"]] = {"accuracy": accuracy, "chance": b, "centered": (accuracy - b) / (1 - b)}
        print0(f"  {task['label']:<34} accuracy {accuracy:.4f}  centered {results[task['label']]['centered']:+.4f}")
    core = sum(r["centered"] for r in results.values()) / max(1, len(results))
    return {"tasks": results, "core": core, "label": core_label(len(tasks)), "missing": missing}


def core_table(tasks: dict[str, dict]) -> str:
    """The per-task results as a markdown table, each accuracy beside its chance level (the random baseline)."""
    rows = ["| CORE task | Accuracy | Chance | Centered |", "|---|---|---|---|"]
    rows += [f"| {label} | {r['accuracy']:.4f} | {r['chance']:.4f} | {r['centered']:+.4f} |"
             for label, r in tasks.items()]
    return "\n".join(rows)
