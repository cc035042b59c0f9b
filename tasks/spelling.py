"""Spelling tasks generated from an English word list: small models are bad at letters, so we teach them.

SpellingBee: "How many r are in strawberry?" → spell the word, count, check with a python call, answer "#### 3".
SimpleSpelling: "Spell the word: apple" → "apple:a,p,p,l,e".
Examples are generated deterministically from the index (and split), so every run sees the same data.
"""

import functools
import random

from nanochat.download import external_file
from tasks.common import Task
from tasks.gsm8k import extract_answer

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
QUESTIONS = [
    "How many {l} are in the word {w}?",
    "How many times does the letter {l} appear in {w}?",
    "Count the number of '{l}' in '{w}'.",
    "how many {l}s are there in {w}",
    "In the word \"{w}\", how many occurrences of {l} are there?",
]


@functools.cache
def word_list() -> tuple[str, ...]:
    path = external_file("english-words/words_alpha.txt", WORDS_URL)
    with open(path, encoding="utf-8") as f:  # the published file has CRLF line ends
        return tuple(w for w in (line.strip() for line in f) if w.isalpha() and 2 < len(w) < 16)


class _WordTask(Task):
    """Test and train examples come from disjoint seeds; `size` examples in all."""

    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        self.size, self.offset = size, 0 if split == "train" else 10_000_000
        self.words = word_list()

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(self.offset + index)


class SpellingBee(_WordTask):
    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        question = rng.choice(QUESTIONS).format(l=letter, w=word)
        running, seen = [], 0
        for ch in word:
            if ch == letter:
                seen += 1
                running.append(f"{ch}({seen})")
        tally = ", ".join(running) if running else "none"
        parts = [
            {"type": "text", "text": f"Spelling out {word}: {','.join(word)}.\n"
                                     f"Counting '{letter}': {tally}.\nLet me double-check with Python: "},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nThe letter '{letter}' appears {count} time{'s' if count != 1 else ''} "
                                     f"in \"{word}\".\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": str(count)}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return extract_answer(completion) == conversation["answer"]

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))


class SimpleSpelling(_WordTask):
    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        word = self.rng(index).choice(self.words)
        answer = f"{word}:{','.join(word)}"
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": answer}], "answer": answer}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["answer"]
