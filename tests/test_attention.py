"""Sliding-window attention paths against a naive mask (the flex_attention block mask and the cached SDPA mask),
the decode step's attention to a prompt that every row shares, and which kernel a stage says it will use."""

import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from nanochat import attention as attention_module
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


def fake_kernels(monkeypatch, builds: dict | None = None):
    """A stand-in `kernels` package with the contract of kernels 0.19 (read from its source): get_kernel refuses a
    call without a version or revision, and an untrusted publisher without trust_remote_code. `builds` maps a repo
    to its interface module, or to the exception that loading it raises (no build for this torch, say)."""
    module = types.ModuleType("kernels")
    calls = []

    def get_kernel(repo_id, *, revision=None, version=None, trust_remote_code=False, **_):
        calls.append((repo_id, revision, version, trust_remote_code))
        if revision is None and version is None:
            raise ValueError("A kernel version or revision must be specified.")
        if trust_remote_code is not True and not repo_id.startswith("kernels-community/"):
            raise ValueError(f"Kernel repository '{repo_id}' is not from a trusted publisher.")
        found = (builds or {}).get(repo_id, FileNotFoundError("no build variant for torch-2.13-cxx11-cu130"))
        if isinstance(found, Exception):
            raise found
        return types.SimpleNamespace(flash_attn_interface=found)

    module.get_kernel = get_kernel
    module.get_kernel_variants = lambda repo_id, **which: []
    monkeypatch.setitem(sys.modules, "kernels", module)
    return calls


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))


def test_fa3_is_loaded_with_a_revision_and_trust_as_current_kernels_requires(monkeypatch, hopper):
    interface = object()
    calls = fake_kernels(monkeypatch, {"varunneal/flash-attention-3": interface})
    assert attention_module._load_flash_attn_3() == (interface, "")
    assert calls == [("varunneal/flash-attention-3", "main", None, True)]


def test_the_kernels_package_refuses_a_kernel_asked_for_without_a_version():
    """Why FA3 was never loaded: since kernels 0.15 an unversioned get_kernel is an error, raised before any
    download (the old loader called get_kernel(repo) and fell back to SDPA)."""
    kernels = pytest.importorskip("kernels", minversion="0.15")
    with pytest.raises(ValueError, match="version or revision"):
        kernels.get_kernel(attention_module.FA3_REPO)


def test_without_the_preferred_build_the_kernels_community_fa3_is_taken(monkeypatch, hopper):
    interface = object()
    fake_kernels(monkeypatch, {"kernels-community/flash-attn3": interface})
    assert attention_module._load_flash_attn_3() == (interface, "")


@pytest.mark.parametrize("capability, builds, says", [
    ((8, 0), None, "SM80"),
    ((9, 0), {}, "no build variant for torch-2.13"),
    ((9, 0), "absent", "`kernels` package is not installed"),
])
def test_a_cuda_machine_without_fa3_is_told_why_in_the_stage_line(monkeypatch, capability, builds, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    if builds == "absent":
        monkeypatch.setitem(sys.modules, "kernels", None)  # import kernels → ImportError
    else:
        fake_kernels(monkeypatch, builds)
    fa3, why = attention_module._load_flash_attn_3()
    monkeypatch.setattr(attention_module, "FA3", fa3)
    monkeypatch.setattr(attention_module, "FA3_UNUSED_BECAUSE", why)
    line = attention_module.kernel_summary("cuda", torch.bfloat16)
    assert fa3 is None and "\n" not in line
    assert line.startswith("attention: PyTorch SDPA") and "not Flash Attention 3" in line and says in line


def test_the_stage_line_names_fa3_where_it_is_taken_and_sdpa_for_fp32(monkeypatch):
    monkeypatch.setattr(attention_module, "FA3", object())
    assert "Flash Attention 3" in attention_module.kernel_summary("cuda", torch.bfloat16)
    assert "SDPA" in attention_module.kernel_summary("cuda", torch.float32)
    assert attention_module.kernel_summary("cpu", torch.float32) == "attention: PyTorch SDPA on cpu"


def test_the_fa3_check_fails_a_hopper_gpu_without_fa3_only_when_fa3_is_required(monkeypatch, hopper, capsys):
    fake_kernels(monkeypatch, {})
    monkeypatch.setattr(attention_module, "FA3", None)
    monkeypatch.setattr(attention_module, "FA3_UNUSED_BECAUSE", "no FA3 build could be loaded")
    assert attention_module.main([]) == 0
    assert attention_module.main(["--require-fa3"]) == 1
    assert "ALLOW_SDPA=1" in capsys.readouterr().err


def test_every_stage_prints_its_attention_kernel_once_at_start(base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--depth=2", "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("attention:")]
    assert len(lines) == 1 and "SDPA" in lines[0]


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


def test_the_default_window_pattern_is_sssl_only_where_windows_skip_work(monkeypatch):
    import nanochat.attention
    from nanochat.attention import default_window_pattern
    monkeypatch.setattr(nanochat.attention, "FA3", None)
    assert default_window_pattern("cuda", compiled=True)[0] == "SSSL"  # flex_attention's block mask
    assert default_window_pattern("cuda", compiled=False)[0] == "L"  # eager CUDA: a dense mask
    assert default_window_pattern("cpu", compiled=True)[0] == default_window_pattern("mps", compiled=False)[0] == "L"
    monkeypatch.setattr(nanochat.attention, "FA3", object())
    assert default_window_pattern("cuda", compiled=False) == ("SSSL", "Flash Attention 3 skips what short windows "
                                                                      "leave out")
