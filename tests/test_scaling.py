"""The one dial: what --depth derives, what flags override, which inputs are refused, and the schedules."""

import pytest


from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.scaling import (Hyperparams, Overrides, derive_hparams, lr_multiplier, model_shape, muon_momentum,
                              weight_decay_multiplier)


@pytest.mark.parametrize("depth, width, heads", [(12, 768, 6), (20, 1280, 10), (24, 1536, 12), (26, 1664, 13),
                                                 (32, 2048, 16)])
def test_width_and_heads_follow_the_reference(depth, width, heads):
    assert model_shape(depth) == (width, heads)


def test_small_cpu_models_use_a_smaller_head_dim():
    assert model_shape(4, head_dim=64) == (256, 4)
    assert model_shape(4) == (256, 2)


def test_closed_form_counts_of_the_config_equal_the_model_tensors():
    for depth, n_kv, smear, backout in [(2, 1, False, False), (3, 3, True, False), (4, 2, True, True)]:
        width, heads = model_shape(depth, head_dim=64)
        config = GPTConfig(n_layer=depth, n_embd=width, n_head=heads, n_kv_head=n_kv, vocab_size=1000, smear=smear,
                           backout=backout)
        model = GPT(config)
        assert config.param_counts() == model.num_params()
        assert config.num_scaling_params() == sum(p.numel() for p in model.blocks.parameters()) + 1024 * width


def test_hyperparams_give_the_model_config_and_round_trip_through_a_dict():
    hp = derive_hparams(4, Overrides(head_dim=64, sequence_len=512, window_pattern="SL", backout=False))
    config = hp.model_config()
    assert (config.n_layer, config.n_embd, config.n_head, config.sequence_len) == (4, 256, 4, 512)
    assert config.window_pattern == "SL" and config.smear and not config.backout  # smear on by default
    assert Hyperparams.from_dict(hp.to_dict()) == hp
    assert hp.scaling_params == config.num_scaling_params()


def test_reference_depth_gets_the_reference_batch_and_rates():
    hp = derive_hparams(12)
    assert hp.total_batch_size == 2 ** 19
    assert hp.matrix_lr == pytest.approx(0.02) and hp.embedding_lr == pytest.approx(0.3)
    assert hp.weight_decay == pytest.approx(0.28)
    assert hp.num_iterations == hp.target_tokens // hp.total_batch_size  # floored, as the reference


def test_bigger_models_get_bigger_batches_and_scaled_rates():
    d20, d26 = derive_hparams(20, Overrides(device_batch_size=16)), derive_hparams(26, Overrides(device_batch_size=16))
    assert d20.total_batch_size == 2 ** 20 and d26.total_batch_size == 2 ** 20
    assert d20.matrix_lr == pytest.approx(0.02 * (2 ** 20 / 2 ** 19) ** 0.5)
    assert d20.grad_accum_steps == 2 ** 20 // (16 * 2048)


def test_every_flag_overrides_its_derived_value():
    hp = derive_hparams(4, Overrides(head_dim=64, sequence_len=512, device_batch_size=16, total_batch_size=8192,
                                     num_iterations=60, matrix_lr=0.03, embedding_lr=0.2, unembedding_lr=0.004,
                                     scalar_lr=0.1, weight_decay=0.0, warmup_steps=5, warmdown_ratio=0.5,
                                     final_lr_frac=0.1))
    assert (hp.total_batch_size, hp.num_iterations, hp.grad_accum_steps) == (8192, 60, 1)
    # rates given by hand are batch-scaled like the defaults: √(8192 / 2^19) = 1/8
    assert (hp.matrix_lr, hp.embedding_lr, hp.unembedding_lr, hp.scalar_lr, hp.weight_decay) == pytest.approx(
        (0.03 / 8, 0.2 / 8, 0.004 / 8, 0.1 / 8, 0.0))
    assert {"total_batch_size", "num_iterations", "matrix_lr"} <= set(hp.sources)
    assert "(flag)" in hp.describe()


