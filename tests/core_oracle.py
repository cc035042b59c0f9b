"""An independent CORE scorer written straight from the DCLM reference harness, for tests only.

It shares nothing with nanochat.core_eval but the model and the tokenizer: it reads the bundle files itself,
renders the prompts with the reference templates' text, finds the scored span by walking the token lists, and
computes the losses from log-softmax in float64. Run it against a checkpoint to compare per-task accuracies:

    python tests/core_oracle.py --model-tag=d2 --max-per-task=100
"""

import csv
import json
import random
from pathlib import Path

import torch
import yaml


def read_bundle(root: Path) -> list[dict]:
    """[{label, type, shots, delimiter, baseline, items}] for every task of core.yaml whose file is present."""
    config = yaml.safe_load((root / "core.yaml").read_text())
    with open(root / "eval_meta_data.csv", encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}
    tasks = []
    for entry in config["icl_tasks"]:
        path = root / "eval_data" / entry["dataset_uri"]
        if not path.exists():
            continue
        items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        tasks.append({"label": entry["label"], "type": entry["icl_task_type"], "shots": entry["num_fewshot"][0],
                      "delimiter": entry.get("continuation_delimiter", " "),
                      "baseline": baselines[entry["label"]], "items": items})
    return tasks


def reference_prompts(task_type: str, item: dict, examples: list[dict], delim: str) -> list[str]:
    """The text the reference's templates render: each solved example then a blank line, then the item."""
    if task_type == "multiple_choice":
        shots = "".join(f"{e['query']}{delim}{e['choices'][e['gold']]}\n\n" for e in examples)
        return [f"{shots}{item['query']}{delim}{c}" for c in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{e['context_options'][e['gold']]}{delim}{e['continuation']}\n\n" for e in examples)
        return [f"{shots}{c}{delim}{item['continuation']}" for c in item["context_options"]]
    shots = "".join(f"{e['context'].strip()}{delim}{e['continuation']}\n\n" for e in examples)
    without = f"{shots}{item['context'].strip()}{delim}"
    return [without.strip(), without + item["continuation"]]


def reference_spans(task_type: str, tokens: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    shortest = min(len(t) for t in tokens)
    if task_type == "multiple_choice":
        start = 0
        while start < shortest and all(t[start] == tokens[0][start] for t in tokens):
            start += 1
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == "schema":
        suffix = 0
        while suffix < shortest and all(t[-1 - suffix] == tokens[0][-1 - suffix] for t in tokens):
            suffix += 1
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    without, full = tokens
    assert len(without) < len(full) and full[:len(without)] == without, "prompt without continuation is no prefix"
    return [full], [len(without)], [len(full)]


@torch.no_grad()
def oracle_item_correct(model, tokenizer, task: dict, data: list[dict], idx: int, max_len: int | None) -> bool:
    item = data[idx]
    examples = []
    if task["shots"] > 0:
        available = [i for i in range(len(data)) if i != idx]
        picked = random.Random(1234 + idx).sample(available, min(task["shots"], len(available)))
        examples = [data[i] for i in picked]
    prompts = reference_prompts(task["type"], item, examples, task["delimiter"])
    bos = tokenizer.get_bos_token_id()
    tokens, starts, ends = reference_spans(task["type"], [tokenizer.encode(p, prepend=bos) for p in prompts])
    for i, t in enumerate(tokens):  # models declaring a max_seq_len see its last tokens; nanochat's GPT does not
        if max_len is not None and len(t) > max_len:
            crop = len(t) - max_len
            tokens[i], starts[i], ends[i] = t[crop:], max(1, starts[i] - crop), ends[i] - crop
    width = max(len(t) for t in tokens)
    batch = torch.tensor([t + [bos] * (width - len(t)) for t in tokens], dtype=torch.long)
    logprobs = torch.log_softmax(model(batch).double(), dim=-1)  # (n, width, vocab)
    if task["type"] == "language_modeling":
        s, e = starts[0], ends[0]
        return all(int(logprobs[0, p - 1].argmax()) == tokens[0][p] for p in range(s, e))
    mean_losses = []
    for i, t in enumerate(tokens):
        positions = range(starts[i], ends[i])
        nll = [-float(logprobs[i, p - 1, t[p]]) for p in positions]
        mean_losses.append(sum(nll) / len(nll) if nll else float("nan"))
    return mean_losses.index(min(mean_losses)) == item["gold"]


def oracle_task_accuracy(model, tokenizer, task: dict, max_per_task: int, max_len: int | None) -> float:
    data = list(task["items"])
    random.Random(1337).shuffle(data)
    if max_per_task > 0:
        data = data[:max_per_task]
    return sum(oracle_item_correct(model, tokenizer, task, data, i, max_len) for i in range(len(data))) / len(data)


def oracle_core(model, tokenizer, root: Path, max_per_task: int) -> dict[str, float]:
    """{label: accuracy} for every task present in the bundle at root."""
    model.eval()
    return {t["label"]: oracle_task_accuracy(model, tokenizer, t, max_per_task, getattr(model, "max_seq_len", None))
            for t in read_bundle(root)}


if __name__ == "__main__":
    import argparse
    import os

    from nanochat.checkpoint import load_model
    from nanochat.core_eval import evaluate_core

    p = argparse.ArgumentParser(description="Per-task CORE accuracies: nanochat.core_eval against this oracle.")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--max-per-task", type=int, default=100)
    args = p.parse_args()
    model, tokenizer, _ = load_model("base", torch.device("cpu"), args.model_tag, args.step)
    ours = evaluate_core(model, tokenizer, "cpu", args.max_per_task)
    theirs = oracle_core(model, tokenizer, Path(os.environ["NANOCHAT_MIRROR"]) / "files/eval_bundle",
                         args.max_per_task)
    rows = {label: {"ours": ours["tasks"][label]["accuracy"], "oracle": acc} for label, acc in theirs.items()}
    diff = max(abs(r["ours"] - r["oracle"]) for r in rows.values())
    print(json.dumps({"max_per_task": args.max_per_task, "tasks": rows, "max_abs_diff": diff,
                      ours["label"]: ours["core"]}, indent=1))
