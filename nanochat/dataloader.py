"""BOS-aligned best-fit packing of tokenized documents into (B, T) training rows, with exact resume.

Every row of T+1 tokens starts at the <|bos|> of a document. The rest of the row is filled from a buffer of
tokenized documents by repeatedly taking the largest document that still fits; only when none fits is the shortest
one cropped to fill the row exactly. No padding, so every target is a real next token. As in the reference, the
buffer holds at least 1,000 documents and is topped up 128 at a time (which documents a row can draw from, so the
val bpb of one model, depend on both numbers).
"""

import random
from bisect import bisect_right, insort
from concurrent.futures import ThreadPoolExecutor

import torch

from nanochat.dataset import read_row_group, row_groups


class PackedLoader:
    """Yields (inputs, targets) int64 tensors of shape (B, T) forever, cycling epochs over the split's row groups.

    Row groups are dealt to ranks (rank::world_size) after a per-epoch shuffle with `seed` (none for "val": a fixed
    order keeps val bpb comparable between runs), so ranks read disjoint data. `state_dict()` taken after any batch, loaded into a fresh loader, continues with exactly the same batches.
    """

    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str, device: torch.device | str = "cpu",
                 dataset: str | None = None, rank: int = 0, world_size: int = 1, buffer_docs: int = 1000,
                 seed: int = 0, tokenizer_threads: int = 4, refill_docs: int = 128):
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.B, self.T = batch_size, seq_len
        self.device = torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.buffer_docs, self.refill_docs = buffer_docs, refill_docs
        self.threads = tokenizer_threads
        self.units = row_groups(split, dataset)
        # validation reads its row groups in file order, so val bpb covers the same tokens in every run
        self.shuffle = split != "val"
        # resumable state: position in the unit stream + the buffer of not-yet-used documents
        self.epoch, self.cursor = 0, 0
        self.lengths: list[tuple[int, int]] = []  # sorted (length, doc id) of buffered documents
        self.docs: dict[int, list[int]] = {}
        self.pending: list[list[int]] = []  # tokenized documents of the current unit not yet in the buffer
        self.next_id = 0
        self.tokens_read = 0
        self.tokens_cropped = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._prefetch = None  # (epoch, cursor, future) of the next unit being tokenized in the background

    # --- the unit stream ---------------------------------------------------------------------------------------------

    def _epoch_units(self, epoch: int) -> list:
        order = list(self.units)
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
        mine = order[self.rank::self.world_size]
        return mine or order[self.rank % len(order):][:1]

    def _tokenize(self, epoch: int, cursor: int) -> list[list[int]]:
        shard, group = self._epoch_units(epoch)[cursor]
        return self.tokenizer.encode(read_row_group(shard, group), prepend=self.bos, num_threads=self.threads)

    def _advance(self, epoch: int, cursor: int) -> tuple[int, int]:
        cursor += 1
        if cursor >= len(self._epoch_units(epoch)):
            return epoch + 1, 0
        return epoch, cursor

    def _next_unit_docs(self) -> list[list[int]]:
        """Tokens of the unit at the cursor (prefetched in the background), then start tokenizing the one after."""
        if self._prefetch and self._prefetch[:2] == (self.epoch, self.cursor):
            docs = self._prefetch[2].result()
        else:
            docs = self._tokenize(self.epoch, self.cursor)
        self.epoch, self.cursor = self._advance(self.epoch, self.cursor)
        self._prefetch = (self.epoch, self.cursor, self._pool.submit(self._tokenize, self.epoch, self.cursor))
        return docs

    def _refill(self) -> None:
        while len(self.lengths) < self.buffer_docs:
            if not self.pending:
                self.pending = self._next_unit_docs()
            for doc in self.pending[:self.refill_docs]:
                self._add(doc)
            del self.pending[:self.refill_docs]

    def _add(self, doc: list[int]) -> None:
        self.docs[self.next_id] = doc
        insort(self.lengths, (len(doc), self.next_id))
        self.next_id += 1

    def _take(self, index: int) -> list[int]:
        _, doc_id = self.lengths.pop(index)
        return self.docs.pop(doc_id)

    # --- packing -------------------------------------------------------------------------------------------------------

    def _pack_row(self) -> list[int]:
        row: list[int] = []
        need = self.T + 1
        while need > 0:
            self._refill()
            fit = bisect_right(self.lengths, (need, float("inf"))) - 1  # largest document with length <= need
            if fit >= 0:
                doc = self._take(fit)
                self.tokens_read += len(doc)
            else:  # nothing fits: crop the shortest document to fill the row
                doc = self._take(0)
                self.tokens_read += len(doc)
                self.tokens_cropped += len(doc) - need
                doc = doc[:need]
            row.extend(doc)
            need -= len(doc)
        return row

    def __iter__(self):
        while True:
            rows = torch.tensor([self._pack_row() for _ in range(self.B)], dtype=torch.long)  # (B, T+1)
            if self.device.type == "cuda":
                rows = rows.pin_memory().to(self.device, non_blocking=True)
            elif self.device.type != "cpu":
                rows = rows.to(self.device)
            yield rows[:, :-1], rows[:, 1:]

    # --- resume ---------------------------------------------------------------------------------------------------------

    @property
    def stats(self) -> dict:
        return {"tokens_read": self.tokens_read, "tokens_cropped": self.tokens_cropped,
                "crop_fraction": self.tokens_cropped / max(1, self.tokens_read), "epoch": self.epoch}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "next_id": self.next_id,
                "buffer": [(doc_id, self.docs[doc_id]) for _, doc_id in self.lengths], "pending": list(self.pending),
                "tokens_read": self.tokens_read, "tokens_cropped": self.tokens_cropped,
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"loader state is for rank {state['rank']} of {state['world_size']}, "
                             f"not rank {self.rank} of {self.world_size}: resume with the same number of processes")
        self.epoch, self.cursor, self.next_id = state["epoch"], state["cursor"], state["next_id"]
        self.tokens_read, self.tokens_cropped = state["tokens_read"], state["tokens_cropped"]
        self.docs = {doc_id: list(doc) for doc_id, doc in state["buffer"]}
        self.lengths = sorted((len(doc), doc_id) for doc_id, doc in self.docs.items())
        self.pending = [list(doc) for doc in state.get("pending", [])]
        self._prefetch = None


def stream_ids(rank: int, world_size: int, accum: int) -> list[int]:
    """The global data streams of process `rank`'s `accum` micro-batches: world_size × accum streams in all, process
    r reading r·accum … r·accum + accum − 1, so a step's data does not depend on how it is split over processes and
    gradient accumulation (and a checkpoint's streams can be handed to another number of processes)."""
    return [rank * accum + i for i in range(accum)]


def micro_batch_loaders(make_loader, rank: int, world_size: int, accum: int) -> list:
    """One loader per micro-batch of this process: `make_loader(rank=stream, world_size=streams)` for each of its
    streams (see stream_ids)."""
    return [make_loader(rank=stream, world_size=world_size * accum) for stream in stream_ids(rank, world_size, accum)]
