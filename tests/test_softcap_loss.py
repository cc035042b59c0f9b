"""The chunked LM-head + soft-cap + cross-entropy is the plain formula: same loss, same gradients, compiled or not."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from nanochat import softcap_loss
from nanochat.softcap_loss import softcap_cross_entropy

V, C, CAP = 50, 16, 15.0


def plain(x, w, y, reduction="mean"):
    """The oracle: the formula as written, full logits in fp32."""
    logits = CAP * torch.tanh((x @ w.T).float() / CAP)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction=reduction)


@pytest.fixture
def inputs(monkeypatch):
    monkeypatch.setattr(softcap_loss, "CHUNK_ROWS", 7)  # several chunks and a ragged last one over 30 rows
    torch.manual_seed(0)
    x = (3 * torch.randn(3, 10, C)).requires_grad_()  # large logits, so the soft-cap bites
    w = torch.randn(V, C, requires_grad=True)
    y = torch.randint(0, V, (3, 10))
    y[0, :4] = -1
    return x, w, y


@pytest.mark.parametrize("kernel", ["compiled", "eager"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradients_equal_the_plain_formula(inputs, reduction, kernel, monkeypatch):
    monkeypatch.setattr(softcap_loss._run_chunk, "failed", kernel == "eager")
    x, w, y = inputs
    expected = plain(x, w, y, reduction)
    got = softcap_cross_entropy(x, w, y, CAP, reduction)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(expected, (x, w))):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-6)


def test_per_position_losses_equal_the_plain_formula_without_grad(inputs):
    x, w, y = inputs
    with torch.no_grad():
        got = softcap_cross_entropy(x, w, y, CAP, "none")
        expected = plain(x, w, y, "none").view(y.shape)
    assert got.shape == y.shape and torch.allclose(got, expected, atol=1e-5)
    assert (got[0, :4] == 0).all()  # ignored targets cost nothing


def test_compiled_in_one_graph_it_gives_the_same_gradients(inputs):
    x, w, y = inputs
    f = torch.compile(lambda x, w, y: 2 * softcap_cross_entropy(x, w, y, CAP), fullgraph=True)
    got = f(x, w, y)
    expected = 2 * plain(x, w, y)
    assert torch.allclose(got, expected, rtol=1e-5)
    for g, e in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(expected, (x, w))):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-6)


def test_under_bf16_autocast_the_matmul_is_bf16_and_the_rest_fp32(inputs):
    x, w, y = inputs
    with torch.autocast("cpu", torch.bfloat16):
        got = softcap_cross_entropy(x, w, y, CAP)
        expected = plain(x, w, y)  # x @ w.T autocasts to bf16, then .float()
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-2)
    gx, gw = torch.autograd.grad(got, (x, w))
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32


def test_the_model_loss_is_the_chunked_one_and_equals_its_logits_loss():
    model = make_tiny_model(300)
    idx = torch.randint(0, 300, (2, 9))
    targets = torch.randint(0, 300, (2, 9))
    loss = model(idx, targets)
    expected = F.cross_entropy(model(idx).view(-1, 300), targets.view(-1))
    assert torch.allclose(loss, expected, rtol=1e-5)
    grads = torch.autograd.grad(loss, model.lm_head.weight)[0]
    assert grads[300:].abs().max() == 0  # the padded vocabulary rows get no gradient


def test_unknown_reduction_is_an_error(inputs):
    x, w, y = inputs
    with pytest.raises(ValueError, match="reduction"):
        softcap_cross_entropy(x, w, y, CAP, "avg")


def test_without_a_working_compiler_it_warns_once_and_computes_the_same(inputs, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    kernel = softcap_loss._ChunkKernel()
    monkeypatch.setattr(softcap_loss, "_run_chunk", kernel)
    monkeypatch.setattr(softcap_loss.torch, "compile", broken)
    x, w, y = inputs
    with pytest.warns(UserWarning, match="using eager ops"):
        got = softcap_cross_entropy(x, w, y, CAP)
    assert kernel.failed and torch.allclose(got, plain(x, w, y), rtol=1e-5)
