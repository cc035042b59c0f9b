"""Optional fp8 training (torchao): a clear refusal where it cannot run, a real training step where it can."""

import os
import subprocess
import sys

import pytest
import torch

from nanochat.fp8 import fp8_unavailable_reason

FP8_REASON = fp8_unavailable_reason()


@pytest.mark.skipif(FP8_REASON is None, reason="this machine can train in fp8")
def test_fp8_where_it_cannot_run_is_refused_in_one_line_before_training(base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--depth=2", "--fp8", "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "--fp8" in proc.stderr
    assert "not training" not in proc.stdout  # refused before the dry run's own end


@pytest.mark.skipif(FP8_REASON is not None, reason=f"fp8 training unavailable: {FP8_REASON}")
def test_fp8_converts_the_block_matrices_and_a_step_lowers_the_loss():
    from nanochat.checkpoint import build_model
    from nanochat.fp8 import enable_fp8_training
    from nanochat.gpt import GPTConfig
    config = GPTConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = build_model(config, "cuda")
    assert enable_fp8_training(model) == 2 * 6  # q, k, v, proj, fc, mlp proj per block; the 12-wide gate stays
    optimizer = model.setup_optimizer()
    x = torch.randint(0, 512, (4, 128), device="cuda")
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
