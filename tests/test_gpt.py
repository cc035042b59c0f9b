"""Model invariants: causality, windows, GQA, KV-cache decoding equal to full forward passes, sizes and FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from nanochat.attention import attention
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache

V = 300


def model_with(**kwargs) -> GPT:
    return make_tiny_model(V, **kwargs)


def naive_attention(q, k, v, window):
    """(B, T, H, D) reference: explicit scores, causal + window mask, GQA by repeating K/V heads."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    i = torch.arange(T)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [3, 8, 64])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_sdpa_attention_matches_naive_reference(window, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 20, 4, 16)
    k, v = torch.randn(2, 20, kv_heads, 16), torch.randn(2, 20, kv_heads, 16)
    assert torch.allclose(attention(q, k, v, window), naive_attention(q, k, v, window), atol=1e-5)


def test_changing_a_future_token_never_changes_past_logits():
    model = model_with(window_pattern="SL", sequence_len=256)
    idx = torch.randint(0, V, (1, 40))
    changed = idx.clone()
    changed[0, 30] = (changed[0, 30] + 1) % V
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :30], b[:, :30])
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_window_pattern_tiles_and_keeps_the_last_layer_full():
    # a window w covers w + 1 keys (the query and the w before it), as the reference's (w, 0) windows
    config = GPTConfig(sequence_len=2048, n_layer=6, window_pattern="SSL")
    assert config.window_sizes() == [513, 513, 2049, 513, 513, 2049]
    config = GPTConfig(sequence_len=2048, n_layer=4, window_pattern="S")
    assert config.window_sizes() == [513, 513, 513, 2049]
    assert GPTConfig(sequence_len=1000, n_layer=2, window_pattern="S").window_sizes()[0] == 257


def test_short_window_layers_do_not_see_past_the_window():
    model = make_tiny_model(V, sequence_len=512, window_pattern="L")
    model.windows = [4, 4]  # every layer windowed: a token 10 positions back cannot matter
    idx = torch.randint(0, V, (1, 20))
    changed = idx.clone()
    changed[0, 2] = (changed[0, 2] + 1) % V
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, 12:], b[:, 12:])
    assert not torch.allclose(a[:, 2:5], b[:, 2:5])


def test_gqa_projection_shapes():
    model = model_with()
    attn = model.blocks[0].attn
    assert attn.c_q.weight.shape == (2 * 32, 64)
    assert attn.c_k.weight.shape == attn.c_v.weight.shape == (1 * 32, 64)
    with pytest.raises(ValueError, match="must divide"):
        GPT(GPTConfig(n_head=4, n_kv_head=3, n_embd=64))


def test_value_embeddings_on_alternating_layers_including_the_last():
    config = GPTConfig(n_layer=5, n_embd=64, n_head=2, n_kv_head=2, vocab_size=V)
    model = GPT(config)
    assert sorted(int(k) for k in model.value_embeds) == [0, 2, 4]
    assert [b.attn.ve_gate is not None for b in model.blocks] == [True, False, True, False, True]


@pytest.mark.parametrize("pattern", ["L", "SL"])
@pytest.mark.parametrize("slots", [[3, 0, 2], [1, 2, 3]])  # any rows in any order (gathered); consecutive (views)
def test_kv_cache_prefill_and_decode_equal_full_forward(pattern, slots):
    model = model_with(window_pattern=pattern, sequence_len=256)
    if pattern == "SL":
        model.windows = [8, 256]  # a window shorter than the sequence, so the cached mask is exercised
    idx = torch.randint(0, V, (3, 30))
    full = model(idx)
    cache = KVCache(4, 2, 1, 32, 64)
    steps = [model(idx[:, :17], kv_cache=cache, slots=slots)]
    for t in range(17, 30):
        steps.append(model(idx[:, t:t + 1], kv_cache=cache, slots=slots))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)
    other = KVCache(4, 2, 1, 32, 64)  # the prefill's last position alone, as generation asks for it
    last = model(idx[:, :17], kv_cache=other, slots=slots, last_only=True)
    assert last.shape == (3, 1, V) and torch.allclose(last[:, 0], full[:, 16], atol=1e-4)


