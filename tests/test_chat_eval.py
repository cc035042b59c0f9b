"""chat_eval end to end on a tiny checkpoint with the mirror: accuracies, ChatCORE, the report section."""

import json
import os
import subprocess
import sys

import pytest

from scripts.chat_eval import chat_core


def test_chat_eval_runs_categorical_and_generative_tasks(mirror, tiny_checkpoint, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_MIRROR=str(mirror))
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-i", "sft", "-a", "ARC-Easy,GSM8K,SpellingBee",
                           "--max-problems", "4", "--max-new-tokens", "16"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for task in ("ARC-Easy", "GSM8K", "SpellingBee"):
        assert f"{task}" in proc.stdout
    assert "ChatCORE over 3/6 tasks" in proc.stdout
    section = json.loads((base_dir / "report" / "chat-evaluation-sft.json").read_text())
    accuracies = section["data"][1]
    assert 0.0 <= accuracies["ARC-Easy"] <= 1.0 and "GSM8K" in accuracies


def test_chat_core_centers_each_task_against_chance():
    assert chat_core({"ARC-Easy": 0.25, "GSM8K": 0.0}) == 0.0
    assert chat_core({"MMLU": 1.0, "HumanEval": 1.0}) == 1.0
    assert chat_core({"ARC-Challenge": 0.625}) == pytest.approx(0.5)


def test_unknown_task_is_a_clear_error(tiny_checkpoint, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-a", "TriviaQA"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "unknown task 'TriviaQA'" in proc.stderr
