"""Pretraining shards: download by count, the validation shard is always the dataset's last, your own text."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from nanochat.dataset import list_shards, shards_from_text

REPO = "nanochat-mirror/docs-dictionary-sample"


def run_dataset(*args, env):
    return subprocess.run([sys.executable, "-m", "nanochat.dataset", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_download_n_shards_plus_the_last_as_validation(mirror, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_MIRROR=str(mirror), NANOCHAT_DATASET=REPO)
    proc = run_dataset("-n", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (base_dir / "hf/datasets" / REPO).glob("*.parquet"))
    assert names == ["shard_00000.parquet", "shard_00001.parquet", "shard_00006.parquet"]


def test_validation_shard_does_not_depend_on_how_many_were_downloaded(mirror, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror))
    from nanochat.dataset import download_shards
    download_shards(1, REPO)
    assert [p.name for p in list_shards("val", REPO)] == ["shard_00006.parquet"]
    assert [p.name for p in list_shards("train", REPO)] == ["shard_00000.parquet"]
    download_shards(3, REPO)
    assert [p.name for p in list_shards("val", REPO)] == ["shard_00006.parquet"]
    assert len(list_shards("train", REPO)) == 3


def test_no_shards_names_the_download_command(base_dir):
    with pytest.raises(UserError, match="python -m nanochat.dataset"):
        list_shards("train", REPO)


def test_unknown_dataset_asks_for_its_shard_count(base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_NUM_SHARDS", raising=False)
    with pytest.raises(UserError, match="NANOCHAT_NUM_SHARDS"):
        list_shards("train", "someone/unknown-dataset")


def test_a_given_shard_count_wins_over_the_environment(base_dir, monkeypatch):
    from nanochat.dataset import num_shards
    monkeypatch.setenv("NANOCHAT_NUM_SHARDS", "3")
    assert num_shards("someone/unknown-dataset") == 3
    assert num_shards("someone/unknown-dataset", 9) == 9  # --num-shards, passed down by python -m nanochat.dataset


def test_from_text_makes_shards_that_train_and_validate(base_dir, tmp_path):
    (tmp_path / "a.txt").write_text("First document about rivers.\n" * 20)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"json doc {i}"}) for i in range(30)))
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    proc = run_dataset("--from-text", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--name", "mine",
                       "--docs-per-shard", "10", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "--dataset local/mine" in proc.stdout
    train, val = list_shards("train", "local/mine"), list_shards("val", "local/mine")
    assert len(train) >= 1 and len(val) == 1 and val[0] not in train
    docs = [t for p in train + val for t in pq.read_table(p).column("text").to_pylist()]
    assert len(docs) == 31 and docs[0].startswith("First document")


def test_from_text_rejects_bad_inputs_clearly(base_dir, tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported file type"):
        shards_from_text([tmp_path / "x.csv"], "bad", 10)
    (tmp_path / "y.jsonl").write_text(json.dumps({"body": "no text field"}))
    with pytest.raises(UserError, match="'text' field"):
        shards_from_text([tmp_path / "y.jsonl"], "bad", 10)


def test_climbmix_is_a_preset_beside_fineweb_edu(base_dir, monkeypatch):
    from nanochat.dataset import default_dataset, list_shards
    monkeypatch.delenv("NANOCHAT_DATASET", raising=False)
    assert default_dataset() == "karpathy/fineweb-edu-100b-shuffle"
    assert default_dataset("climbmix") == "karpathy/climbmix-400b-shuffle"
    assert default_dataset("someone/own-shards") == "someone/own-shards"
    monkeypatch.setenv("NANOCHAT_DATASET", "climbmix")
    assert default_dataset() == "karpathy/climbmix-400b-shuffle"
    with pytest.raises(UserError, match="no val shards of karpathy/climbmix-400b-shuffle"):
        list_shards("val")  # the preset's repo, its 6,543 shards known: the last is the validation shard
