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
    assert "python -m nanochat.attention --require-fa3" in script  # FA3 or stop (ALLOW_SDPA=1 to go on)
    for stage in ("base_train", "base_eval", "chat_sft", "chat_eval", "chat_rl"):
        for line in (line for line in script.splitlines() if f"scripts.{stage} " in line):
            assert '"${DEVICE[@]}"' in line, line


def stub_setup(tmp_path: Path, gpu: bool) -> tuple[Path, dict]:
    """runs/setup.sh in a scratch copy of the repo whose .venv, python, pip (and nvidia-smi when `gpu`) are stubs
    that log their arguments: what setup would install, without installing anything."""
    root = tmp_path / "repo"
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "setup.sh").write_text((REPO / "runs" / "setup.sh").read_text())
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    for name in ["python", "pip", "bwrap"] + (["nvidia-smi"] if gpu else []):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        (bin_dir / name).chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"  # no real nvidia-smi from the machine's own PATH
    return log, dict(os.environ, PATH=path)


def test_setup_installs_the_gpu_extra_and_checks_attention_where_a_gpu_is(tmp_path):
    log, env = stub_setup(tmp_path, gpu=True)
    proc = subprocess.run(["bash", "runs/setup.sh"], cwd=log.parent / "repo", env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert "pip install -q -e .[gpu]" in calls
    assert "python -m nanochat.attention" in calls


def test_setup_adds_the_gpu_extra_to_the_ones_asked_for_and_not_without_a_gpu(tmp_path):
    for gpu, expected in ((True, "pip install -q -e .[dev,gpu]"), (False, "pip install -q -e .[dev]")):
        log, env = stub_setup(tmp_path / str(gpu), gpu=gpu)
        subprocess.run(["bash", "runs/setup.sh", "dev"], cwd=log.parent / "repo", env=env, check=True,
                       capture_output=True, timeout=60)
        calls = log.read_text().splitlines()
        assert expected in calls and ("python -m nanochat.attention" in calls) == gpu


def test_reference_speedrun_dry_run_checks_every_stage_of_the_references_recipe(base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), DRY_RUN="1")
    env.pop("NANOCHAT_MIRROR", None)
    proc = subprocess.run(["bash", "runs/speedrun_reference.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    train = next(line for line in out.splitlines() if line.startswith("+ python -m scripts.base_train "))
    for flag in ("--depth=24", "--target-param-data-ratio=8", "--window-pattern=SSSL",
                 "--device-batch-size=16", "--save-every=", "--resume-from-step=latest", "--keep-last=2"):
        assert flag in train
    # base_train refuses --fp8 where it cannot run, so a CPU's dry run checks the rest without it and says so
    assert "--fp8" in train or "this machine cannot train in fp8" in out
    assert 'FP8=(--fp8)' in (REPO / "runs" / "speedrun_reference.sh").read_text()
    assert "base_train d24 on karpathy/climbmix-400b-shuffle" in out  # the preset reaches every stage
    assert "n_embd                   1,536" in out and "window_pattern           SSSL" in out
    for stage in ("scripts.base_eval", "scripts.chat_sft", "scripts.chat_eval"):
        assert f"+ python -m {stage} --dry-run" in out
    sft = next(line for line in out.splitlines() if line.startswith("+ python -m scripts.chat_sft "))
    assert "--resume-from-step=latest" in sft and "--keep-last=2" in sft
    assert not (base_dir / "stages").exists()  # a dry run marks no stage as done