def test_slots_at_different_positions_decode_together():
    model = model_with()
    a, b = torch.randint(0, V, (1, 12)), torch.randint(0, V, (1, 5))
    cache = KVCache(2, 2, 1, 32, 64)
    model(a[:, :11], kv_cache=cache, slots=[0])
    model(b[:, :4], kv_cache=cache, slots=[1])
    both = model(torch.tensor([[a[0, 11]], [b[0, 4]]]), kv_cache=cache, slots=[0, 1])
    assert torch.allclose(both[0, -1], model(a)[0, -1], atol=1e-4)
    assert torch.allclose(both[1, -1], model(b)[0, -1], atol=1e-4)
    assert cache.pos.tolist() == [12, 5]


def test_copy_slot_gives_identical_continuations():
    model = model_with()
    prompt = torch.randint(0, V, (1, 9))
    cache = KVCache(3, 2, 1, 32, 32)
    shape = cache.k.shape
    model(prompt, kv_cache=cache, slots=[0])
    cache.copy_slot(0, [1, 2])
    nxt = torch.randint(0, V, (1, 1)).expand(3, 1)
    out = model(nxt, kv_cache=cache)
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[0], out[2])
    assert cache.k.shape == shape  # never resized


def smear_backout_model(smear: bool = True, backout: bool = True) -> GPT:
    """Four layers (so the middle layer is not the last) with smear switched on: λ_smear starts at 0 (no effect)."""
    model = model_with(n_layer=4, smear=smear, backout=backout)
    if smear:
        with torch.no_grad():
            model.smear_lambda.fill_(0.7)
            model.smear_gate.weight.normal_(0, 1.0)
    return model


def test_smear_adds_the_gated_previous_embedding_from_the_second_position_on():
    model = smear_backout_model(backout=False)
    emb = torch.randn(2, 6, 64)
    out = model.smear(emb, None, None, None)
    for t in range(6):
        gate = 0.7 * torch.sigmoid(emb[:, t, :24] @ model.smear_gate.weight[0])  # (B,)
        expected = emb[:, t] + (gate[:, None] * emb[:, t - 1] if t else 0)
        assert torch.allclose(out[:, t], expected, atol=1e-6)


def test_backout_subtracts_its_share_of_the_middle_layer_stream():
    with_backout = smear_backout_model(smear=False)
    plain = model_with(n_layer=4)
    plain.load_state_dict({k: v for k, v in with_backout.state_dict().items() if k != "backout_lambda"})
    idx = torch.randint(0, V, (2, 10))
    stream = {}
    plain.blocks[2].register_forward_hook(lambda m, i, o: stream.__setitem__("mid", o))
    plain.blocks[3].register_forward_hook(lambda m, i, o: o - 0.2 * stream["mid"])  # what backout should do
    expected = plain(idx)
    assert (with_backout(idx) - expected).abs().max() < 1e-3 * expected.abs().max()
    with torch.no_grad():
        with_backout.backout_lambda.zero_()
    assert (with_backout(idx) - expected).abs().max() > 1e-2 * expected.abs().max()


def test_smear_and_backout_start_at_the_reference_init_and_are_off_without_their_flags():
    model = model_with(n_layer=4, smear=True, backout=True)
    assert model.smear_gate.weight.shape == (1, 24) and 0 <= model.smear_gate.weight.min()
    assert model.smear_gate.weight.max() <= 0.02
    assert model.smear_lambda.tolist() == [0.0] and model.backout_lambda.tolist() == pytest.approx([0.2])
    names = {n for n, _ in model_with(n_layer=4, smear=False, backout=False).named_parameters()}
    assert not names & {"smear_gate.weight", "smear_lambda", "backout_lambda"}
    groups = {g["name"]: g for g in model.setup_optimizer().param_groups}
    assert {id(p) for p in groups["smear_backout"]["params"]} == {
        id(model.smear_gate.weight), id(model.smear_lambda), id(model.backout_lambda)}
    assert groups["smear_backout"]["lr"] == 0.2 and groups["smear_backout"]["betas"] == (0.8, 0.95)
    assert groups["smear_backout"]["weight_decay"] == 0.0


