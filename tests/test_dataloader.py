"""The BOS-aligned best-fit packing loader on real mirror shards."""

import itertools

import pytest
import torch

from nanochat.dataloader import PackedLoader
from nanochat.dataset import download_shards, iter_texts

REPO = "nanochat-mirror/docs-dictionary-sample"


@pytest.fixture
def shards(mirror, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror))
    download_shards(2, REPO)


def loader(tok, **kwargs):
    args = dict(batch_size=4, seq_len=64, split="train", dataset=REPO, buffer_docs=50)
    args.update(kwargs)
    return PackedLoader(tok, **args)


def take(it, n):
    return [tuple(t.clone() for t in batch) for batch in itertools.islice(it, n)]


def test_rows_start_with_bos_and_targets_shift_by_one(shards, tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    for x, y in take(iter(loader(tiny_tokenizer)), 5):
        assert x.shape == y.shape == (4, 64) and x.dtype == torch.long
        assert (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert (y >= 0).all()  # no padding, no ignored targets


def test_rows_are_whole_documents_then_one_crop(shards, tiny_tokenizer):
    """Split at every BOS, a row is documents exactly as tokenized, except its last piece, which may be a cropped
    document (a prefix); whole documents are never cut in the middle of a row."""
    bos = tiny_tokenizer.get_bos_token_id()
    texts = list(iter_texts("train", REPO))
    docs = {tuple(ids) for ids in tiny_tokenizer.encode(texts, prepend=bos)}
    cropped = 0
    for x, y in take(iter(loader(tiny_tokenizer, seq_len=256)), 6):
        for i in range(x.size(0)):
            row = torch.cat([x[i], y[i, -1:]]).tolist()
            starts = [j for j, t in enumerate(row) if t == bos] + [len(row)]
            assert starts[0] == 0
            pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
            assert all(piece in docs for piece in pieces[:-1])
            if pieces[-1] not in docs:
                cropped += 1
                assert any(doc[:len(pieces[-1])] == pieces[-1] for doc in docs)
    assert cropped > 0  # the check of the crop above ran


def test_same_seed_gives_the_same_stream(shards, tiny_tokenizer):
    a = take(iter(loader(tiny_tokenizer)), 4)
    b = take(iter(loader(tiny_tokenizer)), 4)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


def test_ranks_read_disjoint_row_groups(shards, tiny_tokenizer):
    r0, r1 = loader(tiny_tokenizer, rank=0, world_size=2), loader(tiny_tokenizer, rank=1, world_size=2)
    u0, u1 = set(r0._epoch_units(0)), set(r1._epoch_units(0))
    assert u0 and u1 and not u0 & u1
    b0, b1 = next(iter(r0))[0], next(iter(r1))[0]
    assert not torch.equal(b0, b1)


def test_resume_from_state_dict_continues_exactly(shards, tiny_tokenizer):
    reference = take(iter(loader(tiny_tokenizer)), 12)
    first = loader(tiny_tokenizer)
    it = iter(first)
    take(it, 7)
    state = first.state_dict()
    resumed = loader(tiny_tokenizer)
    resumed.load_state_dict(state)
    rest = take(iter(resumed), 5)
    for (x, y), (rx, ry) in zip(rest, reference[7:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_state_dict_refuses_another_world_size(shards, tiny_tokenizer):
    state = loader(tiny_tokenizer).state_dict()
    with pytest.raises(ValueError, match="same number of processes"):
        loader(tiny_tokenizer, rank=0, world_size=2).load_state_dict(state)


def test_reports_the_fraction_of_tokens_cropped(shards, tiny_tokenizer):
    l = loader(tiny_tokenizer, seq_len=128)
    take(iter(l), 10)
    assert 0 < l.stats["crop_fraction"] < 1


def test_validation_reads_row_groups_in_file_order_whatever_the_seed(shards, tiny_tokenizer):
    units = [("shard", g) for g in range(12)]
    for seed in (0, 7):
        val, train = loader(tiny_tokenizer, split="val", seed=seed), loader(tiny_tokenizer, seed=seed)
        val.units = train.units = units  # more row groups than the mirror's validation shard has
        assert val._epoch_units(0) == val._epoch_units(3) == units
        assert train._epoch_units(0) != units  # training still shuffles


def test_the_buffer_is_topped_up_refill_docs_at_a_time_as_the_reference_does(shards, tiny_tokenizer):
    # The reference keeps at least 1,000 documents and adds them 128 at a time, never a whole row group (1,024).
    l = loader(tiny_tokenizer, buffer_docs=1000)
    assert (l.buffer_docs, l.refill_docs) == (1000, 128)
    l._refill()
    assert 1000 <= len(l.lengths) < 1000 + 128 and l.pending
    l = loader(tiny_tokenizer, buffer_docs=50, refill_docs=8)
    it = iter(l)
    for _ in range(3):
        next(it)
        l._refill()
        assert 50 <= len(l.lengths) < 58


def test_resume_keeps_the_documents_not_yet_in_the_buffer(shards, tiny_tokenizer):
    reference = take(iter(loader(tiny_tokenizer, refill_docs=8)), 6)
    first = loader(tiny_tokenizer, refill_docs=8)
    take(iter(first), 3)
    assert first.pending  # the row group is only partly in the buffer
    resumed = loader(tiny_tokenizer, refill_docs=8)
    resumed.load_state_dict(first.state_dict())
    for (x, y), (rx, ry) in zip(take(iter(resumed), 3), reference[3:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
