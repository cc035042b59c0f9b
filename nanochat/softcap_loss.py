"""The LM head, the logit soft-cap and the cross-entropy in one chunked pass that never holds all the logits.

    loss = cross_entropy(softcap · tanh(x Wᵀ / softcap), targets)    (ignore_index -1)

At d4 with a 32768 vocabulary a batch of 16×512 has 268M logits: 1 GiB in fp32, written and re-read by every
element-wise pass (the tanh, the log-softmax and their backward), which on a 2-core CPU made this loss about half of
the training step. Here the rows go through in chunks small enough to stay in cache, and the gradients of x and W
are computed in the same pass (the loss is the end of the graph, so its upstream gradient is one scalar), so nothing
of size (rows, vocab) outlives a chunk and the LM head's matmul is not recomputed in the backward.

On a GPU it is a matter of memory rather than speed: what the loss keeps for backward is dΣloss/dx (N, C) and
dΣloss/dW (V, C), 0.3 GiB at d20, instead of the fp32 logits of the whole batch (8 GiB at device batch 32), and
chunks of CHUNK_ROWS_GPU rows keep the matmuls large.

It is a custom op, so a compiled model calls it as one opaque kernel instead of tracing the chunk loop; the chunk
itself is compiled on its own. GPT.forward uses it on every device.
"""

import warnings

import torch

CHUNK_ROWS = 512  # (512, 32768) fp32 = 64 MiB per temporary; fewer, larger chunks re-read dW less often
CHUNK_ROWS_GPU = 2048  # 256 MiB per temporary: a few of them live at once, next to every activation of the step


def _chunk(xc: torch.Tensor, w: torch.Tensor, yc: torch.Tensor, softcap: float, need_grad: bool):
    """xc (c, C) and w (V, C) in the matmul dtype, yc (c,) → per-row losses (c,) fp32, and when `need_grad` the
    chunk's dΣloss/dxc (c, C) and its share of dΣloss/dW (V, C)."""
    t = torch.tanh((xc @ w.T).float() / softcap)  # (c, V): tanh(logits / softcap)
    z = softcap * t  # the capped logits
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (c, 1)
    valid = yc != -1
    index = torch.where(valid, yc, 0).unsqueeze(1)  # (c, 1)
    losses = (lse - z.gather(1, index)).squeeze(1) * valid
    if not need_grad:
        return losses, None, None
    p = torch.exp(z - lse).scatter_add(1, index, torch.full_like(lse, -1.0))  # softmax(z) − onehot(target)
    g = (p * (1 - t * t) * valid.unsqueeze(1)).to(xc.dtype)  # × dz/dlogits = 1 − tanh²
    return losses, g @ w, g.T @ xc


class _ChunkKernel:
    """`_chunk` compiled on first use: inductor fuses its element-wise passes (tanh, log-sum-exp, softmax gradient)
    into a few loops, about 2x faster than eager ops here. If compiling fails (no C++ compiler), the eager `_chunk`
    from then on, with one warning."""

    def __init__(self):
        self.compiled = None  # built lazily: importing the model stays cheap
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                self.compiled = self.compiled or torch.compile(_chunk, dynamic=False)
                return self.compiled(*args)
            except Exception as e:  # inductor unavailable here: the same maths in eager ops
                self.failed = True
                warnings.warn(f"softcap_cross_entropy: torch.compile failed ({type(e).__name__}); using eager ops")
        return _chunk(*args)


_run_chunk = _ChunkKernel()


@torch.library.custom_op("nanochat::softcap_cross_entropy", mutates_args=())
def _softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                           mm_dtype: torch.dtype, need_grad: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, C), weight (V, C), targets (N,) → Σ loss (fp32 scalar), per-row losses (N,), dΣ/dx, dΣ/dW
    (the gradients are empty when not `need_grad`)."""
    N = x.size(0)
    rows = torch.empty(N, dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if need_grad else x.new_empty(0)
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else weight.new_empty(0)
    with torch.autocast(x.device.type, enabled=False):  # the dtypes are explicit here
        w = weight.to(mm_dtype)
        step = CHUNK_ROWS if x.device.type == "cpu" else CHUNK_ROWS_GPU
        for i in range(0, N, step):
            xc = x[i:i + step].to(mm_dtype)
            rows[i:i + step], gx, gw = _run_chunk(xc, w, targets[i:i + step], softcap, need_grad)
            if need_grad:
                grad_x[i:i + step] = gx
                grad_w += gw
    return rows.sum(), rows, grad_x, grad_w.to(weight.dtype)


@_softcap_cross_entropy.register_fake
def _(x, weight, targets, softcap, mm_dtype, need_grad):
    grad_x = torch.empty_like(x) if need_grad else x.new_empty(0)
    grad_w = torch.empty_like(weight) if need_grad else weight.new_empty(0)
    return x.new_empty((), dtype=torch.float32), x.new_empty(x.size(0), dtype=torch.float32), grad_x, grad_w


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3])
    ctx.mark_non_differentiable(output[1], output[2], output[3])


def _backward(ctx, grad_sum, grad_rows, grad_grad_x, grad_grad_w):
    grad_x, grad_w = ctx.saved_tensors
    if grad_x.numel() == 0 and grad_w.numel() == 0:
        raise RuntimeError("softcap_cross_entropy was called without need_grad; its loss has no gradient")
    return grad_sum * grad_x, grad_sum * grad_w, None, None, None, None


_softcap_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                          reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(softcap · tanh(x @ weight.T / softcap), targets, ignore_index=-1, reduction), chunked.

    x (..., C), weight (V, C), targets (...). The matmul runs in the autocast dtype when autocast is on (like
    nn.Linear would), the soft-cap and the softmax in fp32. reduction="none" (per-position losses, shaped like
    targets) has no gradient: it is what evaluation needs.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not one of mean, sum, none")
    device = x.device.type
    autocast = device in ("cuda", "cpu") and torch.is_autocast_enabled(device)  # (the meta device has none)
    mm_dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    need_grad = reduction != "none" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    flat_targets = targets.reshape(-1)
    total, rows, _, _ = _softcap_cross_entropy(x.reshape(-1, x.size(-1)), weight, flat_targets, softcap, mm_dtype,
                                               need_grad)
    if reduction == "none":
        return rows.view(targets.shape)
    if reduction == "sum":
        return total
    return total / (flat_targets != -1).sum()