@pytest.mark.parametrize("slots", [[3, 0, 2], [1, 2, 3]])
def test_smear_and_backout_decode_with_the_kv_cache_equal_to_a_full_forward(slots):
    model = smear_backout_model()
    idx = torch.randint(0, V, (3, 20))
    full = model(idx)
    cache = KVCache(4, 4, 1, 32, 32)
    steps = [model(idx[:, :1], kv_cache=cache, slots=slots), model(idx[:, 1:9], kv_cache=cache, slots=slots)]
    for t in range(9, 20):
        steps.append(model(idx[:, t:t + 1], kv_cache=cache, slots=slots))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)


def test_smear_slots_at_different_positions_copied_and_reused_decode_like_full_forwards():
    model = smear_backout_model()
    a, b, c = torch.randint(0, V, (1, 12)), torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 7))
    cache = KVCache(3, 4, 1, 32, 32)
    model(b[:, :4], kv_cache=cache, slots=[0])  # an earlier request in slot 0, then the slot is reused
    cache.reset([0])
    model(a[:, :11], kv_cache=cache, slots=[0])
    model(b[:, :4], kv_cache=cache, slots=[1])
    cache.copy_slot(1, [2])  # continuous batching compacts rows by copying them
    both = model(torch.tensor([[a[0, 11]], [b[0, 4]], [b[0, 4]]]), kv_cache=cache, slots=[0, 1, 2])
    assert torch.allclose(both[0, -1], model(a)[0, -1], atol=1e-4)
    assert torch.allclose(both[1, -1], model(b)[0, -1], atol=1e-4)
    assert torch.allclose(both[2, -1], model(b)[0, -1], atol=1e-4)
    cache.reset([1])
    first = model(c, kv_cache=cache, slots=[1], last_only=True)  # a fresh prompt: nothing smeared into position 0
    assert torch.allclose(first[0, -1], model(c)[0, -1], atol=1e-4)


def test_cache_overflow_is_an_error_not_a_silent_resize():
    model = model_with()
    cache = KVCache(1, 2, 1, 32, 8)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.randint(0, V, (1, 9)), kv_cache=cache)


def test_logits_are_soft_capped_fp32_and_never_include_padding():
    model = model_with()
    logits = model(torch.randint(0, V, (2, 7)))
    assert logits.dtype == torch.float32 and logits.shape == (2, 7, V)
    assert model.config.padded_vocab_size == 320 and model.lm_head.weight.shape[0] == 320
    assert logits.abs().max() <= 15.0


def test_loss_ignores_minus_one_targets():
    model = model_with()
    idx = torch.randint(0, V, (1, 10))
    targets = idx.clone()
    targets[0, :5] = -1
    logits = model(idx)
    expected = F.cross_entropy(logits[0, 5:], targets[0, 5:])
    assert torch.allclose(model(idx, targets), expected, atol=1e-6)


def test_init_follows_the_reference_recipe():
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=4096, n_layer=4, n_head=4, n_kv_head=4, n_embd=256)
    model = GPT(config)
    model.init_weights()
    s = math.sqrt(3) / math.sqrt(256)
    assert abs(model.wte.weight.std().item() - 0.8) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 1e-4
    assert model.blocks[0].attn.c_q.weight.abs().max() <= s
    assert model.blocks[0].mlp.c_fc.weight.abs().max() <= 0.4 * s
    assert all((b.attn.c_proj.weight == 0).all() and (b.mlp.c_proj.weight == 0).all() for b in model.blocks)
    assert torch.allclose(model.resid_lambdas[[0, -1]], torch.tensor([1.15, 1.05]))
    assert torch.allclose(model.x0_lambdas[[0, -1]], torch.tensor([0.20, 0.05]))


def test_only_embedding_and_lm_head_rates_carry_the_width_factor():
    model = GPT(GPTConfig(sequence_len=64, vocab_size=4096, n_layer=2, n_head=4, n_kv_head=4, n_embd=3072))
    groups = {g["name"]: g["lr"] for g in model.setup_optimizer(embedding_lr=0.3, unembedding_lr=0.008,
                                                                 matrix_lr=0.02, scalar_lr=0.5).param_groups}
    assert groups["wte"] == pytest.approx(0.3 / 2) and groups["lm_head"] == pytest.approx(0.008 / 2)  # (3072/768)^-½
    assert groups["value_embeds"] == pytest.approx(0.15 / 2)
    assert groups["resid_lambdas"] == pytest.approx(0.005) and groups["x0_lambdas"] == pytest.approx(0.5)
    assert groups["matrices"] == 0.02


