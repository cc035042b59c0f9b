"""base_train end to end on real mirror text: the loss falls, resume is exact, 2 processes equal 1, and the faults of a
long multi-process run (SIGKILL, a lost rank file, two nodes without a shared filesystem) lose nothing."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from nanochat.checkpoint import MARKER, checkpoint_dir, last_step, load_checkpoint, step_dir

TRAIN = ["--depth=2", "--head-dim=32", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=512",
         "--eval-tokens=512", "--sample-every=-1", "--model-tag=t2", "--warmup-steps=2"]


@pytest.fixture
def train_env(mirror, base_dir, tiny_tokenizer):
    tiny_tokenizer.save(base_dir / "tokenizer")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_MIRROR=str(mirror),
               NANOCHAT_DATASET="nanochat-mirror/docs-dictionary-sample", NANOCHAT_DTYPE="fp32", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "1"], env=env, check=True, capture_output=True)
    return env


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def command(*args, torchrun: bool = False) -> list[str]:
    return [*(TORCHRUN if torchrun else [sys.executable]), "-m", "scripts.base_train", *TRAIN, *args]


def run(env, *args, torchrun: bool = False, check: bool = True):
    proc = subprocess.run(command(*args, torchrun=torchrun), env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def losses(base, step):
    return [point[2] for point in load_checkpoint(checkpoint_dir("base", "t2"), step)["meta"]["curves"]["train_loss"]]


def test_training_on_real_text_lowers_the_loss_and_saves(train_env, base_dir):
    # rates at the reference batch, scaled by √(512 / 2^19) = 1/32 as the reference scales its flags: 0.04, 0.3, 0.01
    proc = run(train_env, "--num-iterations=30", "--eval-every=15", "--matrix-lr=1.28", "--embedding-lr=9.6",
               "--unembedding-lr=0.32")
    assert "tok/s" in proc.stdout and "ETA" in proc.stdout and "val bpb" in proc.stdout
    curve = losses(base_dir, 30)
    assert curve[-1] < curve[0] - 0.5
    report = json.loads((base_dir / "report" / "t2" / "base-model-training.json").read_text())
    assert report["curves"]["val_bpb"] and report["data"][0]["steps"] == 30
    assert report["data"][0]["val_bpb_tokens"] == 512  # the tokens evaluated, beside the number


def test_val_bpb_evaluates_the_references_token_count_unless_told_otherwise():
    from scripts.base_train import parse_args
    assert parse_args([]).eval_tokens == 80 * 2 ** 19  # 41.9M, the reference's


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
    assert "n_embd                   1,280" in proc.stdout and "total_batch_size" in proc.stdout
    # the window pattern is chosen in one place and printed: L on a CPU, where windows save nothing
    assert "window pattern L (default): on cpu without torch.compile a window is a dense mask" in proc.stdout


def test_a_two_process_run_killed_by_sigkill_resumes_to_the_same_losses_bit_for_bit(train_env, base_dir):
    args = ["--num-iterations=12", "--save-every=3", "--eval-every=-1"]
    run(train_env, *args, torchrun=True)
    full = losses(base_dir, 12)
    shutil.rmtree(checkpoint_dir("base", "t2"))
    proc = subprocess.Popen(command(*args, torchrun=True), env=train_env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    for line in proc.stdout:
        if "saved checkpoint" in line:  # the first save is marked: kill torchrun and both workers at once
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and last_step(checkpoint_dir("base", "t2")) < 12
    resumed = run(train_env, *args, "--resume-from-step=latest", torchrun=True)
    assert "resumed from" in resumed.stdout
    assert losses(base_dir, 12) == full


def test_a_checkpoint_missing_a_rank_file_is_never_resumed_from(train_env, base_dir):
    args = ["--num-iterations=4", "--save-every=2", "--eval-every=-1"]
    run(train_env, *args, torchrun=True)
    full = losses(base_dir, 4)
    (step_dir(checkpoint_dir("base", "t2"), 4) / "rank1.pt").unlink()
    proc = run(train_env, *args, "--resume-from-step=latest", torchrun=True)
    assert "rank1.pt is missing" in proc.stderr and "step 2" in proc.stdout.split("resumed from")[1].splitlines()[0]
    assert losses(base_dir, 4) == full


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_their_own_disks_each_save_a_complete_checkpoint(train_env, base_dir, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:  # each "node" has its own copy of the tokenizer and data, and no view of the other's disk
        shutil.copytree(base_dir, node)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={i}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
                               "scripts.base_train", *TRAIN, "--num-iterations=2", "--eval-every=-1"],
                              env=dict(train_env, NANOCHAT_BASE_DIR=str(node)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, node in enumerate(nodes)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    for i, node in enumerate(nodes):
        folder = node / "base_checkpoints" / "t2" / "step_000002"
        assert sorted(f.name for f in folder.iterdir()) == sorted([MARKER, "meta.json", "model.safetensors",
                                                                   f"rank{i}.pt"])
        ckpt = load_checkpoint(folder.parent, 2, rank=i, world_size=2)
        assert ckpt["meta"]["provenance"]["world_size"] == 2 and len(ckpt["rank_states"]) == 1
    # one process cannot re-shard from node 0's folder alone: one line saying what to do
    env0 = dict(train_env, NANOCHAT_BASE_DIR=str(nodes[0]))
    proc = run(env0, "--num-iterations=3", "--eval-every=-1", "--resume-from-step=latest", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "resume with 2 processes" in proc.stderr
    # with node 1's rank file copied over, it re-shards the optimizer state and continues
    shutil.copy(nodes[1] / "base_checkpoints/t2/step_000002/rank1.pt", nodes[0] / "base_checkpoints/t2/step_000002")
    proc = run(env0, "--num-iterations=3", "--eval-every=-1", "--resume-from-step=latest")
    assert "re-sharded the training state of 2 processes for 1" in proc.stdout and "resumed from" in proc.stdout
    assert last_step(nodes[0] / "base_checkpoints" / "t2") == 3


def test_muon_eq_is_on_unless_turned_off_for_an_ablation():
    from scripts.base_train import parse_args
    assert parse_args([]).muon_eq and not parse_args(["--no-muon-eq"]).muon_eq
