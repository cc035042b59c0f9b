"""Checkpoints: round trip, atomic writes (a crash mid-write leaves the previous one loadable), defaults."""

import pytest
import torch

from conftest import make_tiny_model
from nanochat.checkpoint import (checkpoint_dir, last_step, list_steps, load_checkpoint, load_model,
                                 model_state_dict, save_checkpoint)
from nanochat.common import UserError


def test_round_trip_restores_weights_meta_and_rank_state(base_dir):
    model = make_tiny_model(300)
    directory = checkpoint_dir("base", "d2")
    save_checkpoint(directory, 5, model, {"model_config": vars(model.config), "note": "hi"}, {"opt": torch.ones(3)})
    ckpt = load_checkpoint(directory, 5)
    assert ckpt["meta"]["note"] == "hi" and ckpt["meta"]["step"] == 5 and "git_commit" in ckpt["meta"]
    assert torch.equal(ckpt["rank_state"]["opt"], torch.ones(3))
    for k, v in model_state_dict(model).items():
        assert torch.equal(ckpt["model"][k], v)


def test_compiled_model_keys_lose_only_the_wrapper_prefix():
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner
    model = make_tiny_model(300)
    keys = set(model_state_dict(Wrapper(model)))
    assert keys == set(model.state_dict())  # e.g. "_orig_mod.lm_head.weight" -> "lm_head.weight", not "m_head…"


def test_a_crash_mid_write_leaves_the_previous_checkpoint(base_dir, monkeypatch):
    model = make_tiny_model(300)
    directory = checkpoint_dir("base", "d2")
    save_checkpoint(directory, 1, model, {"model_config": vars(model.config)})

    def explode(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("nanochat.checkpoint.save_file", explode)
    with pytest.raises(OSError):
        save_checkpoint(directory, 2, model, {"model_config": vars(model.config)})
    assert list_steps(directory) == [1] and last_step(directory) == 1
    assert load_checkpoint(directory, 1)["meta"]["step"] == 1


def test_load_model_defaults_to_the_last_step_and_checks_the_tokenizer(tiny_checkpoint, base_dir):
    model, tokenizer, meta = load_model("sft", "cpu")
    assert meta["step"] == 1 and not model.training
    assert tokenizer.get_vocab_size() == model.config.vocab_size


def test_missing_checkpoints_name_the_command_that_makes_them(base_dir):
    with pytest.raises(UserError, match="scripts.chat_sft"):
        load_model("sft", "cpu")
