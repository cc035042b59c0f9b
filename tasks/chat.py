"""General chat data: SmolTalk (the Hub), HH-RLHF conversations (offline stand-in), and your own JSONL."""

import gzip
import json
from pathlib import Path

from nanochat.common import UserError
from nanochat.download import hf_file
from tasks.common import Task, hf_shuffled, read_parquet_rows


class SmolTalk(Task):
    """HuggingFaceTB/smol-smoltalk: ~460k multi-turn conversations (train), 24k (test)."""
    FILES = {"train": ["data/train-00000-of-00004.parquet", "data/train-00001-of-00004.parquet",
                       "data/train-00002-of-00004.parquet", "data/train-00003-of-00004.parquet"],
             "test": ["data/test-00000-of-00001.parquet"]}

    def __init__(self, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        rows = []
        for path in self.FILES[split]:
            rows += read_parquet_rows("HuggingFaceTB/smol-smoltalk", path, f"SmolTalk {split}")
        self.rows = hf_shuffled(rows, seed=42)  # the reference's Dataset.shuffle(seed=42), before any mixing

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]}


def parse_hh_transcript(text: str) -> list[dict] | None:
    """'\\n\\nHuman: …\\n\\nAssistant: …' → alternating messages, or None when malformed."""
    messages = []
    for chunk in text.split("\n\nHuman: ")[1:]:
        if "\n\nAssistant: " not in chunk:
            return None
        turns = chunk.split("\n\nAssistant: ")
        user, assistants = turns[0].strip(), [t.strip() for t in turns[1:]]
        if not user or not all(assistants):
            return None
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": "\n\n".join(assistants)})
    return messages or None


class HHRLHF(Task):
    """Anthropic/hh-rlhf transcripts, the `chosen` side, as conversations (malformed ones are counted and skipped)."""

    def __init__(self, subset: str = "harmless-base", split: str = "test", **kwargs):
        super().__init__(**kwargs)
        try:
            path = hf_file("Anthropic/hh-rlhf", f"{subset}/{split}.jsonl.gz")
        except UserError as e:
            raise UserError(f"dataset HH-RLHF {subset}/{split} is not available: {e}") from None
        self.conversations, self.skipped = [], 0
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                messages = parse_hh_transcript(json.loads(line)["chosen"])
                if messages is None:
                    self.skipped += 1
                else:
                    self.conversations.append({"messages": messages})

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]


class CustomJSON(Task):
    """Your own conversations: a JSONL file, one JSON list of {"role", "content"} messages per line."""

    def __init__(self, filepath: str | Path, **kwargs):
        super().__init__(**kwargs)
        path = Path(filepath)
        if not path.exists():
            raise UserError(f"{path} does not exist (CustomJSON needs a JSONL file of message lists)")
        self.conversations = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                messages = json.loads(line)
                if isinstance(messages, dict):
                    messages = messages.get("messages")
                ok = isinstance(messages, list) and len(messages) >= 2 and all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) and m["content"] for m in messages)
                if not ok:
                    raise UserError(f"{path}:{n}: each line must be a list of {{'role', 'content'}} messages "
                                    "(user/assistant alternating, non-empty content)")
                self.conversations.append({"messages": messages})

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]
