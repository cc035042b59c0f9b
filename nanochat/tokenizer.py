"""BPE tokenizer: trained with rustbpe, encoded and decoded with tiktoken, plus the chat rendering with loss masks.

Vocabulary layout: 256 byte tokens, the learned merges, then the 9 special tokens taking the last ids.
"""

import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken
import torch

from nanochat.common import UserError, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",              # starts every document
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",   # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",   # the tool's output, written into the context (not by the model)
]

# The tool markup inside an assistant turn: each token switches the part that the following tokens belong to.
TOOL_MARKUP = {"<|python_start|>": "python", "<|python_end|>": "text",
               "<|output_start|>": "python_output", "<|output_end|>": "text"}
# Either ends an assistant reply: its own end token, or <|bos|> (a model that forgot the chat format).
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")

# GPT-4's split pattern with numbers split in groups of 1-2 digits instead of 1-3 (better for small vocabularies).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class Tokenizer:
    """A tiktoken Encoding built from BPE merges learned by rustbpe."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        first_special = len(mergeable_ranks)
        special = {name: first_special + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=special)
        self.bos_token_id = special["<|bos|>"]

    # --- training, saving, loading ---------------------------------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        import rustbpe
        n_merged = vocab_size - len(SPECIAL_TOKENS)
        if n_merged < 256:
            raise UserError(f"--vocab-size={vocab_size} is too small: it needs 256 byte tokens + "
                            f"{len(SPECIAL_TOKENS)} special tokens at least")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), n_merged, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(ranks, trainer.get_pattern())

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.pkl (merges + pattern) and token_bytes.pt, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "tokenizer.pkl.tmp"
        with open(tmp, "wb") as f:
            pickle.dump({"mergeable_ranks": self.mergeable_ranks, "pattern": self.pattern}, f)
        os.replace(tmp, directory / "tokenizer.pkl")
        tmp = directory / "token_bytes.pt.tmp"
        torch.save(self.token_bytes(), tmp)
        os.replace(tmp, directory / "token_bytes.pt")

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "Tokenizer":
        path = Path(directory) / "tokenizer.pkl"
        if not path.exists():
            raise UserError(f"no tokenizer at {path}: train one with `python -m scripts.tok_train`")
        try:
            with open(path, "rb") as f:
                state = _DataOnlyUnpickler(f).load()
            return cls(state["mergeable_ranks"], state["pattern"])
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError, ValueError) as e:
            # ValueError: an EXT1/2/4 opcode naming an extension code nobody registered, bytes that are not UTF-8
            raise UserError(f"{path} is not a nanochat tokenizer ({e}): retrain it with `python -m scripts.tok_train`")


    # --- vocabulary --------------------------------------------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def encode_special(self, name: str) -> int:
        return self.enc.encode_single_token(name)

    def tool_markup(self) -> dict[int, str]:
        """Token id → the part it opens ('python', 'python_output') or returns to ('text'); see TOOL_MARKUP."""
        return {self.encode_special(name): part for name, part in TOOL_MARKUP.items()}

    def stop_tokens(self) -> set[int]:
        """The ids that end an assistant reply (generation stops there; RL does not train on them)."""
        return {self.encode_special(name) for name in STOP_TOKENS}

    def token_bytes(self) -> torch.Tensor:
        """Number of UTF-8 bytes of each token, from its raw bytes (0 for special tokens); used for bits per byte.

        Taken from the merge table's bytes, never from decoding through str: ~190 tokens are not valid UTF-8 alone.
        """
        counts = torch.zeros(self.get_vocab_size(), dtype=torch.int32)
        for token, rank in self.mergeable_ranks.items():
            counts[rank] = len(token)
        return counts

    # --- encoding and decoding ---------------------------------------------------------------------------------------

    def _as_id(self, token: int | str | None) -> int | None:
        return self.encode_special(token) if isinstance(token, str) else token

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Encode ordinary text: special-token strings inside `text` are encoded as text, never as special tokens."""
        head, tail = self._as_id(prepend), self._as_id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if head is not None:
                ids.insert(0, head)
            if tail is not None:
                ids.append(tail)
            return ids
        batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        for ids in batch:
            if head is not None:
                ids.insert(0, head)
            if tail is not None:
                ids.append(tail)
        return batch

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    # --- chat rendering ----------------------------------------------------------------------------------------------

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Tokenize a chat into ids and a loss mask (1 = the assistant wrote it and training supervises it).

        <|bos|>, user turns in <|user_start|>…<|user_end|> (mask 0), assistant turns in <|assistant_start|> (mask 0)
        … <|assistant_end|> (mask 1 on the content and the closing token). Assistant python calls are
        <|python_start|>code<|python_end|> (mask 1); tool outputs <|output_start|>…<|output_end|> (mask 0, the tool
        writes them). A leading system message is merged into the first user turn. Truncated to max_tokens.
        """
        messages = _merge_system_message(conversation)
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], m: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        special = {name: self.encode_special(name) for name in SPECIAL_TOKENS}
        add(special["<|bos|>"], 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message.get("role") != expected:
                raise UserError(f"conversation message {i} has role {message.get('role')!r}, expected {expected!r} "
                                "(roles must alternate user, assistant, …, after an optional first system message)")
            content = message.get("content")
            if expected == "user":
                if not isinstance(content, str):  # an empty turn is rendered as it is, as the reference does
                    raise UserError(f"conversation message {i} (user) must have string content")
                add(special["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(special["<|user_end|>"], 0)
                continue
            add(special["<|assistant_start|>"], 0)
            for part in _assistant_parts(content, i):
                text_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(text_ids, 1)
                elif part["type"] == "python":
                    add(special["<|python_start|>"], 1)
                    add(text_ids, 1)
                    add(special["<|python_end|>"], 1)
                else:  # python_output
                    add(special["<|output_start|>"], 0)
                    add(text_ids, 0)
                    add(special["<|output_end|>"], 0)
            add(special["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def parse_assistant(self, tokens: list[int]) -> str | list[dict]:
        """The inverse of rendering an assistant turn: its tokens (without <|assistant_start|> and the stop token)
        as message content, plain text or, when it called the tool, parts that render back to the same tokens."""
        markup = self.tool_markup()
        parts, kind, run = [], "text", []
        for token in [*tokens, None]:
            if token is None or token in markup:
                if run:
                    parts.append({"type": kind, "text": self.decode(run)})
                kind, run = markup.get(token, kind), []
            else:
                run.append(token)
        if all(p["type"] == "text" for p in parts):
            return "".join(p["text"] for p in parts)
        return parts

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Render a conversation whose last message is the user's, ending in <|assistant_start|> for generation.

        A trailing assistant message (e.g. a task's reference answer) is dropped first.
        """
        messages = list(conversation["messages"])
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1].get("role") != "user":
            raise UserError("render_for_completion needs a conversation that ends with a user message")
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=1 << 30)
        return ids + [self.encode_special("<|assistant_start|>")]

    def render_within(self, conversation: dict, max_tokens: int) -> tuple[list[int], int]:
        """`render_for_completion` of the conversation, dropping its oldest turns (a user message and the reply to
        it) until the prompt is at most `max_tokens`; a leading system message and the last user message are always
        kept. Returns the prompt and how many messages were dropped. The CLI and the server share this rule, as
        ollama and llama.cpp's server do: a conversation that outgrows the context loses its beginning, never its
        end."""
        messages = list(conversation["messages"])
        system = messages[:1] if messages and messages[0].get("role") == "system" else []
        turns, dropped = messages[len(system):], 0
        while True:
            ids = self.render_for_completion({"messages": system + turns})
            if len(ids) <= max_tokens:
                return ids, dropped
            users = [i for i, m in enumerate(turns) if m.get("role") == "user"]
            if len(users) < 2:
                raise UserError(f"the last message{' with the system prompt' if system else ''} is {len(ids)} "
                                f"tokens, more than the {max_tokens} this model can take as a prompt: shorten it")
            dropped += users[1]
            turns = turns[users[1]:]


