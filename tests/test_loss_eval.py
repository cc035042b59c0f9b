"""Evaluation sums: float64 where the device has it, float32 on Apple MPS, which has no float64."""

import torch

from nanochat.loss_eval import accumulator_dtype


def test_accumulators_are_float64_except_on_mps():
    assert accumulator_dtype("cpu") == torch.float64
    assert accumulator_dtype(torch.device("cuda", 0)) == torch.float64
    assert accumulator_dtype("mps") == torch.float32
    assert accumulator_dtype(torch.device("mps")) == torch.float32