def test_target_flops_sets_the_step_count_from_the_closed_form_flops():
    hp = derive_hparams(4, Overrides(head_dim=64, total_batch_size=2 ** 16, target_flops=1e15))
    flops = GPT(hp.model_config()).estimate_flops()
    assert hp.num_iterations == round(1e15 / (flops * 2 ** 16)) and hp.sources["num_iterations"] == "target_flops"


@pytest.mark.parametrize("depth, kwargs, message", [
    (0, dict(), "at least 1"),
    (4, dict(head_dim=63), "even"),
    (4, dict(head_dim=64, n_kv_head=3), "must divide"),
    (4, dict(total_batch_size=1000, device_batch_size=4, sequence_len=128), "not a multiple"),
    (4, dict(window_pattern="SXL"), "window-pattern"),
])
def test_bad_input_is_refused_before_any_work(depth, kwargs, message):
    with pytest.raises(UserError, match=message):
        derive_hparams(depth, Overrides(**kwargs))


def test_lr_schedule_warms_up_stays_flat_then_decays_to_the_final_fraction():
    lrm = [lr_multiplier(s, 100, 10, 0.5, 0.05) for s in range(100)]
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrm[10:51])
    assert all(a >= b for a, b in zip(lrm[50:], lrm[51:]))
    assert lrm[-1] >= 0.05


def test_lr_never_goes_negative_when_steps_are_short_or_overrun():
    for total in (1, 2, 5, 40):
        for step in range(total + 5):
            assert lr_multiplier(step, total, 40, 0.65, 0.05) > 0


def test_a_run_shorter_than_its_warmup_warms_up_like_the_reference_and_never_jumps_down():
    lrm = [lr_multiplier(s, 10, 40, 0.65, 0.05) for s in range(10)]
    assert lrm == pytest.approx([(s + 1) / 40 for s in range(10)])


def test_hand_given_rates_and_weight_decay_are_scaled_as_the_reference_scales_its_flags():
    default = derive_hparams(8, Overrides(head_dim=64, total_batch_size=2 ** 17))
    given = derive_hparams(8, Overrides(head_dim=64, total_batch_size=2 ** 17, matrix_lr=0.04, weight_decay=0.56))
    assert default.matrix_lr == pytest.approx(0.02 / 2) and given.matrix_lr == pytest.approx(0.04 / 2)
    assert given.weight_decay == pytest.approx(2 * default.weight_decay)


def test_the_reference_point_is_a_d12_with_the_runs_own_shape_and_vocabulary():
    # A d12 is its own reference point whatever its aspect ratio, head dim or vocabulary: the reference batch, rates
    # and weight decay.
    for o, vocab in [(Overrides(), 65536), (Overrides(head_dim=64), 32768), (Overrides(aspect_ratio=48), 8192)]:
        hp = derive_hparams(12, o, vocab_size=vocab)
        assert hp.total_batch_size == 2 ** 19 and hp.weight_decay == pytest.approx(0.28), (o, vocab)


def test_muon_momentum_follows_the_references_warmup_in_runs_shorter_than_it():
    # A 60-step d4 ablation: the warmdown starts at step 21, but the first 400 steps follow the warmup alone.
    assert [muon_momentum(s, 60, 0.65) for s in (0, 21, 59)] == pytest.approx([0.85, 0.85 + 0.12 * 21 / 400,
                                                                               0.85 + 0.12 * 59 / 400])
    assert muon_momentum(500, 2000, 0.65) == 0.97 and muon_momentum(2000, 2000, 0.65) == pytest.approx(0.90)


def test_muon_momentum_and_weight_decay_schedules():
    assert muon_momentum(0, 1000, 0.65) == pytest.approx(0.85)
    assert muon_momentum(350, 1000, 0.65) == pytest.approx(0.97, abs=0.02)
    assert muon_momentum(999, 1000, 0.65) == pytest.approx(0.90, abs=0.01)
    assert weight_decay_multiplier(0, 100) == 1.0 and weight_decay_multiplier(100, 100) == pytest.approx(0.0)

