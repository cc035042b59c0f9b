"""Prefix reuse (PrefixCache, nanochat/kv_cache.py): blocks named by their whole prefix, copied exactly into a
slot, least recently used evicted tail first; and how the server reports it (`/stats`, `chat_web --prefix-cache`).
The scheduler's greedy outputs with and without reuse are compared in tests/test_engine.py."""

import httpx
import pytest
import torch

from nanochat.common import UserError
from nanochat.kv_cache import KVCache, PrefixCache
from webserver import ChatServer, save_long_talking_model

BLOCK = 4


def filled_cache(slots: int = 3, max_seq_len: int = 32) -> KVCache:
    """A cache (2 layers, 2 kv heads, head_dim 3) whose every entry is different."""
    cache = KVCache(slots, 2, 2, 3, max_seq_len)
    cache.k.copy_(torch.randn(cache.k.shape, generator=torch.Generator().manual_seed(0)))
    cache.v.copy_(torch.randn(cache.v.shape, generator=torch.Generator().manual_seed(1)))
    return cache


def test_a_stored_prefix_is_copied_exactly_into_another_slot():
    cache = filled_cache()
    prefixes = PrefixCache(cache, blocks=8, block_size=BLOCK)
    tokens = list(range(100, 111))  # 11 tokens: two whole blocks kept, the last 3 not
    prefixes.store(tokens, slot=0)
    assert prefixes.load(tokens + [7, 8], slot=2) == 8
    assert int(cache.pos[2]) == 8
    assert torch.equal(cache.k[:, 2, :, :8], cache.k[:, 0, :, :8])
    assert torch.equal(cache.v[:, 2, :, :8], cache.v[:, 0, :, :8])


def test_the_last_prompt_token_is_always_prefilled():
    """Its logits give the first sample: a prompt of exactly two kept blocks reuses one."""
    cache = filled_cache()
    prefixes = PrefixCache(cache, blocks=8, block_size=BLOCK)
    tokens = list(range(8))
    prefixes.store(tokens, slot=0)
    assert prefixes.load(tokens, slot=1) == 4
    assert prefixes.load(tokens[:1], slot=1) == 0 and int(cache.pos[1]) == 0


def test_a_block_matches_only_after_the_same_whole_prefix():
    cache = filled_cache()
    prefixes = PrefixCache(cache, blocks=8, block_size=BLOCK)
    prefixes.store([1, 2, 3, 4, 5, 6, 7, 8], slot=0)
    assert prefixes.load([9, 2, 3, 4, 5, 6, 7, 8, 0], slot=1) == 0  # same second block after another first one
    assert prefixes.load([1, 2, 3, 4, 5, 6, 7, 9, 0], slot=1) == 4  # the first block only
    stats = prefixes.stats()
    assert stats["lookups"] == 2 and stats["hits"] == 1 and stats["reused_tokens"] == 4
    assert stats["hit_rate"] == round(4 / 18, 4)


def test_the_least_recently_used_prefix_is_evicted_tail_first():
    """Three blocks: a second two-block prefix evicts the first one's tail, so its head stays reusable; reading a
    prefix makes it the most recently used."""
    cache = filled_cache()
    prefixes = PrefixCache(cache, blocks=3, block_size=BLOCK)
    a, b, c = [1] * 8, [2] * 8, [3] * 4
    prefixes.store(a, slot=0)
    prefixes.store(b, slot=1)
    assert prefixes.stats()["evicted_blocks"] == 1
    assert prefixes.load(a + [0], slot=2) == 4  # head kept, tail gone
    assert torch.equal(cache.k[:, 2, :, :4], cache.k[:, 0, :, :4])
    prefixes.store(c, slot=0)  # evicts the least recently used block: b's tail (a's head was just read)
    assert prefixes.load(a + [0], slot=2) == 4 and prefixes.load(b + [0], slot=2) == 4
    assert prefixes.load(c + [0], slot=2) == 4
    assert prefixes.stats()["used_blocks"] == 3


def test_a_prefix_longer_than_the_cache_keeps_its_head():
    cache = filled_cache()
    prefixes = PrefixCache(cache, blocks=2, block_size=BLOCK)
    tokens = list(range(20))
    prefixes.store(tokens, slot=0)
    assert prefixes.load(tokens, slot=1) == 8
    assert prefixes.stats()["evicted_blocks"] == 0


def test_the_memory_kept_is_reported():
    cache = filled_cache()
    prefixes = PrefixCache(cache, blocks=4, block_size=BLOCK)
    prefixes.store(list(range(8)), slot=0)
    stats = prefixes.stats()
    per_block = 2 * 2 * 2 * BLOCK * 3 * 4  # k and v, 2 layers, 2 heads, 4 positions, head_dim 3, fp32
    assert stats["bytes"] == 4 * per_block and stats["used_bytes"] == 2 * per_block


# ---------------------------------------------------------------------------------------------------------------------
# chat_web --prefix-cache and /stats

def test_a_prefix_cache_too_small_or_negative_is_refused(tiny_tokenizer):
    from conftest import make_tiny_model
    from nanochat.serving.scheduler import BatchScheduler
    from scripts.chat_web import main
    model = make_tiny_model(tiny_tokenizer.get_vocab_size())
    with pytest.raises(UserError, match="prefix-cache"):
        BatchScheduler(model, tiny_tokenizer, slots=1, prefix_cache=0.001)
    with pytest.raises(UserError, match="--prefix-cache must be between 0"):
        main(["--prefix-cache", "-1"])


def test_stats_report_the_reuse_of_a_conversations_earlier_turn(tmp_path, tiny_tokenizer):
    save_long_talking_model(tmp_path, tiny_tokenizer, sequence_len=512)
    server = ChatServer(tmp_path, "--slots", "2", "--prefix-cache", "0.25")
    try:
        question = "Please describe, in a few sentences, how a kettle brings water to the boil."
        messages = [{"role": "user", "content": question}]
        first = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                           json={"messages": messages, "max_tokens": 6, "temperature": 0.0}).json()
        messages += [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": messages, "max_tokens": 6, "temperature": 0.0}).raise_for_status()
        stats = httpx.get(server.url + "/stats", timeout=10).json()["workers"][0]["prefix_cache"]
    finally:
        server.stop()
    assert stats["lookups"] == 2 and stats["hits"] == 1
    assert stats["reused_tokens"] >= first["usage"]["prompt_tokens"] // 16 * 16 > 0
    assert stats["blocks"] == int(0.25 * 2 * 512) // 16 and stats["bytes"] > 0 and 0 < stats["hit_rate"] < 1


def test_bench_inference_measures_time_to_first_token_along_a_conversation(capsys):
    """At a toy size (no timing asserted): the turns part reports TTFT at turns 1, 5 and 10 with and without reuse
    and the hit rate, which is high because every turn holds the one before."""
    import json
    from bench.inference import main
    main(["--device", "cpu", "--depth", "1", "--vocab-size", "512", "--prompt-len", "16", "--turn-len", "12",
          "--turn-reply", "6", "--cb-slots", "2", "--dtype", "fp32", "--compile", "off", "--peak-bandwidth", "1",
          "--parts", "turns"])
    (result,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    conversation = result["conversation"]
    for name in ("ttft_s_reuse", "ttft_s_no_reuse"):
        assert set(conversation[name]) == {"turn1", "turn5", "turn10"}
        assert all(s > 0 for s in conversation[name].values())
    assert conversation["history_tokens"]["turn10"] == 1 + 9 * (12 + 6 + 4) + 12 + 3
    assert 0.5 < conversation["prefix_hit_rate"] < 1
