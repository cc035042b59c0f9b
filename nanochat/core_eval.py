"""The CORE metric (DCLM): 22 in-context tasks scored by a base model, centered against random guessing.

Task types: multiple_choice (the choice whose continuation has the lowest mean loss), schema (the context under
which the shared continuation has the lowest mean loss) and language_modeling (the continuation must be exactly the
model's greedy prediction). Few-shot examples are drawn with Random(1234 + item index) from the other items; items are
shuffled with Random(1337) before --max-per-task. CORE = mean over tasks of (acc − b) / (1 − b), b the random baseline.
When task files are missing (the offline mirror lacks squad) the result is labelled "CORE over K/22 tasks".
"""

import csv
import json
import os
import random
import sys
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanochat.common import UserError, get_base_dir, print0
from nanochat.download import external_file

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
NUM_CORE_TASKS = 22


def bundle_file(rel: str) -> Path:
    """A file of the eval bundle: from the mirror's unpacked eval_bundle/, or the real zip, extracted once."""
    if os.environ.get("NANOCHAT_MIRROR"):
        return external_file(f"eval_bundle/{rel}", BUNDLE_URL)
    root = get_base_dir() / "eval_bundle"
    if not (root / "core.yaml").exists():
        archive = external_file("eval_bundle.zip", BUNDLE_URL)
        with zipfile.ZipFile(archive) as z:
            z.extractall(get_base_dir())
    path = root / rel
    if not path.exists():
        raise UserError(f"{path} is not in the eval bundle")
    return path


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
# Prompts

def _example_text(task_type: str, item: dict, delimiter: str) -> str:
    """A solved few-shot example."""
    if task_type == "multiple_choice":
        return item["query"] + delimiter + item["choices"][item["gold"]]
    if task_type == "schema":
        return item["context_options"][item["gold"]] + delimiter + item["continuation"]
    return item["context"] + delimiter + item["continuation"]


def build_prompts(task_type: str, item: dict, fewshot: list[dict], delimiter: str) -> list[tuple[str, str]]:
    """(prefix, continuation) pairs, one per option; the model is scored on the continuation tokens only."""
    head = "".join(_example_text(task_type, ex, delimiter) + "\n\n" for ex in fewshot)
    if task_type == "multiple_choice":
        return [(head + item["query"] + delimiter, choice) for choice in item["choices"]]
    if task_type == "schema":
        return [(head + context + delimiter, item["continuation"]) for context in item["context_options"]]
    if task_type == "language_modeling":
        return [(head + item["context"] + delimiter, item["continuation"])]
    raise ValueError(f"unknown CORE task type {task_type!r}")


def tokenize_option(tokenizer, prefix: str, continuation: str) -> tuple[list[int], int]:
    """(BOS + tokens of prefix+continuation, index where the continuation's tokens start)."""
    bos = tokenizer.get_bos_token_id()
    full = tokenizer.encode(prefix + continuation, prepend=bos)
    head = tokenizer.encode(prefix.rstrip(" "), prepend=bos)  # a trailing space belongs to the next token
    start = len(head) if full[:len(head)] == head else next(
        (i for i, (a, b) in enumerate(zip(full, head)) if a != b), len(head))
    return full, min(start, len(full) - 1)


@torch.no_grad()
def score_item(model, tokenizer, task_type: str, options: list[tuple[str, str]], device, max_len: int,
               autocast) -> bool | int:
    """Index of the chosen option (multiple_choice/schema) or whether the greedy prediction matched (LM)."""
    rows, starts = [], []
    for prefix, continuation in options:
        ids, start = tokenize_option(tokenizer, prefix, continuation)
        if len(ids) > max_len:  # left-truncate, keeping the continuation
            cut = len(ids) - max_len
            ids, start = ids[cut:], max(1, start - cut)
        rows.append(ids)
        starts.append(start)
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r, device=device)
    with autocast():
        logits = model(x)  # (n, T, V)
    logits = logits.float()
    losses, matches = [], []
    for i, r in enumerate(rows):
        s, e = starts[i], len(r)
        target = x[i, s:e]
        pred_logits = logits[i, s - 1:e - 1]
        losses.append(F.cross_entropy(pred_logits, target).item())
        matches.append(bool((pred_logits.argmax(-1) == target).all()))
    if task_type == "language_modeling":
        return matches[0]
    return min(range(len(losses)), key=losses.__getitem__)


def evaluate_task(model, tokenizer, task: dict, device, max_per_task: int = -1, autocast=None) -> float:
    """Accuracy on one task, items split over ranks."""
    from contextlib import nullcontext
    autocast = autocast or nullcontext
    items = list(task["items"])
    order = list(range(len(items)))
    random.Random(1337).shuffle(order)
    if max_per_task > 0:
        order = order[:max_per_task]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    max_len = model.config.sequence_len
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for idx in order[rank::world]:
        item = items[idx]
        fewshot = []
        if task["shots"] > 0:
            pool = [j for j in range(len(items)) if j != idx]
            fewshot = [items[j] for j in random.Random(1234 + idx).sample(pool, min(task["shots"], len(pool)))]
        options = build_prompts(task["type"], item, fewshot, task["delimiter"])
        result = score_item(model, tokenizer, task["type"], options, device, max_len, autocast)
        ok = result if task["type"] == "language_modeling" else result == item["gold"]
        correct += torch.tensor([float(ok), 1.0], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(correct)
    return (correct[0] / correct[1].clamp(min=1)).item()


def evaluate_core(model, tokenizer, device, max_per_task: int = -1, autocast=None) -> dict:
    """{'tasks': {label: {'accuracy', 'centered'}}, 'core': mean centered accuracy, 'label', 'missing'}."""
    tasks, baselines, missing = load_tasks()
    if missing:
        print(f"warning: CORE task files missing from the eval bundle: {', '.join(missing)}; "
              f"reporting {core_label(len(tasks))}", file=sys.stderr, flush=True)
    results = {}
    for task in tasks:
        accuracy = evaluate_task(model, tokenizer, task, device, max_per_task, autocast)
        b = baselines.get(task["label"], 0.0) / 100
        results[task["label"]] = {"accuracy": accuracy, "centered": (accuracy - b) / (1 - b)}
        print0(f"  {task['label']:<34} accuracy {accuracy:.4f}  centered {results[task['label']]['centered']:+.4f}")
    core = sum(r["centered"] for r in results.values()) / max(1, len(results))
    return {"tasks": results, "core": core, "label": core_label(len(tasks)), "missing": missing}
