"""chat_eval end to end on a tiny checkpoint with the mirror: accuracies, pass@k, ChatCORE, the report section."""

import json
import os
import subprocess
import sys

import pytest

from nanochat.chat_eval import (CHATCORE_TASKS, GENERATIVE_SIZES, MAX_NEW_TOKENS, chat_core, make_task,
                                planned_decode_steps, run_chat_eval, run_generative)


def test_chat_eval_runs_categorical_and_generative_tasks(mirror, tiny_checkpoint, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_MIRROR=str(mirror))
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-i", "sft", "-a", "ARC-Easy,GSM8K,SpellingBee",
                           "--max-problems", "4", "--max-new-tokens", "16", "-n", "2", "-t", "1.0"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for task in ("ARC-Easy", "GSM8K", "SpellingBee"):
        assert f"{task}" in proc.stdout
    assert "ChatCORE over 2/5 tasks" in proc.stdout  # SpellingBee is reported, not averaged in
    section = json.loads((base_dir / "report" / "d2" / "chat-evaluation-sft.json").read_text())
    settings, accuracies = section["data"]
    assert settings["num_samples"] == 2 and settings["max_new_tokens"] == 16
    assert 0.0 <= accuracies["ARC-Easy"] <= 1.0 and "GSM8K" in accuracies and "SpellingBee" in accuracies


def test_chatcore_is_the_five_tasks_centered_by_chance_without_spellingbee():
    assert CHATCORE_TASKS == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
    assert chat_core({"ARC-Easy": 0.25, "GSM8K": 0.0}) == 0.0
    assert chat_core({"MMLU": 1.0, "HumanEval": 1.0}) == 1.0
    assert chat_core({"ARC-Challenge": 0.625}) == pytest.approx(0.5)
    full = {"ARC-Easy": 0.625, "ARC-Challenge": 0.25, "MMLU": 0.4375, "GSM8K": 0.1, "HumanEval": 0.05}
    assert chat_core(full) == pytest.approx((0.5 + 0.0 + 0.25 + 0.1 + 0.05) / 5)
    assert chat_core({**full, "SpellingBee": 0.9}) == chat_core(full)


def test_generative_tasks_get_512_new_tokens_by_default():
    import inspect
    assert MAX_NEW_TOKENS == 512
    assert inspect.signature(run_chat_eval).parameters["max_new_tokens"].default == 512


class OneSampleInThreePasses:
    """Stands in for a generative task in this unit test only: of each problem's samples, only the second passes."""

    eval_type = "generative"

    def __init__(self):
        self.calls = {}

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": f"problem {i}"}, {"role": "assistant", "content": "x"}],
                "i": i}

    def evaluate(self, conv, completion):
        self.calls[conv["i"]] = self.calls.get(conv["i"], 0) + 1
        return self.calls[conv["i"]] == 2


def test_the_planned_decode_steps_count_the_generative_problems_of_one_rank():
    """What chat_eval weighs against compiling its CPU decode steps: every generative answer at full length, the
    problems split over the ranks; the categorical tasks decode nothing."""
    assert planned_decode_steps(["MMLU", "ARC-Easy"], None, 512) == 0
    assert planned_decode_steps(["GSM8K", "MMLU"], None, 512) == 1319 * 512
    assert planned_decode_steps(["GSM8K", "HumanEval"], 100, 128, world=3) == 67 * 128  # 200 problems over 3 ranks


def test_the_generative_sizes_are_the_tasks_test_sets(mirror):
    assert {name: len(make_task(name)) for name in GENERATIVE_SIZES} == GENERATIVE_SIZES


def test_num_samples_gives_pass_at_k(tiny_checkpoint, tiny_tokenizer):
    from nanochat.engine import Engine
    engine = Engine(tiny_checkpoint, tiny_tokenizer)
    task = OneSampleInThreePasses()
    assert run_generative(task, engine, tiny_tokenizer, [0, 1], 3, 4, 1.0, 50) == [True, True]
    assert task.calls == {0: 3, 1: 3}
    assert run_generative(OneSampleInThreePasses(), engine, tiny_tokenizer, [0, 1], 1, 4, 1.0, 50) == [False, False]


def test_unknown_task_is_a_clear_error(tiny_checkpoint, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-a", "TriviaQA"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "unknown task 'TriviaQA'" in proc.stderr


def test_code_tasks_without_a_sandbox_stop_and_name_the_flag_instead_of_scoring_zero(monkeypatch, capsys):
    from nanochat.common import UserError
    from nanochat.sandbox import execution
    from nanochat.sandbox.execution import UNSAFE_ENV
    from scripts.chat_eval import main
    monkeypatch.setattr(execution, "detect", lambda: (None, "bubblewrap is not installed"))
    monkeypatch.setenv(UNSAFE_ENV, "0")  # restored after the test, whatever --unsafe-python-tool sets
    with pytest.raises(UserError, match=r"GSM8K and HumanEval run model-written code.*--unsafe-python-tool"):
        main(["-a", "ARC-Easy,GSM8K,HumanEval", "--dry-run", "--device-type=cpu"])
    main(["-a", "ARC-Easy,SpellingBee", "--dry-run", "--device-type=cpu"])  # no code runs: no sandbox needed
    main(["-a", "HumanEval", "--unsafe-python-tool", "--dry-run", "--device-type=cpu"])
    assert "dry run" in capsys.readouterr().out
