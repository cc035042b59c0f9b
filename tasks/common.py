"""The one interface every dataset shares: a sliceable list of conversations that can grade a model's answer."""

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from nanochat.common import UserError
from nanochat.download import hf_file

LETTERS = "ABCDEFGHIJ"


class Task:
    """len(task), task[i] → {"messages": [...]} (the assistant's answer included), eval_type, evaluate().

    start/stop/step slice the underlying examples, e.g. GSM8K("main", "train", stop=1000).
    """

    eval_type = "generative"  # or "categorical": answered by comparing the logits of letter tokens

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str):
        raise NotImplementedError

    def __len__(self) -> int:
        return len(range(self.start, self.num_examples() if self.stop is None else min(self.stop, self.num_examples()),
                         self.step))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} out of range ({len(self)} examples)")
        return self.get_example(self.start + index * self.step)

    @property
    def name(self) -> str:
        return type(self).__name__


class TaskMixture(Task):
    """Several tasks interleaved by a fixed-seed shuffle of (task, index) pairs: the same order on every run/rank.

    A task listed twice is seen twice per epoch (how the reference oversamples MMLU and GSM8K).
    """

    def __init__(self, tasks: list[Task], seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.index = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        t, i = self.index[index]
        return self.tasks[t][i]


def read_parquet_rows(repo: str, path: str, dataset_name: str) -> list[dict]:
    try:
        local = hf_file(repo, path)
    except UserError as e:
        raise UserError(f"dataset {dataset_name} is not available: {e}") from None
    return pq.read_table(local).to_pylist()


def hf_shuffled(rows: list, seed: int = 42) -> list:
    """The rows in the order Hugging Face datasets' Dataset.shuffle(seed=seed) puts them, which is
    numpy's default_rng(seed).permutation: the order in which the reference evaluates (and trains on) its tasks,
    so that --max-problems takes the same slice."""
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def read_jsonl(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def render_multiple_choice(question: str, choices: list[str], letters: list[str] | None = None) -> str:
    """The chat multiple-choice format: the model answers with the bare letter of the right choice."""
    letters = letters or list(LETTERS[:len(choices)])
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for choice, letter in zip(choices, letters)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def multiple_choice_conversation(question: str, choices: list[str], answer: int, subject: str = "",
                                 letters: list[str] | None = None) -> dict:
    """letters: the label of each choice (default A, B, C, ...); the answer is the label of choices[answer]."""
    letters = list(letters) if letters is not None else list(LETTERS[:len(choices)])
    return {"messages": [{"role": "user", "content": render_multiple_choice(question, choices, letters)},
                         {"role": "assistant", "content": letters[answer]}],
            "letters": letters, "subject": subject}


def evaluate_letter(conversation: dict, completion: str) -> bool:
    return completion.strip() == conversation["messages"][-1]["content"]
