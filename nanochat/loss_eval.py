"""Evaluation sums: bits per byte (a tokenizer-independent loss, so models with different vocabularies compare
fairly), the accumulator dtype every evaluation sums in, and the padding of scored rows into one batch."""

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist


def accumulator_dtype(device) -> torch.dtype:
    """float64 for sums over a whole evaluation, except on Apple MPS, which has no float64 (float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@torch.no_grad()
def evaluate_bpb(model, batches: Iterator, steps: int, token_bytes: torch.Tensor, autocast=None) -> float:
    """Σ loss (nats) over targets that are real text / (ln 2 · Σ their UTF-8 bytes), summed over all ranks.

    Special tokens have 0 bytes and are left out of both sums; targets of -1 are ignored.
    """
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=accumulator_dtype(device), device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)
        if autocast is not None:
            with autocast():
                loss = model(x, y, loss_reduction="none").view(-1)  # (B*T,)
        else:
            loss = model(x, y, loss_reduction="none").view(-1)
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
        counted = nbytes > 0
        total_nats += (loss.to(total_nats.dtype) * counted).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())


def pad_rows(rows: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Token rows of different lengths as one (len(rows), longest) batch, right-padded with `pad_id` (the scores
    read only each row's own positions, so the padding never matters)."""
    x = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        x[i, :len(row)] = torch.tensor(row, device=device)
    return x
