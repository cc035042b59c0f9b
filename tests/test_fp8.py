"""Optional fp8 training (torchao): which layers it converts (the LM head too, not the small gates), evaluation with
fp8 switched off, a clear refusal where it cannot run, and a real training step where it can."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat.fp8 import fp8_disabled, fp8_linear_names, fp8_unavailable_reason, is_fp8_linear
from nanochat.gpt import GPT, GPTConfig, Linear
from test_base_train import TRAIN, train_env  # noqa: F401 (a fixture)

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
    assert enable_fp8_training(model) == 2 * 6 + 1  # q, k, v, proj, fc, mlp proj per block and the LM head
    assert is_fp8_linear(model.lm_head) and not is_fp8_linear(model.blocks[1].attn.ve_gate)
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


class Float8Linear(Linear):
    """Stands in for torchao's Float8Linear on a CPU (same class name, same weight): counts its forward calls."""
    calls = 0

    def forward(self, x):
        Float8Linear.calls += 1
        return F.linear(x, self.weight.to(x.dtype))


def convert_like_torchao(model) -> int:
    """What torchao's convert_to_float8_training does with enable_fp8_training's filter: swap the chosen layers."""
    for name in fp8_linear_names(model):
        parent_name, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        new = Float8Linear(old.in_features, old.out_features).to(old.weight.device)
        new.weight = old.weight
        setattr(model.get_submodule(parent_name), attr, new)
    return len(fp8_linear_names(model))


def small_gpt() -> GPT:
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, smear=True)
    model = GPT(config)
    model.init_weights()
    return model


def test_fp8_converts_the_block_matrices_and_the_lm_head_but_not_the_small_gates():
    names = fp8_linear_names(small_gpt())
    per_block = ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert sorted(names) == sorted([f"blocks.{i}.{m}" for i in range(2) for m in per_block] + ["lm_head"])


def test_with_fp8_disabled_the_model_holds_plain_layers_on_the_same_weights_and_gets_them_back():
    model = small_gpt()
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        expected = model(x)
    convert_like_torchao(model)
    converted = {name: m for name, m in model.named_modules() if is_fp8_linear(m)}
    assert "lm_head" in converted and len(converted) == 13
    with fp8_disabled(model), torch.no_grad():
        assert not any(is_fp8_linear(m) for m in model.modules())
        assert model.lm_head.weight is converted["lm_head"].weight  # shared, not copied
        calls = Float8Linear.calls
        assert torch.equal(model(x), expected)
        assert Float8Linear.calls == calls
    assert {name: m for name, m in model.named_modules() if is_fp8_linear(m)} == converted


@pytest.mark.slow  # a real base_train run on mirror text: about a minute on 2 shared cores
def test_base_train_with_fp8_evaluates_and_samples_with_fp8_off(train_env, monkeypatch):  # noqa: F811
    """base_train --fp8 on a CPU, with torchao's conversion stood in for: training steps go through the converted
    layers, val bpb and the samples see a model without them."""
    import scripts.base_train as base_train
    for key in ("NANOCHAT_MIRROR", "NANOCHAT_DATASET", "NANOCHAT_DTYPE", "NANOCHAT_BASE_DIR"):
        monkeypatch.setenv(key, train_env[key])
    monkeypatch.setattr(base_train, "fp8_unavailable_reason", lambda: None)
    monkeypatch.setattr(base_train, "enable_fp8_training", convert_like_torchao)
    seen = []

    def watching(name, evaluate):
        def run(model, *args, **kwargs):
            seen.append((name, any(is_fp8_linear(m) for m in model.modules())))
            return evaluate(model, *args, **kwargs)
        return run
    monkeypatch.setattr(base_train, "evaluate_bpb", watching("val bpb", base_train.evaluate_bpb))
    monkeypatch.setattr(base_train, "print_samples", watching("samples", base_train.print_samples))
    Float8Linear.calls = 0
    base_train.main([*TRAIN, "--fp8", "--num-iterations=2", "--eval-every=1", "--sample-every=1", "--eval-tokens=256"])
    assert Float8Linear.calls > 0  # the training steps ran in "fp8"
    assert {name for name, _ in seen} == {"val bpb", "samples"}
    assert not any(fp8_on for _, fp8_on in seen), seen
