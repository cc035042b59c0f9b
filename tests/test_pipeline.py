"""End to end: runs/cpu.sh at an even smaller scale produces every stage's checkpoint, report section and sane numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_pipeline_runs_every_stage(mirror, tmp_path):
    base = tmp_path / "nanochat"
    env = dict(os.environ)
    env.update({
        "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_MIRROR": str(mirror), "SKIP_SETUP": "1",
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "DEPTH": "2", "SEQ_LEN": "128", "VOCAB": "2048", "TOK_CHARS": "3000000", "BASE_STEPS": "30",
        "DEVICE_BATCH": "8", "SFT_STEPS": "10", "RL_STEPS": "2", "MAX_PER_TASK": "4", "CHAT_PROBLEMS": "4",
        "MAX_NEW_TOKENS": "16", "DATA_SHARDS": "2",
        "BASE_EVAL_EVERY": "15", "SAVE_EVERY": "15",
    })
    proc = subprocess.run(["bash", "runs/cpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "[budget] chosen: BASE_STEPS=30 (set)" in proc.stderr  # the plan is printed; set knobs are kept

    for phase in ("base_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"):
        steps = list((base / phase / "d2").glob("step_*"))
        assert steps, f"no checkpoint in {phase}"

    report = (base / "report" / "report.md").read_text()
    for section in ("Pipeline plan", "Tokenizer training", "Base model training", "Base model evaluation", "Chat SFT",
                    "Chat RL"):
        assert section in report, f"report lacks section {section!r}"
    assert list((base / "report" / "d2").glob("*.png")), "report has no plots"

    curves = json.loads((base / "report" / "d2" / "base-model-training.json").read_text())["curves"]["train_loss"]
    losses = [point[2] for point in curves]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], "pretraining loss did not fall"

    # Re-running is safe: every stage is skipped, nothing is redone or corrupted.
    again = subprocess.run(["bash", "runs/cpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "done already" in again.stdout

    # The README's closing command answers from the trained model.
    answer = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "Why is the sky blue?", "--max-tokens", "16"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.strip()


def test_cpu_pipeline_offline_without_mirror_stops_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_MIRROR", "NANOCHAT_DATASET")}
    env.update({"NANOCHAT_BASE_DIR": str(tmp_path / "nanochat"), "SKIP_SETUP": "1",
                "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
                # an address nothing listens on stands in for "no network"
                "HF_ENDPOINT": "http://127.0.0.1:9", "NANOCHAT_DOWNLOAD_RETRIES": "1"})
    proc = subprocess.run(["bash", "runs/cpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NANOCHAT_MIRROR" in errors[0], proc.stderr[-2000:]
