"""The preflight: on a CPU its tiny version runs every check end to end, a failed line fails the command, and the
time and cost prediction follows from the run's planned tokens."""

import json
import sys

import pytest

from nanochat.scaling import Overrides, derive_hparams
from scripts import preflight
from scripts.preflight import CHECKS, Check, check_predict, check_versions, make_plan, parse_args, predict_run


def cpu_plan(*flags: str):
    return make_plan(parse_args(["--device-type=cpu", *flags]), "cpu")


@pytest.mark.slow  # every check, all-reduce and training in 2 gloo processes each: ~35 s, minutes when loaded
def test_cpu_preflight_runs_every_check_prints_the_table_and_writes_json(base_dir, tmp_path, capsys):
    out = tmp_path / "preflight.json"
    preflight.main(["--device-type=cpu", "--nproc=2", "--vocab-size=4096", "--decode-tokens=8", f"--json={out}"])
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    names = [c["name"] for c in report["checks"]]
    assert names == [name for name in CHECKS if name != "decode"] + ["decode_b1", "decode_b32"]
    assert report["verdict"] == "ok" and {c["verdict"] for c in report["checks"]} == {"ok"}
    for check in report["checks"]:
        assert any(line.split()[:2] == [check["name"], "ok"] for line in table.splitlines()), check["name"]
    values = {c["name"]: c["values"] for c in report["checks"]}
    assert values["allreduce"]["backend"] == "gloo" and values["allreduce"]["correct"]
    assert values["allreduce"]["bus_gb_s"] > 0
    assert values["train"]["processes"] == 2 and len(values["train"]["losses"]) == 2 + 2  # warm-up + timed
    assert values["train"]["tokens_per_s"] > 0 and 0 < values["train"]["mfu"] < 1
    assert values["predict"]["planned_tokens"] == report["hyperparams"]["num_iterations"] * 2 * 256 * 2
    assert values["predict"]["gpus"] == 2
    assert values["decode_b32"]["batch"] == 32 and values["decode_b32"]["steps"] == 8
    assert "capture not applicable on cpu" in table
    assert "preflight: ok" in table


def test_a_failed_line_makes_nanochat_preflight_exit_nonzero(base_dir, tmp_path, monkeypatch, capsys):
    from scripts import cli
    out = tmp_path / "preflight.json"
    monkeypatch.setattr(sys, "argv", ["nanochat", "preflight", "--device-type=cpu", "--min-free-gib=1e9",
                                      "--skip", "compile", "allreduce", "train", "predict", "decode",
                                      f"--json={out}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    table = capsys.readouterr().out
    assert any(line.split()[:2] == ["gpus", "FAIL"] for line in table.splitlines())
    assert "below --min-free-gib=1e+09" in table and "preflight: FAIL" in table
    report = json.loads(out.read_text())
    assert report["verdict"] == "FAIL"
    assert [(c["name"], c["verdict"]) for c in report["checks"]] == [("versions", "ok"), ("gpus", "FAIL"),
                                                                     ("attention", "ok")]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a usable CUDA GPU")
def test_a_cuda_request_without_a_usable_gpu_fails_at_once(base_dir, tmp_path, capsys):
    out = tmp_path / "preflight.json"
    with pytest.raises(SystemExit) as exit_info:
        preflight.main(["--device-type=cuda", f"--json={out}"])
    assert exit_info.value.code == 1
    report = json.loads(out.read_text())
    assert [(c["name"], c["verdict"]) for c in report["checks"]] == [("versions", "FAIL"), ("gpus", "FAIL")]
    assert "torch sees no usable CUDA GPU" in capsys.readouterr().out


def failing_rank(compute):
    raise RuntimeError("out of memory at --device-batch-size=32: lower it")


def test_a_failing_process_of_a_measurement_becomes_its_fail_line():
    (check,) = preflight.timed("train", preflight.run_in_group, failing_rank, 1, "cpu")
    assert check.verdict == "FAIL"
    assert check.detail == "RuntimeError: out of memory at --device-batch-size=32: lower it"


def test_predicted_time_and_cost_scale_with_tokens_gpus_and_price():
    seconds, usd = predict_run(planned_tokens=8 * 10 ** 9, tokens_per_s_per_gpu=125_000, gpus=8,
                               usd_per_gpu_hour=3.0)
    assert seconds == pytest.approx(8e9 / 1e6)  # 8,000 s
    assert usd == pytest.approx(8000 / 3600 * 8 * 3.0)  # $53.33: 8 GPUs for 2.22 hours
    with pytest.raises(ValueError, match="positive rate"):
        predict_run(10, 0.0, 8, 3.0)


def test_prediction_uses_the_runs_planned_tokens():
    """The speedrun's d20 at ratio 10.5 on 8 GPUs: its planned tokens (steps × batch) at the measured rate."""
    plan = make_plan(parse_args(["--nproc=8", "--usd-per-gpu-hour=2.5"]), "cuda")
    hp = derive_hparams(20, Overrides(target_param_data_ratio=10.5), world_size=8)
    train = Check("train", "ok", "", {"tokens_per_s": 50_000.0})
    predicted = check_predict(plan, hp, train)
    tokens = hp.num_iterations * hp.total_batch_size
    assert tokens == pytest.approx(10.5 * hp.scaling_params, rel=0.01)
    assert predicted.verdict == "ok" and predicted.values["planned_tokens"] == tokens
    assert predicted.values["seconds"] == pytest.approx(tokens / (50_000 * 8))
    assert predicted.values["usd"] == pytest.approx(tokens / (50_000 * 8) / 3600 * 8 * 2.5)
    assert check_predict(plan, hp, Check("train", "FAIL", "out of memory")).verdict == "FAIL"


def test_gpus_that_torch_cannot_use_fail_the_versions_line(monkeypatch):
    """A driver too old for the torch wheel: nvidia-smi lists the GPUs, torch sees none (the run would go to CPU)."""
    monkeypatch.setattr(preflight, "nvidia_smi", lambda *args: ["GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"])
    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: False)
    check = check_versions(cpu_plan())
    assert check.verdict == "FAIL" and "torch cannot use them" in check.detail
    monkeypatch.setattr(preflight, "nvidia_smi", lambda *args: [])
    assert check_versions(cpu_plan()).verdict == "ok"


def test_defaults_are_the_speedrun_on_cuda_and_a_tiny_run_on_cpu():
    plan = make_plan(parse_args(["--device-type=cuda", "--nproc=8"]), "cuda")
    assert plan.nproc == 8 and plan.depth == 20 and plan.device_batch_size == 32 and plan.sequence_len == 2048
    assert cpu_plan().depth == 2 and cpu_plan().total_batch_size == 2 * 256  # the tiny CPU version


@pytest.mark.slow  # the speedrun's whole dry run: ~30 s
def test_speedrun_skips_the_preflight_with_skip_preflight(base_dir):
    import os
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), DRY_RUN="1", SKIP_PREFLIGHT="1")
    env.pop("NANOCHAT_MIRROR", None)
    proc = subprocess.run(["bash", "runs/speedrun.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "scripts.preflight" not in proc.stdout and "+ python -m scripts.base_train --dry-run" in proc.stdout
