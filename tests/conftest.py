"""Shared fixtures: an isolated base dir per test, the offline mirror, and a tiny tokenizer trained on real text."""

import os
from pathlib import Path

import pytest

# Keep tests from reading or writing the user's ~/.cache/nanochat, even for code run at import time.
os.environ.setdefault("NANOCHAT_BASE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "nanochat-pytest"))

FIXTURE_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew 384,400 km to the Moon.\n"
    "Photosynthesis converts light energy into chemical energy; plants store it as glucose (C6H12O6).\n"
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n"
    "Émile visited Zürich and Kraków — naïve café owners served crème brûlée. 東京は日本の首都です。 🙂🚀\n"
)


@pytest.fixture
def base_dir(tmp_path, monkeypatch) -> Path:
    """A fresh NANOCHAT_BASE_DIR for one test."""
    d = tmp_path / "nanochat"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline data mirror (NANOCHAT_MIRROR), or skip when it is not set."""
    value = os.environ.get("NANOCHAT_MIRROR", "")
    if not value or value.startswith("http"):
        pytest.skip("NANOCHAT_MIRROR is not set to a directory")
    path = Path(value).resolve()
    if not path.is_dir():
        pytest.fail(f"NANOCHAT_MIRROR={value} is not a directory")
    return path


def mirror_texts(max_chars: int) -> list[str]:
    """Up to max_chars of real documents from the mirror's first shard, or the fixture text without a mirror."""
    value = os.environ.get("NANOCHAT_MIRROR", "")
    shard = Path(value) / "hf/datasets/nanochat-mirror/docs-dictionary-sample/shard_00000.parquet"
    if not value or not shard.exists():
        return [FIXTURE_TEXT] * max(1, max_chars // len(FIXTURE_TEXT))
    import pyarrow.parquet as pq
    texts, total = [], 0
    pf = pq.ParquetFile(shard)
    for i in range(pf.num_row_groups):
        for text in pf.read_row_group(i, columns=["text"]).column("text").to_pylist():
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                return texts
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real BPE tokenizer (vocab 1024) trained on ~1M characters of mirror text."""
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.train_from_iterator(iter(mirror_texts(1_000_000) + [FIXTURE_TEXT]), vocab_size=1024)


TINY_TAG = "d2"


def tiny_config(vocab_size: int, sequence_len: int = 128, window_pattern: str = "L", **overrides):
    from nanochat.gpt import GPTConfig
    fields = dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=64) | overrides
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, window_pattern=window_pattern, **fields)


def make_tiny_model(vocab_size: int, seed: int = 0, **kwargs):
    """A freshly initialised tiny GPT whose zero-initialised projections are perturbed, so outputs depend on input."""
    import torch
    from nanochat.checkpoint import build_model
    torch.manual_seed(seed)
    model = build_model(tiny_config(vocab_size, **kwargs), "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0, 0.02)
    return model


def tiny_meta(model, phase: str = "base", **fields):
    """The CheckpointMeta of a tiny model (its hyper-parameters derived as base_train would for d2)."""
    from nanochat.checkpoint import CheckpointMeta
    from nanochat.scaling import Overrides, derive_hparams
    hp = derive_hparams(2, Overrides(head_dim=32, sequence_len=128, device_batch_size=4, total_batch_size=512,
                                     num_iterations=10), vocab_size=model.config.vocab_size)
    fields = {"model_tag": TINY_TAG, "args": {"model_tag": fields.get("model_tag", TINY_TAG)}, **fields}
    return CheckpointMeta(phase=phase, model_config=model.config, hyperparams=hp, **fields)


@pytest.fixture
def tiny_checkpoint(base_dir, tiny_tokenizer):
    """A tiny model saved as base, sft and rl checkpoints (tag d2, step 1) next to the tiny tokenizer."""
    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    tiny_tokenizer.save(base_dir / "tokenizer")
    model = make_tiny_model(tiny_tokenizer.get_vocab_size())
    for phase in ("base", "sft", "rl"):
        save_checkpoint(checkpoint_dir(phase, TINY_TAG), 1, model, tiny_meta(model, phase))
    return model
