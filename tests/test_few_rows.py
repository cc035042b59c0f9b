"""A decode step's CPU products of a few rows: every form is the same product, and each key keeps the form that its
own timed calls found fastest."""

import pytest
import torch
import torch.nn.functional as F

from nanochat import few_rows
from nanochat.few_rows import LM_HEAD_FORMS, TRIALS, product


@pytest.fixture
def fresh(monkeypatch):
    """Empty choices, and a clock that only the forms below move."""
    monkeypatch.setattr(few_rows, "_CHOICE", {})
    monkeypatch.setattr(few_rows, "_TRIALS", {})
    monkeypatch.setattr(few_rows, "_HELD", {})
    clock = {"now": 0.0}
    monkeypatch.setattr(few_rows, "_clock", lambda: clock["now"])
    return clock


def costing(clock: dict, seconds: float, calls: list, form=F.linear):
    """`form`, which takes `seconds` of the fake clock and records each call."""
    def timed(flat, weight):
        calls.append(timed)
        clock["now"] += seconds
        return form(flat, weight)
    return timed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 8, 33])
@pytest.mark.parametrize("form", range(len(LM_HEAD_FORMS)))  # F.linear, weight @ xᵀ, oneDNN
def test_every_form_is_the_same_product(rows, form, dtype, monkeypatch):
    torch.manual_seed(0)
    x, weight = torch.randn(rows, 1, 48).to(dtype), torch.randn(1000, 48).to(dtype)
    monkeypatch.setattr(few_rows, "_CHOICE", {(rows, 1000, 48, dtype, LM_HEAD_FORMS): form})
    with torch.no_grad():
        out = product(x, weight, LM_HEAD_FORMS)
    assert out.shape == (rows, 1, 1000) and out.dtype == dtype  # weight @ xᵀ leaves it transposed in memory
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 products round their sums to 8 bits
    assert torch.allclose(out.float(), F.linear(x, weight).float(), atol=tolerance, rtol=tolerance)


def test_a_key_runs_each_form_in_turn_then_keeps_the_fastest(fresh):
    calls = []
    slow, fast = costing(fresh, 3.0, calls), costing(fresh, 1.0, calls)
    forms = (slow, fast)
    x, weight = torch.randn(2, 48), torch.randn(100, 48)
    with torch.no_grad():
        for _ in range(2 * (TRIALS + 1)):
            assert torch.allclose(product(x, weight, forms), F.linear(x, weight))
        assert calls == [slow, fast] * (TRIALS + 1)
        assert few_rows._CHOICE == {(2, 100, 48, torch.float32, forms): 1} and not few_rows._TRIALS
        calls.clear()
        for _ in range(3):
            product(x, weight, forms)
    assert calls == [fast] * 3


def test_the_first_call_of_each_form_is_not_counted(fresh):
    """It may build a copy of the weight (oneDNN's): a one-off cost, not the form's."""
    calls = []
    first = {"done": False}

    def costly_once(flat, weight):
        calls.append("once")
        fresh["now"] += 1.0 if first["done"] else 100.0
        first["done"] = True
        return F.linear(flat, weight)
    forms = (costly_once, costing(fresh, 2.0, calls))
    with torch.no_grad():
        for _ in range(2 * (TRIALS + 1)):
            product(torch.randn(3, 48), torch.randn(100, 48), forms)
    assert few_rows._CHOICE == {(3, 100, 48, torch.float32, forms): 0}


def test_rows_dtypes_and_forms_are_measured_apart_and_other_cases_are_plain_linear(fresh):
    calls = []
    forms = (costing(fresh, 1.0, calls), costing(fresh, 2.0, calls))
    weight = torch.randn(100, 48)
    with torch.no_grad():
        product(torch.randn(3, 48), weight, forms)
        product(torch.randn(4, 48), weight, forms)
        product(torch.randn(3, 48).bfloat16(), weight.bfloat16(), forms)
        product(torch.randn(3, 48), weight, forms[:1])
        assert len(few_rows._TRIALS) == 4
        product(torch.randn(3, 48).half(), weight.half(), forms)  # not a measured dtype
        product(torch.randn(few_rows.FEW_ROWS + 1, 48), weight, forms)  # too many rows
    product(torch.randn(3, 48), weight, forms)  # under autograd
    assert len(few_rows._TRIALS) == 4 and len(calls) == 4


