"""Batches for supervised fine-tuning: rendered conversations packed best-fit into rows, padded, never cropped.

Each row holds whole conversations (each starting with <|bos|>); the rest of the row is padding. Targets are -1
(ignored by the loss) on padding and on every token the assistant did not write (mask 0: the user's text, tool
outputs, the <|assistant_start|> markers). A conversation longer than a row is truncated to the row length when it
is rendered (the only case where tokens are dropped).

With `epochs` set, the loader reads its share of the task that many times and then only drains its buffer: training
stops on the counted end of the data (`finished`), and `progress` (conversations packed / share) drives the schedule.
"""

from bisect import bisect_right, insort

import torch

from nanochat import download
from nanochat.common import UserError
from tasks.arc import ARC
from tasks.chat import HHRLHF, CustomJSON, SmolTalk
from tasks.common import TaskMixture
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.spelling import SimpleSpelling, SpellingBee

SMOLTALK_FILE = ("HuggingFaceTB/smol-smoltalk", SmolTalk.FILES["train"][0])
DOLLY_FILE = "chat/dolly-hhrlhf-1k.jsonl"


def smoltalk_offline() -> bool:
    """Offline without SmolTalk (the mirror lacks it): the chat data is then the stand-in."""
    return download.offline() and not download.has(*SMOLTALK_FILE)


def sft_mixture(custom_json: list[str], spelling_size: int, simple_spelling_size: int, mmlu_epochs: int = 3,
                gsm8k_epochs: int = 4) -> tuple[TaskMixture, list[str]]:
    """The SFT task mixture and the stand-ins it uses (each a line the caller announces): offline without SmolTalk,
    HH-RLHF conversations (+ the mirror's Dolly/HH-RLHF JSONL) for the chat data and ARC train + MMLU dev for MMLU's
    auxiliary_train."""
    notes = []
    if smoltalk_offline():
        dolly = download.external_file_if_available(DOLLY_FILE)
        chat = [HHRLHF("harmless-base", "test")] + ([CustomJSON(str(dolly))] if dolly else [])
        mmlu = [ARC("ARC-Easy", "train"), ARC("ARC-Challenge", "train"), MMLU("all", "dev")]
        notes.append("offline: SmolTalk → HH-RLHF conversations" + (" + Dolly/HH-RLHF JSONL" if dolly else ""))
        notes.append("offline: MMLU auxiliary_train → ARC-Easy/Challenge train + MMLU dev")
    else:
        chat = [SmolTalk("train")]
        mmlu = [MMLU("auxiliary_train")]
    gsm8k = GSM8K("main", "train")
    tasks = chat + mmlu * mmlu_epochs + [gsm8k] * gsm8k_epochs + [SpellingBee(spelling_size, "train"),
                                                                  SimpleSpelling(simple_spelling_size, "train")]
    tasks += [CustomJSON(path) for path in custom_json]
    return TaskMixture(tasks), notes


def sft_validation() -> TaskMixture:
    return TaskMixture([GSM8K("main", "test", stop=200), MMLU("all", "validation", stop=200)])


class SFTLoader:
    """Yields (inputs, targets) (B, T) over a task's conversations rank::world_size: epoch after epoch, or for
    `epochs` epochs and then rows of padding only."""

    def __init__(self, task, tokenizer, batch_size: int, seq_len: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, buffer_size: int = 64, epochs: int | None = None):
        self.task, self.tokenizer = task, tokenizer
        self.B, self.T = batch_size, seq_len
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.buffer_size = buffer_size
        self.pad = tokenizer.get_bos_token_id()
        self.epoch, self.cursor = 0, rank
        self.buffer: list[tuple[int, int, list[int], list[int]]] = []  # sorted (length, order, ids, mask)
        self.order = 0
        self.tokens_supervised = 0
        self.epochs = epochs
        self.share = len(range(rank, len(task), world_size))  # conversations this loader reads per epoch
        if self.share == 0:
            raise UserError(f"{len(task)} conversations cannot feed {world_size} loaders: lower --total-batch-size "
                            "or use fewer processes")
        self.consumed = 0  # conversations packed into rows so far

    @property
    def progress(self) -> float:
        """Epochs of this loader's share packed so far (1.0 = every conversation once)."""
        return self.consumed / self.share

    @property
    def finished(self) -> bool:
        return self.epochs is not None and self.consumed >= self.epochs * self.share

    def _fill(self) -> None:
        n = len(self.task)
        while len(self.buffer) < self.buffer_size:
            if self.cursor >= n:
                if self.epochs is not None and self.epoch + 1 >= self.epochs:
                    return  # the last epoch is read: from here on the buffer only drains
                self.epoch += 1
                self.cursor = self.rank
            ids, mask = self.tokenizer.render_conversation(self.task[self.cursor], max_tokens=self.T + 1)
            self.cursor += self.world_size
            insort(self.buffer, (len(ids), self.order, ids, mask))
            self.order += 1

    def _row(self) -> tuple[list[int], list[int]]:
        ids, mask = [], []
        while True:
            self._fill()
            room = self.T + 1 - len(ids)
            fit = bisect_right(self.buffer, (room, float("inf"))) - 1
            if fit < 0:
                break
            _, _, conv_ids, conv_mask = self.buffer.pop(fit)
            self.consumed += 1
            ids += conv_ids
            mask += conv_mask
        pad = self.T + 1 - len(ids)
        return ids + [self.pad] * pad, mask + [0] * pad

    def __iter__(self):
        while True:
            rows, masks = zip(*(self._row() for _ in range(self.B)))
            ids = torch.tensor(rows, dtype=torch.long)  # (B, T+1)
            mask = torch.tensor(masks, dtype=torch.bool)
            targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
            self.tokens_supervised += int(mask[:, 1:].sum())
            yield ids[:, :-1].to(self.device), targets.to(self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "order": self.order, "buffer": list(self.buffer),
                "tokens_supervised": self.tokens_supervised, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.order = state["epoch"], state["cursor"], state["order"]
        self.buffer = sorted(tuple(b) for b in state["buffer"])
        self.tokens_supervised = state["tokens_supervised"]
        self.consumed = state.get("consumed", 0)
