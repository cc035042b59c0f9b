"""Causal (optionally sliding-window) attention: Flash Attention 3 on Hopper GPUs, PyTorch SDPA everywhere else.

q: (B, T, H, D). Without a KV cache k, v are (B, T, Hkv, D); with one they are the cached (B, Hkv, L, D) and
`positions` (B, T) gives each query's absolute position. Returns (B, T, H, D).
"""

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _flash_attn_3():
    """FA3 from the `kernels` hub package on an SM90 GPU, else None (never required)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None
    try:
        from kernels import get_kernel
        return get_kernel("kernels-community/flash-attn3").flash_attn_func
    except Exception:
        return None


@functools.cache
def _window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff < window)  # (T, T): key j visible to query i


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
              positions: torch.Tensor | None = None) -> torch.Tensor:
    B, T, H, D = q.shape
    if positions is None:
        fa3 = _flash_attn_3() if q.dtype == torch.bfloat16 else None
        if fa3 is not None:
            out = fa3(q, k, v, causal=True, window_size=(window - 1 if window < T else -1, 0))
            return out[0] if isinstance(out, tuple) else out
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
        mask = None if window >= T else _window_mask(T, window, q.device)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=k.size(1) != H)
        return y.transpose(1, 2)
    L = k.size(2)
    kpos = torch.arange(L, device=q.device)
    diff = positions[:, :, None] - kpos[None, None, :]  # (B, T, L)
    mask = ((diff >= 0) & (diff < window)).unsqueeze(1)  # (B, 1, T, L)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                       enable_gqa=k.size(1) != H)
    return y.transpose(1, 2)