class _DataOnlyUnpickler(pickle.Unpickler):
    """tokenizer.pkl holds a dict of bytes, ints and a str, which need no class: refusing every class means a
    tampered file cannot run code when it is loaded."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names the class {module}.{name}, which a tokenizer file never holds")


def _merge_system_message(conversation: dict) -> list[dict]:
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise UserError("a conversation is {'messages': [...]} with at least one message")
    if messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise UserError("a system message must be followed by a user message")
        merged = dict(messages[1])
        merged["content"] = f"{messages[0]['content']}\n\n{messages[1]['content']}"
        messages = [merged] + list(messages[2:])
    return messages


def _assistant_parts(content, index: int) -> list[dict]:
    if isinstance(content, str):  # may be empty: the turn is then just <|assistant_start|><|assistant_end|>
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise UserError(f"conversation message {index} (assistant) must be a string or a list of parts")
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output"):
            raise UserError(f"conversation message {index} has an unknown part {part!r}: "
                            "parts are {'type': 'text'|'python'|'python_output', 'text': str}")
        if not isinstance(part.get("text"), str):
            raise UserError(f"conversation message {index} has a part without string 'text': {part!r}")
    return content


def tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"


def get_tokenizer() -> Tokenizer:
    """The tokenizer trained by `python -m scripts.tok_train` into <base_dir>/tokenizer."""
    return Tokenizer.from_directory(tokenizer_dir())


def get_token_bytes(device: torch.device | str = "cpu") -> torch.Tensor:
    path = tokenizer_dir() / "token_bytes.pt"
    if not path.exists():
        raise UserError(f"no {path}: train the tokenizer with `python -m scripts.tok_train`")
    return torch.load(path, map_location=device, weights_only=True)


def iter_capped(texts: Iterable[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Documents capped at doc_cap characters, stopping once max_chars characters have been yielded."""
    total = 0
    for text in texts:
        text = text[:doc_cap]
        total += len(text)
        yield text
        if total >= max_chars:
            return
