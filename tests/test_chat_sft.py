"""SFT: only the assistant's tokens are supervised; a tiny run lowers that loss; resume continues exactly."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint import checkpoint_dir, load_checkpoint, build_model
from nanochat.sft_data import SFTLoader
from scripts.chat_sft import sft_lr_multiplier

TOOL_CONVERSATION = {"messages": [
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Computing "}, {"type": "python", "text": "6*7"},
                                      {"type": "python_output", "text": "42"}, {"type": "text", "text": "so 42."}]}]}


class OneConversation:
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return TOOL_CONVERSATION


def test_only_assistant_tokens_and_tool_calls_are_targets(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask = tok.render_conversation(TOOL_CONVERSATION)
    x, y = next(iter(SFTLoader(OneConversation(), tok, batch_size=1, seq_len=len(ids) * 2 - 1)))
    row = y[0].tolist()
    supervised = [t for t in row if t >= 0]
    expected = [ids[i] for i in range(1, len(ids)) if mask[i] == 1]
    assert supervised[:len(expected)] == expected  # two copies packed in the row, each supervised the same way
    decoded = tok.decode([t for t in supervised[:len(expected)]])
    assert "Computing" in decoded and "6*7" in decoded and "42" not in decoded.replace("so 42.", "")
    assert tok.encode_special("<|output_start|>") not in supervised
    assert tok.encode("What is 6*7?")[0] not in supervised[:2]


def test_padding_never_contributes_to_the_loss(tiny_tokenizer):
    loader = SFTLoader(OneConversation(), tiny_tokenizer, batch_size=2, seq_len=200)
    x, y = next(iter(loader))
    n = len(tiny_tokenizer.render_conversation(TOOL_CONVERSATION)[0])
    per_row = 200 // n  # whole conversations only, then padding
    assert (y[:, per_row * n:] == -1).all()


def test_lr_schedule_is_flat_then_decays_and_never_runs_backwards():
    values = [sft_lr_multiplier(s, 50) for s in range(50)]
    assert values[:25] == [1.0] * 25
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] < 0.1


@pytest.fixture
def sft_env(mirror, tiny_checkpoint, base_dir):
    return dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_MIRROR=str(mirror), OMP_NUM_THREADS="1")


SFT = ["--device-batch-size=4", "--max-seq-len=128", "--eval-every=-1", "--eval-steps=2", "--init-lr-frac=30",
       "--spelling-size=200", "--simple-spelling-size=200"]


def run_sft(env, *args):
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_sft", *SFT, *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def supervised_loss(model, batches):
    with torch.no_grad():
        return sum(model(x, y).item() for x, y in batches) / len(batches)


def test_tiny_sft_lowers_the_loss_on_its_training_conversations(sft_env, base_dir, tiny_tokenizer):
    proc = run_sft(sft_env, "--num-iterations=12")
    assert "offline: SmolTalk → HH-RLHF" in proc.stdout.splitlines()[0]
    from scripts.chat_sft import build_mixture
    os.environ["NANOCHAT_MIRROR"] = sft_env["NANOCHAT_MIRROR"]
    mixture, _ = build_mixture([], 200, 200)
    loader = iter(SFTLoader(mixture, tiny_tokenizer, 4, 128))
    batches = [next(loader) for _ in range(12)]
    base = load_checkpoint(checkpoint_dir("base", "d2"), 1)
    sft = load_checkpoint(checkpoint_dir("sft", "d2"), 12)
    before = supervised_loss(build_model(base["meta"]["model_config"], "cpu", base["model"]), batches)
    after = supervised_loss(build_model(sft["meta"]["model_config"], "cpu", sft["model"]), batches)
    assert after < before - 0.3
    assert (base_dir / "report" / "chat-sft.json").exists()


def test_sft_resume_continues_exactly(sft_env, base_dir):
    run_sft(sft_env, "--num-iterations=4", "--save-every=2")
    full = load_checkpoint(checkpoint_dir("sft", "d2"), 4)["model"]
    shutil.rmtree(checkpoint_dir("sft", "d2") / "step_000004")
    proc = run_sft(sft_env, "--num-iterations=4", "--save-every=2", "--resume-from-step=latest")
    assert "resumed SFT from step 2" in proc.stdout
    resumed = load_checkpoint(checkpoint_dir("sft", "d2"), 4)["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)
