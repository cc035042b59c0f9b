"""On the same weights, nanochat's CORE per task equals an independent scorer written from the DCLM reference."""

import pytest

from core_oracle import oracle_core
from nanochat.core_eval import evaluate_core
from conftest import make_tiny_model


@pytest.mark.slow
def test_core_per_task_equals_the_reference_oracle_on_a_tiny_model(mirror, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror))
    # sequence_len 256: long few-shot prompts run past the training context and are scored whole, as the reference
    # scores nanochat models (it crops only models that declare a max_seq_len); the rotary tables reach 2,560.
    model = make_tiny_model(tiny_tokenizer.get_vocab_size(), seed=3, sequence_len=256)
    ours = evaluate_core(model, tiny_tokenizer, "cpu", max_per_task=8)
    oracle = oracle_core(model, tiny_tokenizer, mirror / "files/eval_bundle", max_per_task=8)
    assert set(oracle) == set(ours["tasks"]) and len(oracle) == 21
    for label, accuracy in oracle.items():
        assert round(ours["tasks"][label]["accuracy"], 3) == round(accuracy, 3), label
    # A model that always scores the same would agree trivially; this one separates items.
    assert len({round(a, 3) for a in oracle.values()}) > 3
