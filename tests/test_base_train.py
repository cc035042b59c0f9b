"""base_train end to end on real mirror text: the loss falls, resume is exact, 2 processes equal 1."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from nanochat.checkpoint import checkpoint_dir, load_checkpoint

TRAIN = ["--depth=2", "--head-dim=32", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=512",
         "--eval-tokens=512", "--sample-every=-1", "--model-tag=t2", "--warmup-steps=2"]


@pytest.fixture
def train_env(mirror, base_dir, tiny_tokenizer):
    tiny_tokenizer.save(base_dir / "tokenizer")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_MIRROR=str(mirror),
               NANOCHAT_DATASET="nanochat-mirror/docs-dictionary-sample", NANOCHAT_DTYPE="fp32", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "1"], env=env, check=True, capture_output=True)
    return env


def run(env, *args, torchrun: bool = False):
    command = [sys.executable, "-m", "scripts.base_train", *TRAIN, *args]
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                   "scripts.base_train", *TRAIN, *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def losses(base, step):
    return [point[2] for point in load_checkpoint(checkpoint_dir("base", "t2"), step)["meta"]["curves"]["train_loss"]]


def test_training_on_real_text_lowers_the_loss_and_saves(train_env, base_dir):
    proc = run(train_env, "--num-iterations=30", "--eval-every=15", "--matrix-lr=0.04", "--embedding-lr=0.3",
               "--unembedding-lr=0.01")
    assert "tok/s" in proc.stdout and "ETA" in proc.stdout and "val bpb" in proc.stdout
    curve = losses(base_dir, 30)
    assert curve[-1] < curve[0] - 0.5
    report = json.loads((base_dir / "report" / "t2" / "base-model-training.json").read_text())
    assert report["curves"]["val_bpb"] and report["data"][0]["steps"] == 30


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(train_env, base_dir, tmp_path):
    flags = ["--num-iterations=6", "--save-every=3", "--eval-every=-1", "--smear", "--backout"]
    run(train_env, *flags)
    full = losses(base_dir, 6)
    config = load_checkpoint(checkpoint_dir("base", "t2"), 6)["meta"]["model_config"]
    assert config["smear"] and config["backout"]  # the flags reach the model and its checkpoint
    shutil.rmtree(checkpoint_dir("base", "t2") / "step_000006")
    proc = run(train_env, *flags, "--resume-from-step=latest")
    assert "resumed from" in proc.stdout
    assert losses(base_dir, 6) == full


def test_two_processes_match_one_process_with_accumulation(train_env, base_dir):
    # a clip threshold that binds: clipping each rank's gradient before averaging (a reference bug) would diverge
    run(train_env, "--num-iterations=4", "--eval-every=-1", "--grad-clip=0.01")
    single = losses(base_dir, 4)
    shutil.rmtree(checkpoint_dir("base", "t2"))
    proc = run(train_env, "--num-iterations=4", "--eval-every=-1", "--grad-clip=0.01", torchrun=True)
    assert "2 process(es)" in proc.stdout
    double = losses(base_dir, 4)
    assert max(abs(a - b) for a, b in zip(single, double)) < 1e-5


def test_bad_arguments_fail_before_training_with_one_line(train_env):
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--depth=2", "--head-dim=32",
                           "--max-seq-len=64", "--device-batch-size=3", "--total-batch-size=500"],
                          env=train_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "--total-batch-size" in proc.stderr


def test_missing_tokenizer_names_the_command(mirror, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--depth=2"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "scripts.tok_train" in proc.stderr


def test_dry_run_prints_the_derivation_without_inputs(base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--depth=20", "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "model_dim                1,280" in proc.stdout and "total_batch_size" in proc.stdout