def test_the_onednn_copy_follows_its_weight_and_is_freed_with_it(monkeypatch):
    """RL updates the weights in place between rollouts: the oneDNN copy must never serve the old ones."""
    monkeypatch.setattr(few_rows, "_CHOICE", {(2, 1000, 48, torch.float32, LM_HEAD_FORMS): 2})
    x, weight = torch.randn(2, 48), torch.randn(1000, 48)
    with torch.inference_mode():
        before = product(x, weight, LM_HEAD_FORMS)
    with torch.no_grad():
        weight.mul_(2)  # in place, as an optimizer step
        assert torch.allclose(product(x, weight, LM_HEAD_FORMS), 2 * before, atol=1e-5)
        weight.data = torch.randn(1000, 48)  # new storage, same tensor
        assert torch.allclose(product(x, weight, LM_HEAD_FORMS), F.linear(x, weight), atol=1e-5)
    key = ("onednn", id(weight))
    assert key in few_rows._HELD
    del weight
    assert key not in few_rows._HELD


def test_the_onednn_copy_is_dropped_once_every_key_settled_on_another_form(fresh):
    calls = []
    forms = (costing(fresh, 1.0, calls), costing(fresh, 5.0, calls, few_rows.onednn))
    x, weight = torch.randn(2, 48), torch.randn(1000, 48)
    with torch.no_grad():
        product(torch.randn(5, 48), weight)  # a key without the oneDNN form, left unsettled
        product(x, weight, forms)
        product(x, weight, forms)
        assert ("onednn", id(weight)) in few_rows._HELD  # made by the trial of the oneDNN form
        for _ in range(2 * TRIALS):
            product(x, weight, forms)
    assert few_rows._CHOICE == {(2, 1000, 48, torch.float32, forms): 0}
    assert not few_rows._HELD


def test_stacked_weights_give_each_product_and_follow_their_weights(fresh):
    q, k, v = torch.randn(64, 48), torch.randn(16, 48), torch.randn(16, 48)
    x = torch.randn(3, 1, 48)
    with torch.no_grad():
        out = product(x, few_rows.stacked((q, k, v), torch.float32))
        assert torch.allclose(out, torch.cat([F.linear(x, w) for w in (q, k, v)], dim=-1), atol=1e-5)
        k.mul_(2)  # in place, as an optimizer step or the engine's refreshed copy
        assert torch.allclose(few_rows.stacked((q, k, v), torch.float32)[64:80], k)
        assert few_rows.stacked((q, k, v), torch.bfloat16).dtype == torch.bfloat16
    assert len(few_rows._HELD) == 2
    big = torch.randn(few_rows.STACK_BELOW // 4 + 1, 1)
    assert few_rows.stacked((big, k), torch.float32) is None  # streams well alone: no copy held
    assert len(few_rows._HELD) == 2
    del q
    assert not few_rows._HELD  # freed with the first weight


def test_a_decode_step_of_stacked_q_k_v_gives_the_logits_of_separate_products():
    from conftest import make_tiny_model
    from nanochat.kv_cache import KVCache
    torch.manual_seed(0)
    model = make_tiny_model(300, n_kv_head=1).eval()  # GQA: k and v narrower than q
    c = model.config
    idx = torch.randint(0, 300, (2, 9))
    logits = []
    for grad in (False, True):  # under autograd every product is plain F.linear on separate weights
        cache = KVCache(2, c.n_layer, c.n_kv_head, c.head_dim, 16, "cpu", torch.float32)
        with torch.set_grad_enabled(grad):
            model(idx[:, :8], kv_cache=cache)
            logits.append(model(idx[:, 8:], kv_cache=cache).detach())
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3])
def test_the_opaque_operator_of_compiled_steps_is_the_stacked_product_in_row_order(rows, fresh):
    """What torch.compile calls in place of the products: its fake agrees with it (torch.library.opcheck), and it
    hands back x @ [weights stacked]ᵀ contiguous whatever form served it."""
    torch.manual_seed(0)
    x = torch.randn(rows, 1, 48)
    weights = [torch.randn(64, 48), torch.randn(16, 48), torch.randn(16, 48)]
    with torch.no_grad():
        for _ in range(2 * (TRIALS + 1)):  # through both forms while the key is measured, then the chosen one
            out = torch.ops.nanochat.few_rows_product(x, weights, "linear")
            assert out.is_contiguous() and out.shape == (rows, 1, 96)
            assert torch.allclose(out, F.linear(x, torch.cat(weights)), atol=1e-5)
        torch.library.opcheck(torch.ops.nanochat.few_rows_product.default, (x, weights, "lm_head"))


def test_compiled_products_of_few_rows_call_the_opaque_operator_and_others_stay_linear():
    weight = torch.randn(100, 48)
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    f = torch.compile(lambda x: product(x, weight, LM_HEAD_FORMS), backend=backend)
    with torch.no_grad():
        f(torch.randn(2, 48))
    assert any("few_rows_product" in t for t in seen)
    seen.clear()
    torch._dynamo.reset()
    f(torch.randn(2, 48))  # autograd on: training's products are F.linear, compiled as Inductor likes
    assert not any("few_rows_product" in t for t in seen) and any("linear" in t for t in seen)
