"""Causal, optionally sliding-window attention: Flash Attention 3 on Hopper GPUs, PyTorch everywhere else.

q: (B, T, H, D). Without a KV cache k, v are (B, T, Hkv, D); with one they are the cached (B, Hkv, L, D) and
`positions` (B, T) gives each query's absolute position. Returns (B, T, H, D). A window w lets query i see keys
i-w+1 .. i (GPTConfig.window_sizes gives w + 1 for the reference's window w).

Which path runs, and why:
- Hopper with the `kernels` package and bf16/fp16 inputs: FA3 (`flash_attn_func` for training, causal with a left
  window; `flash_attn_with_kvcache` against the cache for prefill and decoding). Every stage prints which kernel it
  will use, and why not FA3 where it is not (`kernel_summary`); `python -m nanochat.attention` checks it alone.
- Full context: SDPA with `is_causal` (flash kernels on CUDA and CPU).
- A short window under torch.compile on CUDA: flex_attention with a block mask, so blocks outside the window are
  skipped rather than masked; its block tables come from the window's shape alone, never from a T×T tensor.
- A short window otherwise (CPU, eager CUDA): SDPA with a (T, T) boolean mask built once per shape. Measured on
  the 2-core Xeon (AVX512-BF16/AMX), fwd+bwd of B=16, H=4, T=512, D=64, window 128: 240 ms against 237 ms for
  `is_causal` in bf16, 545 against 496 ms in fp32; splitting the queries into window-sized chunks cost 3.7x (masked
  chunks leave the flash kernel), and flex_attention has no backward on CPU. The most a block-skipping kernel
  could save there is small: in 128-blocks the window needs 7 of the 10 blocks that causal attention computes.
- Decoding several samples of one prompt on a CPU (an aligned step with a shared prompt): the prompt's keys and
  values are read once rather than once per sample (`shared_prefix_attention`).
"""

import functools
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# The Hopper builds of FA3 on the Hugging Face kernel hub, in order of preference: the reference design's, then the
# kernels-community one. `kernels` ≥ 0.15 needs a version or revision with every kernel and, by default, refuses
# publishers the hub does not mark as trusted; these two are named here on purpose, so they are trusted explicitly.
FA3_BUILDS = (("varunneal/flash-attention-3", {"revision": "main"}), ("kernels-community/flash-attn3", {"version": 1}))
FA3_REPO = FA3_BUILDS[0][0]
FLEX_BLOCK = 128


def _load_flash_attn_3():
    """(FA3's interface module, "") on an SM90 GPU where a build for this torch loads, else (None, why not)."""
    if not torch.cuda.is_available():
        return None, "there is no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return None, f"the GPU is SM{major}{minor} and FA3 needs Hopper (SM90)"
    try:
        from kernels import get_kernel
    except ImportError:
        return None, "the `kernels` package is not installed (pip install -e '.[gpu]'; runs/setup.sh does on a GPU)"
    failures = []
    for repo, which in FA3_BUILDS:
        try:
            return get_kernel(repo, trust_remote_code=True, **which).flash_attn_interface, ""
        except Exception as e:  # no network, no build for this torch, an old `kernels`: SDPA still works
            detail = str(e).splitlines()[0][:160] if str(e) else ""
            failures.append(f"{repo}: {type(e).__name__}: {detail}")
    return None, "no FA3 build could be loaded (" + "; ".join(failures) + ")"


# Resolved once at import, outside any torch.compile trace (dynamo would trace into a cached loader).
FA3, FA3_UNUSED_BECAUSE = _load_flash_attn_3()


def kernel_summary(device_type: str, dtype: torch.dtype) -> str:
    """The one line every stage prints at its start (`compute_init`): which attention kernel it will use, and why
    not FA3 on a GPU where it is not used."""
    if device_type != "cuda":
        return f"attention: PyTorch SDPA on {device_type}"
    if FA3 is None:
        return f"attention: PyTorch SDPA (flex_attention for windows), not Flash Attention 3: {FA3_UNUSED_BECAUSE}"
    if dtype not in (torch.bfloat16, torch.float16):
        return (f"attention: PyTorch SDPA, not Flash Attention 3: FA3 takes bf16/fp16 and the compute dtype is "
                f"{str(dtype).removeprefix('torch.')}")
    return "attention: Flash Attention 3 (Hopper) for training, prefill and decoding"


