"""Sliding-window attention paths against a naive mask (the flex_attention block mask and the cached SDPA mask),
and the decode step's attention to a prompt that every row shares."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from nanochat.attention import attention, window_block_mask, window_mask
from test_gpt import naive_attention


def naive_visible(T: int, window: int) -> torch.Tensor:
    i = torch.arange(T)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)


@pytest.mark.parametrize("T, window, block", [(256, 64, 64), (256, 128, 64), (200, 50, 64), (512, 128, 128)])
def test_block_mask_keeps_exactly_the_blocks_that_hold_visible_pairs(T, window, block):
    dense = window_block_mask(T, window, "cpu", block=block).to_dense()[0, 0]  # (n, n): 1 where a block is computed
    n = -(-T // block)
    visible = torch.zeros(n * block, n * block, dtype=torch.bool)
    visible[:T, :T] = naive_visible(T, window)
    expected = visible.view(n, block, n, block).any(dim=3).any(dim=1)
    assert torch.equal(dense.bool(), expected)
    assert dense.sum() < n * (n + 1) // 2  # fewer blocks than full causal attention computes


@pytest.mark.parametrize("T, window", [(256, 64), (200, 50)])
def test_flex_attention_with_the_block_mask_matches_the_naive_reference(T, window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, T, 4, 16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not the fast path
        y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           block_mask=window_block_mask(T, window, "cpu", block=64)).transpose(1, 2)
    assert torch.allclose(y, naive_attention(q, k, v, window), atol=1e-5)


def test_the_sdpa_window_mask_is_built_once_per_shape():
    assert window_mask(64, 16, torch.device("cpu")) is window_mask(64, 16, torch.device("cpu"))
    assert torch.equal(window_mask(64, 16, torch.device("cpu")), naive_visible(64, 16))


def test_bf16_windowed_attention_tracks_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 32) for _ in range(3))
    low = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 16)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), naive_attention(q, k, v, 16), atol=3e-2)


def test_the_block_mask_builds_inside_one_compiled_graph():
    """On CUDA the block mask is built inside the compiled model: dynamo must trace its construction without a
    graph break (fullgraph) and flex_attention must give the naive answer from it."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 192, 16) for _ in range(3))  # (B, H, T, D)

    def windowed(q, k, v):
        return flex_attention(q, k, v, block_mask=window_block_mask(q.size(2), 40, q.device, block=64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = torch.compile(windowed, backend="eager", fullgraph=True)(q, k, v)
    expected = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 40).transpose(1, 2)
    assert torch.allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("capability, says", [((8, 0), "SM80"), ((9, 0), "varunneal/flash-attention-3")])
def test_a_cuda_machine_without_fa3_gets_one_line_saying_why(monkeypatch, capsys, capability, says):
    import builtins
    from nanochat import attention as attention_module
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    real_import = builtins.__import__

    def no_kernels(name, *args, **kwargs):
        if name == "kernels":
            raise ImportError("No module named 'kernels'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_kernels)
    assert attention_module._load_flash_attn_3() is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and says in lines[0] and "falling back to PyTorch SDPA" in lines[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head, and two query heads per KV head (GQA)
def test_a_prompt_shared_by_every_row_is_attended_as_if_each_row_held_it(kv_heads, dtype):
    """An aligned decode step whose rows share their first 24 positions reads them from row 0 only: row 0's copy
    is the one that counts (the other rows' copies are overwritten here with noise), and the result is attention
    over each row's whole history."""
    torch.manual_seed(0)
    B, H, L, D, shared = 3, 4, 40, 16, 24
    q = torch.randn(B, 1, H, D)
    k, v = torch.randn(B, kv_heads, L, D), torch.randn(B, kv_heads, L, D)
    k[1:, :, :shared], v[1:, :, :shared] = k[:1, :, :shared], v[:1, :, :shared]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, enable_gqa=kv_heads != H).transpose(1, 2)
    k[1:, :, :shared], v[1:, :, :shared] = (torch.randn(B - 1, kv_heads, shared, D) for _ in range(2))
    positions = torch.full((B, 1), L - 1)
    y = attention(q.to(dtype), k.to(dtype), v.to(dtype), L, positions=positions, aligned=True, shared=shared)
    assert y.shape == (B, 1, H, D) and y.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(y.float(), expected, atol=tolerance, rtol=tolerance)
