"""Checkpoints: round trip, completion markers, fallback past a partial or corrupt latest step, inference that never
unpickles, and one-line errors when a resume cannot re-shard."""

import json

import pytest
import torch

from conftest import make_tiny_model, tiny_meta
from nanochat.checkpoint import (MARKER, CheckpointMeta, checkpoint_dir, last_step, list_steps, load_checkpoint, load_for_resume,
                                 load_model, model_state_dict, save_checkpoint, step_dir)
from nanochat.common import UserError


def save_steps(directory, model, steps, rank_state=None):
    for step in steps:
        save_checkpoint(directory, step, model, tiny_meta(model),
                        rank_state if rank_state is not None else {"opt": torch.full((3,), float(step))})


def test_round_trip_restores_weights_meta_and_rank_state(base_dir):
    model = make_tiny_model(300)
    directory = checkpoint_dir("base", "d2")
    save_checkpoint(directory, 5, model, tiny_meta(model, curves={"note": "hi"}), {"opt": torch.ones(3)})
    ckpt = load_checkpoint(directory, 5, rank=0)
    meta = CheckpointMeta.from_dict(ckpt["meta"])
    assert meta.curves["note"] == "hi" and meta.step == 5 and "git_commit" in meta.provenance
    assert meta.model_config == model.config and meta.hyperparams == tiny_meta(model).hyperparams
    assert torch.equal(ckpt["rank_states"][0]["opt"], torch.ones(3))
    for k, v in model_state_dict(model).items():
        assert torch.equal(ckpt["model"][k], v)
    marker = json.loads((step_dir(directory, 5) / MARKER).read_text())
    assert marker["world_size"] == 1 and set(marker["files"]) == {"model.safetensors", "meta.json", "rank0.pt"}
    assert load_checkpoint(directory, 5)["rank_states"] is None  # no rank given: the rank files stay closed


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
    save_steps(directory, model, [1])

    def explode(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("nanochat.checkpoint.save_file", explode)
    with pytest.raises(OSError):
        save_steps(directory, model, [2])
    assert step_dir(directory, 2).is_dir() and not (step_dir(directory, 2) / MARKER).exists()
    assert list_steps(directory) == [1] and last_step(directory) == 1
    assert load_checkpoint(directory, 1)["meta"]["step"] == 1


@pytest.mark.parametrize("damage", ["truncate weights", "garble meta", "drop marker"])
def test_a_damaged_latest_step_falls_back_to_the_previous_one_with_one_line(tiny_checkpoint, base_dir, capsys,
                                                                            damage):
    directory = checkpoint_dir("sft", "d2")
    save_steps(directory, tiny_checkpoint, [2])
    path = step_dir(directory, 2)
    if damage == "truncate weights":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif damage == "garble meta":
        (path / "meta.json").write_text("{" + " " * (len((path / "meta.json").read_text()) - 1))  # same size
    else:
        (path / MARKER).unlink()
    model, _, meta = load_model("sft", "cpu")
    assert meta.step == 1
    err = capsys.readouterr().err.strip()
    if damage == "drop marker":
        assert err == ""  # an unmarked folder is simply not a checkpoint
    else:
        assert err.count("\n") == 0 and "step 2" in err and "previous complete step" in err


def test_a_resume_never_uses_a_step_whose_rank_file_is_missing(base_dir, capsys):
    model = make_tiny_model(300)
    directory = checkpoint_dir("base", "d2")
    save_steps(directory, model, [1, 2])
    (step_dir(directory, 2) / "rank0.pt").unlink()
    ckpt = load_for_resume(directory, "latest", "cpu", rank=0, world_size=1)
    assert ckpt["step"] == 1 and torch.equal(ckpt["rank_states"][0]["opt"], torch.ones(3))
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rank0.pt is missing" in err


class Payload:
    """Unpickling this runs code: it creates the file named by `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_inference_loads_a_checkpoint_with_a_malicious_optimizer_file_without_running_it(tiny_checkpoint, base_dir,
                                                                                        tmp_path):
    import pickle
    directory = checkpoint_dir("sft", "d2")
    path = step_dir(directory, 1)
    sentinel = tmp_path / "pwned"
    (path / "rank0.pt").write_bytes(pickle.dumps({"optimizer": Payload(sentinel)}))
    marker = json.loads((path / MARKER).read_text())  # an attacker ships a consistent folder
    marker["files"]["rank0.pt"] = (path / "rank0.pt").stat().st_size
    (path / MARKER).write_text(json.dumps(marker))
    model, _, meta = load_model("sft", "cpu")
    assert meta.step == 1 and not sentinel.exists()
    with pytest.raises(UserError, match="rank0.pt is corrupt"):  # resuming training refuses it too (weights_only)
        load_for_resume(directory, 1, "cpu", rank=0, world_size=1)
    assert not sentinel.exists()


def test_resuming_on_another_world_size_without_every_rank_file_says_what_to_do(base_dir):
    model = make_tiny_model(300)
    directory = checkpoint_dir("base", "d2")
    save_steps(directory, model, [3])
    marker_path = step_dir(directory, 3) / MARKER
    marker = json.loads(marker_path.read_text())
    marker["world_size"] = 2  # as if a second node had written rank1.pt into its own folder
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(UserError) as info:
        load_for_resume(directory, "latest", "cpu", rank=0, world_size=1)
    message = str(info.value)
    assert "\n" not in message and "rank1.pt" in message and "resume with 2 processes" in message


def test_load_model_defaults_to_the_last_step_and_checks_the_tokenizer(tiny_checkpoint, base_dir):
    model, tokenizer, meta = load_model("sft", "cpu")
    assert meta.step == 1 and not model.training
    assert tokenizer.get_vocab_size() == model.config.vocab_size


def test_missing_checkpoints_name_the_command_that_makes_them(base_dir):
    with pytest.raises(UserError, match="scripts.chat_sft"):
        load_model("sft", "cpu")


def test_keep_last_deletes_only_older_complete_steps(base_dir):
    model = make_tiny_model(300)
    directory = checkpoint_dir("base", "d2")
    for step in (1, 2, 3):
        save_checkpoint(directory, step, model, tiny_meta(model), keep_last=2)
    assert list_steps(directory) == [2, 3] and not step_dir(directory, 1).exists()


def test_meta_of_a_checkpoint_before_the_schema_still_loads(tiny_checkpoint, base_dir):
    from nanochat.scaling import LEGACY_NAMES
    path = step_dir(checkpoint_dir("sft", "d2"), 1)
    meta = json.loads((path / "meta.json").read_text())
    old = {"model_config": meta["model_config"], "args": {"model_tag": None, "depth": 2}, "step": 1, "base_step": 7,
           "git_commit": "abc", "curves": {"train_loss": []},
           "hyperparams": {{v: k for k, v in LEGACY_NAMES.items()}.get(k, k): v for k, v in meta["hyperparams"].items()
                           if k not in ("smear", "backout")}}
    assert "max_seq_len" in old["hyperparams"]
    loaded = CheckpointMeta.from_dict(old, "sft")
    assert (loaded.model_tag, loaded.parent_phase, loaded.parent_step) == ("d2", "base", 7)
    assert loaded.hyperparams.sequence_len == 128 and loaded.provenance["git_commit"] == "abc"


def test_load_stage_and_resume_give_one_way_to_start(tiny_checkpoint, base_dir):
    from nanochat.checkpoint import load_stage, resume
    stage = load_stage("base", device="cpu")
    assert stage.meta.model_tag == "d2" and stage.step == 1 and stage.model.training
    restored = []
    assert resume(stage.ckpt_dir, None, stage.model, "cpu", 0, 1, restored.append) is None  # a fresh start
    other = make_tiny_model(300)
    save_steps(checkpoint_dir("base", "d3"), other, [4])
    meta = resume(checkpoint_dir("base", "d3"), "latest", other, "cpu", 0, 1, restored.append)
    assert meta.step == 4 and restored[0][0]["opt"][0] == 4.0
    with pytest.raises(UserError, match="different model config"):
        resume(checkpoint_dir("base", "d3"), "latest", stage.model, "cpu", 0, 1, restored.append)