def default_window_pattern(device_type: str, compiled: bool) -> tuple[str, str]:
    """The window pattern a run gets when --window-pattern is not given, and why: the reference's SSSL wherever
    short windows skip the work outside them (FA3, or flex_attention under torch.compile on CUDA), L elsewhere, where
    a window is a dense mask over the full scores and saves nothing (measured on CPUs, see above)."""
    if device_type == "cuda" and FA3 is not None:
        return "SSSL", "Flash Attention 3 skips what short windows leave out"
    if device_type == "cuda" and compiled:
        return "SSSL", "flex_attention under torch.compile skips what short windows leave out"
    where = f"on {device_type}" + ("" if compiled else " without torch.compile")
    return "L", f"{where} a window is a dense mask that saves nothing"


def fa3_accepts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The conditions of FA3's branch on its inputs: same 16-bit dtype, last dimension contiguous, head_dim ≤ 256."""
    return (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == v.dtype == q.dtype
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and q.size(-1) <= 256)


def _fa3_window(window: int, T: int) -> tuple[int, int]:
    return (window - 1 if window < T else -1, 0)  # (left, right); -1 = unlimited


@functools.cache
def window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) boolean: key j visible to query i."""
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff < window)


def window_block_mask(T: int, window: int, device: torch.device | str, block: int = FLEX_BLOCK) -> BlockMask:
    """flex_attention's block mask of a causal sliding window, from block tables alone (O((T/block)²) work).

    Query block a and key block b hold pairs with i - j in [(a-b)·block - (block-1), (a-b)·block + (block-1)]: the
    block is skipped when no difference lands in [0, window), full when all do, partial (mask_mod decides) otherwise.
    """
    n = -(-T // block)
    a = torch.arange(n, device=device)[:, None]
    b = torch.arange(n, device=device)[None, :]
    lo, hi = (a - b) * block - (block - 1), (a - b) * block + (block - 1)
    full = (lo >= 0) & (hi < window)
    partial = (hi >= 0) & (lo < window) & ~full
    if T % block:  # the last blocks are cut short: let mask_mod check those pairs
        cut = (a == n - 1) | (b == n - 1)
        partial, full = partial | (full & cut), full & ~cut

    def tables(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = m.sum(dim=1, dtype=torch.int32)  # (n,)
        order = torch.argsort((~m).to(torch.int8), dim=1, stable=True).to(torch.int32)  # visible blocks first
        return counts[None, None], order[None, None]  # (1, 1, n), (1, 1, n, n): broadcast over batch and heads

    def mask_mod(b_, h_, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    kv_num, kv_idx = tables(partial)
    full_num, full_idx = tables(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
              positions: torch.Tensor | None = None, aligned: bool = False, shared: int = 0) -> torch.Tensor:
    if positions is not None:
        return _cached_attention(q, k, v, window, positions, aligned, shared)
    B, T, H, D = q.shape
    if FA3 is not None and q.is_cuda and fa3_accepts(q, k, v):
        out = FA3.flash_attn_func(q, k, v, causal=True, window_size=_fa3_window(window, T))
        return out[0] if isinstance(out, tuple) else out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
    gqa = k.size(1) != H
    if window >= T:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif q.is_cuda and torch.compiler.is_compiling():
        y = flex_attention(q, k, v, block_mask=window_block_mask(T, window, q.device), enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, window, q.device), enable_gqa=gqa)
    return y.transpose(1, 2)


def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                      positions: torch.Tensor, aligned: bool = False, shared: int = 0) -> torch.Tensor:
    """q (B, T, H, D) at `positions` (B, T) against each row's cached keys/values (B, Hkv, L, D). `aligned`: one
    new token per row and every row's keys are exactly its history (see StaticRows), so within the window nothing
    needs masking; the unmasked kernel is several times cheaper on CPUs at decode sizes. `shared`: the first
    `shared` keys and values are the same in every row (an aligned step only; see `shared_prefix_attention`)."""
    B, T, H, D = q.shape
    k, v = k.to(q.dtype), v.to(q.dtype)
    if FA3 is not None and q.is_cuda and fa3_accepts(q, k, v):
        # FA3 wants (B, L, Hkv, D) with a contiguous last dimension: the transposed view has it. Row b holds
        # positions[b, -1] + 1 valid keys; causal aligns the T queries to the end of that, as positions say.
        seqlens = (positions[:, -1] + 1).to(torch.int32)
        out = FA3.flash_attn_with_kvcache(q, k.transpose(1, 2), v.transpose(1, 2), cache_seqlens=seqlens,
                                          causal=True, window_size=_fa3_window(window, k.size(2)))
        return out[0] if isinstance(out, tuple) else out
    if aligned and T == 1 and window >= k.size(2):
        if B > 1 and 0 < shared < k.size(2) and q.device.type == "cpu":
            return shared_prefix_attention(q, k, v, shared)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=k.size(1) != H)
        return y.transpose(1, 2)
    kpos = torch.arange(k.size(2), device=q.device)
    diff = positions[:, :, None] - kpos[None, None, :]  # (B, T, L)
    mask = ((diff >= 0) & (diff < window)).unsqueeze(1)  # (B, 1, T, L)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=k.size(1) != H)
    return y.transpose(1, 2)


def shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shared: int) -> torch.Tensor:
    """Unmasked attention of one query per row, q (B, 1, H, D), to keys/values (B, Hkv, L, D) whose first `shared`
    positions are the same in every row (several samples of one prompt): those are read once, from row 0, rather
    than once per row. Attention over the prompt and over each row's own positions, merged by their log-sum-exps,
    equals attention over all L keys up to rounding. The query heads of one KV head (GQA) are queries of that head,
    so both parts are plain multi-head attention. On a CPU at batch 8 with a 256-token prompt, reading the cache
    is most of a decode step's attention."""
    B, _, H, D = q.shape
    Hkv = k.size(1)
    G = H // Hkv
    grouped = q.reshape(B, Hkv, G, D)  # query head h = kv_head * G + g, as SDPA's GQA maps them
    prompt_q = grouped.transpose(0, 1).reshape(1, Hkv, B * G, D)  # every row's queries against the one prompt
    y1, lse1 = _attention_with_lse(prompt_q, k[:1, :, :shared], v[:1, :, :shared])
    y1, lse1 = y1[0].view(Hkv, B, G, D).transpose(0, 1), lse1[0].view(Hkv, B, G).transpose(0, 1)
    y2, lse2 = _attention_with_lse(grouped, k[:, :, shared:], v[:, :, shared:])  # (B, Hkv, G, D), (B, Hkv, G)
    top = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - top)[..., None], torch.exp(lse2 - top)[..., None]
    y = (y1.float() * w1 + y2.float() * w2) / (w1 + w2)
    return y.to(q.dtype).reshape(B, 1, H, D)


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention (B, H, Tq, D) and its fp32 log-sum-exp (B, H, Tq), by the CPU flash kernel behind SDPA."""
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    """`python -m nanochat.attention [--require-fa3]`: print which kernel attention uses here; on a Hopper GPU without
    FA3, list the builds the hub has for each repository and, with --require-fa3, exit 1 (runs/speedrun.sh)."""
    argv = sys.argv[1:] if argv is None else argv
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    print(kernel_summary("cuda" if torch.cuda.is_available() else "cpu", dtype), flush=True)
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    if FA3 is not None or not hopper:
        return 0
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); FA3 builds on the hub:", flush=True)
    for repo, which in FA3_BUILDS:
        try:
            from kernels import get_kernel_variants
            found = [f"{d.variant.variant_str}{'' if type(d).__name__ == 'VariantAccepted' else ' (not this system)'}"
                     for d in get_kernel_variants(repo, **which)]
            print(f"  {repo}: {', '.join(found) or 'none'}", flush=True)
        except Exception as e:
            detail = str(e).splitlines()[0][:160] if str(e) else ""
            print(f"  {repo}: could not be listed ({type(e).__name__}: {detail})", flush=True)
    if "--require-fa3" in argv:
        print("error: this Hopper GPU would train with SDPA, not FA3 (much slower): install a torch that a build above "
              "is for (TORCH_VERSION=... bash runs/setup.sh), or set ALLOW_SDPA=1 to run anyway", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