def test_param_counts_and_flops_on_a_known_config():
    config = GPTConfig(sequence_len=512, vocab_size=8192, n_layer=4, n_head=4, n_kv_head=4, n_embd=256)
    model = GPT(config)
    n = model.num_params()
    C = 256
    blocks = 4 * (4 * C * C + 8 * C * C) + 2 * 12 * 4  # 2 layers carry a 12→4 gate
    assert n["transformer_matrices"] == blocks
    assert n["lm_head"] == n["wte"] == 8192 * C
    assert n["value_embeds"] == 2 * 8192 * C
    assert model.num_scaling_params() == blocks + 8192 * C
    assert model.estimate_flops() == 6 * (blocks + 8192 * C) + 4 * 12 * 4 * 64 * 512


# --- the compute-dtype policy --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [{}, {"smear": True, "backout": True}])
def test_bf16_policy_keeps_every_block_boundary_and_qkv_in_bf16_with_fp32_masters_and_loss(monkeypatch, flags):
    """Under the bf16 policy (autocast bf16, what get_compute_dtype picks on CUDA SM80+) nothing is promoted back
    to fp32 between the embedding and the LM head, and q/k/v meet the conditions of the FA3 branch."""
    from nanochat import attention as attention_module
    model = model_with(window_pattern="SL", sequence_len=64, **flags)
    seen = {"blocks": [], "qkv": []}
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: seen["blocks"].append((args[0].dtype, out.dtype)))

    def spy(q, k, v, window, positions=None):
        seen["qkv"].append((q.dtype, k.dtype, v.dtype, attention_module.fa3_accepts(q, k, v)))
        return attention_module.attention(q, k, v, window, positions)
    monkeypatch.setattr("nanochat.gpt.attention", spy)
    idx = torch.randint(0, V, (2, 16))
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert seen["blocks"] == [(torch.bfloat16, torch.bfloat16)] * model.config.n_layer
    assert seen["qkv"] == [(torch.bfloat16,) * 3 + (True,)] * model.config.n_layer
    assert loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def test_fp32_policy_computes_in_fp32_and_fails_fa3_conditions():
    from nanochat.attention import fa3_accepts
    model = model_with()
    outs = []
    model.blocks[0].register_forward_hook(lambda m, args, out: outs.append(out.dtype))
    model(torch.randint(0, V, (1, 8)))
    assert outs == [torch.float32]
    q = torch.randn(1, 8, 2, 32)
    assert not fa3_accepts(q, q, q) and fa3_accepts(q.bfloat16(), q.bfloat16(), q.bfloat16())


def test_bf16_policy_logits_track_fp32():
    model = model_with()
    idx = torch.randint(0, V, (2, 24))
    ref = model(idx)
    with torch.autocast("cpu", torch.bfloat16):
        low = model(idx)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_rotary_tables_cover_ten_times_the_context_and_longer_inputs_get_their_own():
    model = model_with(sequence_len=16)
    assert model.cos.size(1) == 160  # whole CORE prompts past the context, as the reference's tables
    idx = torch.randint(0, V, (1, 200))
    longer = model(idx)  # past the tables: computed for this call, the same positions as a longer table's
    assert longer.shape == (1, 200, V) and torch.allclose(longer[:, :160], model(idx[:, :160]), atol=1e-5)


def test_smear_mixes_the_normalised_embeddings_as_the_reference_does():
    model = model_with(smear=True)
    with torch.no_grad():
        model.smear_lambda.fill_(0.7)
        model.x0_lambdas.zero_()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    idx = torch.randint(0, V, (1, 6))
    model(idx)
    emb = F.rms_norm(model.wte(idx), (model.config.n_embd,))
    gate = 0.7 * torch.sigmoid(model.smear_gate(emb[..., :24]))
    expected = torch.cat([emb[:, :1], emb[:, 1:] + gate[:, 1:] * emb[:, :-1]], dim=1)
    assert torch.allclose(seen[0] / model.resid_lambdas[0], expected, atol=1e-5)  # x0 term zeroed above


def test_muon_equalises_rows_by_default_as_the_reference():
    assert model_with().setup_optimizer().equalize_rows
    assert not model_with().setup_optimizer(equalize_rows=False).equalize_rows  # bench/recipe_ablation.sh's variant
