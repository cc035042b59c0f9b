"""The shell pipelines: the GPU speedrun's every command validates its arguments in a dry run, on a CPU."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_speedrun_dry_run_checks_every_stage(base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), DRY_RUN="1")
    env.pop("NANOCHAT_MIRROR", None)
    proc = subprocess.run(["bash", "runs/speedrun.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.index("+ python -m scripts.preflight") < out.index("+ python -m scripts.base_train")  # the node first
    assert "preflight: ok" in out
    for stage in ("scripts.base_train", "scripts.base_eval", "scripts.chat_sft", "scripts.chat_eval",
                  "scripts.chat_rl"):
        assert f"+ python -m {stage} --dry-run" in out
    assert "n_embd                   1,280" in out  # d20
    assert "dry run: arguments and derived hyper-parameters are valid" in out
    assert "chat_sft dry run" in out and "chat_rl dry run: 467 steps" in out
    for stage in ("scripts.base_train", "scripts.chat_sft", "scripts.chat_rl"):  # every training stage resumes
        line = next(line for line in out.splitlines() if line.startswith(f"+ python -m {stage} "))
        assert "--save-every=" in line and "--resume-from-step=latest" in line and "--keep-last=2" in line
    assert not (base_dir / "stages").exists()  # a dry run marks no stage as done


def test_readme_opens_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1:lines.index("```")]
    assert [line.split("#")[0].strip() for line in block] == ["bash runs/cpu.sh", "bash runs/test.sh"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash runs/test.sh" in ci


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable CUDA GPU")
def test_speedrun_stages_ask_for_cuda_and_stop_without_a_usable_gpu(base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), DRY_RUN="1", DEVICE_TYPE="cuda")
    proc = subprocess.run(["bash", "runs/speedrun.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert "+ python -m scripts.base_train --dry-run --device-type=cuda " in proc.stdout
    assert "scripts.base_eval" not in proc.stdout  # the first stage stopped the run
    assert proc.stderr.strip().count("\n") == 0 and "no usable CUDA GPU" in proc.stderr, proc.stderr


def test_speedrun_runs_every_stage_on_cuda():
    script = (REPO / "runs" / "speedrun.sh").read_text()
    assert 'DEVICE_TYPE="${DEVICE_TYPE:-cuda}"' in script
    for stage in ("base_train", "base_eval", "chat_sft", "chat_eval", "chat_rl"):
        for line in (line for line in script.splitlines() if f"scripts.{stage} " in line):
            assert '"${DEVICE[@]}"' in line, line
