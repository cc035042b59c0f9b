"""RL: a rollout with a real tool call in the loop, masks that keep forced tokens out of the update, the script and
its exact resume."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_model
from nanochat.checkpoint import checkpoint_dir, load_checkpoint, step_dir
from nanochat.engine import Engine
from nanochat.grpo import policy_gradient_loss, rollout_batch
from nanochat.grpo import rollout
from tasks.gsm8k import GSM8K


def overfit(model, sequence: list[int], steps: int = 150):
    """Teach the tiny model one sequence so greedy decoding reproduces it (a tool call, here)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.tensor([sequence])
    for _ in range(steps):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_rollout_runs_the_tool_and_update_touches_only_sampled_tokens(mirror, base_dir, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror))
    tok = tiny_tokenizer
    task = GSM8K("main", "train")
    natalia = next(i for i, row in enumerate(task.rows) if row["question"].startswith("Natalia sold clips to 48"))
    prompt = tok.render_for_completion(task[natalia])
    call = [tok.encode_special("<|python_start|>")] + tok.encode("48/2") + [tok.encode_special("<|python_end|>")]
    output = [tok.encode_special("<|output_start|>")] + tok.encode("24") + [tok.encode_special("<|output_end|>")]
    answer = tok.encode(" #### 72") + [tok.encode_special("<|assistant_end|>")]
    model = overfit(make_tiny_model(tok.get_vocab_size(), sequence_len=256), prompt + call + output + answer)
    engine = Engine(model, tok)
    result = rollout(engine, tok, task, natalia, num_samples=2, max_new_tokens=40, temperature=0.0, top_k=None, seed=0)
    sequence, mask = result["sequences"][0], result["masks"][0]
    completion = sequence[len(prompt):]
    assert completion[:len(call)] == call  # the model called the tool itself…
    forced = completion[len(call):len(call) + len(output)]
    assert tok.decode(forced[1:-1]) == "24"  # …and the sandbox's answer was written back
    assert mask[len(prompt) + len(call):len(prompt) + len(call) + len(output)] == [0] * len(output)
    assert result["rewards"].tolist() == [1.0, 1.0]  # GSM8K's own evaluate scores "#### 72"

    inputs, targets = rollout_batch(result["sequences"], result["masks"], tok.get_bos_token_id())
    logits = model(inputs).detach().requires_grad_(True)
    policy_gradient_loss(logits, targets, torch.tensor([1.0, -1.0]), int((targets >= 0).sum())).backward()
    grad_per_position = logits.grad[0].abs().sum(-1)  # (T,)
    sampled = torch.tensor(mask[1:], dtype=torch.bool)
    assert grad_per_position[~sampled].sum() == 0 and grad_per_position[sampled].sum() > 0


def test_chat_rl_script_runs_a_step_and_saves(mirror, tiny_checkpoint, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_MIRROR=str(mirror), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_rl", "--num-steps=2", "--examples-per-step=2",
                           "--num-samples=3", "--max-new-tokens=16", "--eval-every=1", "--eval-examples=2",
                           "--eval-k=2", "--init-lr-frac=1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "mean reward" in proc.stdout and "pass@2" in proc.stdout and "sampled tok/s" in proc.stdout
    assert "LRs 0.2/0.004/0.02 × 1.0, decaying to 0" in proc.stdout  # the reference's rates, not batch-scaled
    assert (base_dir / "chatrl_checkpoints" / "d2" / "step_000002" / "model.safetensors").exists()
    section = json.loads((base_dir / "report" / "d2" / "chat-rl.json").read_text())
    assert "GSM8K pass@1" in section["data"][0]


def test_chat_rl_resumes_its_full_state_exactly(mirror, tiny_checkpoint, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_MIRROR=str(mirror), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "scripts.chat_rl", "--num-steps=2", "--examples-per-step=2", "--num-samples=2",
            "--max-new-tokens=8", "--eval-every=-1", "--eval-examples=1", "--eval-k=1", "--init-lr-frac=1",
            "--save-every=1"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rl_dir = checkpoint_dir("rl", "d2")
    full = load_checkpoint(rl_dir, 2)["model"]
    assert "optimizer" in load_checkpoint(rl_dir, 1, rank=0)["rank_states"][0]
    shutil.rmtree(step_dir(rl_dir, 2))
    proc = subprocess.run(args + ["--resume-from-step=latest"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed RL from step 1" in proc.stdout
    resumed = load_checkpoint(rl_dir, 2)["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_samples_that_do_not_split_into_equal_passes_are_refused_in_one_line():
    from nanochat.common import UserError
    from scripts.chat_rl import main
    with pytest.raises(UserError, match="--num-samples=12 must be a multiple of --device-batch-size=8"):
        main(["--num-samples=12", "--device-batch-size=8", "--dry-run", "--device-type=cpu"])
    main(["--num-samples=16", "--device-batch-size=8", "--dry-run", "--device-type=cpu"])  # the reference's 2 passes
