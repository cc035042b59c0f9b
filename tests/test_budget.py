"""Sizing runs/cpu.sh to a time budget: measured speeds in, step counts out (no timing here: speeds are given)."""

import os
import subprocess
from pathlib import Path

import pytest

from scripts.budget import DEFAULTS, FLOORS, Machine, Workload, plan_pipeline

REPO = Path(__file__).resolve().parents[1]
D4 = Workload(tokens_per_step=16 * 512, flops_per_token=3.8e7)  # d4, vocabulary 8192, batch 16×512
FAST = Machine(fp32_flops=600e9, compute_flops=2000e9, dtype="bf16")  # a CPU with AMX
SLOW = Machine(fp32_flops=120e9, compute_flops=120e9, dtype="fp32")  # no bf16, no AVX-512
BUDGET = 15 * 60


def test_a_slower_machine_gets_fewer_pretraining_steps():
    fast, slow = plan_pipeline(FAST, D4, BUDGET), plan_pipeline(SLOW, D4, BUDGET)
    assert slow.knobs["BASE_STEPS"] < fast.knobs["BASE_STEPS"]
    assert slow.train_tokens_per_s < fast.train_tokens_per_s


def test_the_plan_lands_near_the_budget_when_the_floors_allow_it():
    plan = plan_pipeline(FAST, D4, BUDGET)
    assert BUDGET * 0.95 <= plan.total_s <= BUDGET
    assert not plan.shrunk and plan.knobs["SFT_STEPS"] == DEFAULTS["SFT_STEPS"]


def test_a_longer_budget_buys_more_pretraining_only():
    short, long = plan_pipeline(FAST, D4, BUDGET), plan_pipeline(FAST, D4, 2 * BUDGET)
    assert long.knobs["BASE_STEPS"] > short.knobs["BASE_STEPS"]
    assert {k: v for k, v in long.knobs.items() if k != "BASE_STEPS"} == \
           {k: v for k, v in short.knobs.items() if k != "BASE_STEPS"}


def test_a_very_slow_machine_keeps_the_floors_and_shrinks_the_other_stages():
    crawl = Machine(fp32_flops=30e9, compute_flops=30e9, dtype="fp32")
    plan = plan_pipeline(crawl, D4, BUDGET)
    assert plan.knobs["BASE_STEPS"] == FLOORS["BASE_STEPS"]  # the loss must still fall clearly
    assert plan.shrunk and all(plan.knobs[k] >= FLOORS[k] for k in FLOORS)
    assert plan.knobs["SFT_STEPS"] < DEFAULTS["SFT_STEPS"]


def test_explicit_knobs_are_kept_and_the_rest_fits_around_them():
    free = plan_pipeline(SLOW, D4, BUDGET)
    fixed = plan_pipeline(SLOW, D4, BUDGET, {"BASE_STEPS": 37, "CHAT_PROBLEMS": 200})
    assert fixed.knobs["BASE_STEPS"] == 37 and fixed.knobs["CHAT_PROBLEMS"] == 200  # below the floor: still kept
    assert sorted(fixed.overridden) == ["BASE_STEPS", "CHAT_PROBLEMS"]
    fast = plan_pipeline(FAST, D4, BUDGET)
    assert plan_pipeline(FAST, D4, BUDGET, {"SFT_STEPS": 500}).knobs["BASE_STEPS"] < fast.knobs["BASE_STEPS"]
    assert free.knobs["CHAT_PROBLEMS"] <= DEFAULTS["CHAT_PROBLEMS"]


def test_expected_stage_times_cover_every_stage_and_add_up():
    plan = plan_pipeline(SLOW, D4, BUDGET)
    assert list(plan.stage_s) == ["data", "tok_train", "tok_eval", "base_train", "base_eval", "chat_sft", "sft_eval",
                                  "chat_rl", "rl_eval"]
    assert plan.total_s == pytest.approx(sum(plan.stage_s.values()))
    assert all(s > 0 for s in plan.stage_s.values())


def test_unknown_knobs_and_empty_budgets_are_errors():
    with pytest.raises(ValueError, match="unknown knob"):
        plan_pipeline(SLOW, D4, BUDGET, {"BASE_STEP": 10})
    with pytest.raises(ValueError, match="positive"):
        plan_pipeline(SLOW, D4, 0)


def run_cpu_sh(base_dir, **env):
    full = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), SKIP_SETUP="1", DRY_RUN="1", NANOCHAT_DTYPE="fp32", **env)
    proc = subprocess.run(["bash", "runs/cpu.sh"], cwd=REPO, env=full, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_cpu_sh_dry_run_prints_the_measurement_the_choice_and_each_stage(base_dir):
    proc = run_cpu_sh(base_dir, TIME_BUDGET_MIN="10", BASE_STEPS="150")
    assert "time budget 10 min; measured matmul: fp32" in proc.stderr
    assert "BASE_STEPS=150 (set)" in proc.stderr
    for stage in ("base_train", "chat_sft", "chat_rl", "rl_eval", "total"):
        assert f"expected {stage}" in proc.stderr
    assert "BASE_STEPS=150" in proc.stdout.splitlines() and "dry run: nothing was run" in proc.stdout
    assert not (base_dir / "stages" / "plan.json").exists()  # a dry run leaves nothing behind


def test_cpu_sh_rejects_a_bad_override_in_one_line(base_dir):
    full = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), SKIP_SETUP="1", DRY_RUN="1", BASE_STEPS="lots")
    proc = subprocess.run(["bash", "runs/cpu.sh"], cwd=REPO, env=full, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: --set 'BASE_STEPS=lots'" in proc.stderr


def test_without_dtype_the_plan_takes_the_compute_dtype_policy(monkeypatch):
    from scripts.budget import main
    from nanochat.common import UserError
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp16")  # what get_compute_dtype picks, and a dtype runs/cpu.sh has no plan for
    with pytest.raises(UserError, match="'fp16'"):
        main(["--minutes=1"])
