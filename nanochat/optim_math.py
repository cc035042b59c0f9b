"""The update maths of MuonAdamW, written once: Muon for stacks of same-shape matrices (k, rows, cols), AdamW for lists
of tensors. The one-process step (nanochat/optim.py) and the sharded one (nanochat/optim_shard.py) differ only in
which matrices and slices they hand these functions; neither holds a second copy of the maths.

Muon: Nesterov momentum; the update is orthogonalised with 5 "Polar Express" quintic iterations (an approximation
of U·Vᵀ from the SVD) and rescaled to ‖·‖_F = √min(rows, cols); a per-neuron second-moment normalisation (β2 0.9,
Frobenius norm kept) evens out how much each neuron moves; the step is scaled by √max(1, rows/cols), with cautious
decoupled weight decay (only where the update and the weight agree in sign) at that same scaled rate. A stack of k
matrices is one batched matmul chain, so a step costs a few dozen calls per shape instead of per matrix.

AdamW keeps its maths in fp32 with eps 1e-10, in torch._foreach calls over all tensors of a param group (one
multi-tensor kernel per call on CUDA). Its moments are stored in the parameter's dtype, as the reference does: fp32
for fp32 parameters, bf16 for the bf16 embedding tables on CUDA (1.7 GiB less at d20), which step through fp32
copies of parameter and moments that are written back.
"""

import math

import torch

POLAR_EXPRESS = [
    (8.15655, -22.48329, 15.87877),
    (4.04293, -2.80892, 0.50002),
    (3.89167, -2.77248, 0.50606),
    (3.28575, -2.36813, 0.46449),
    (2.34654, -1.70978, 0.42324),
]


def orthogonalize(g: torch.Tensor, dtype: torch.dtype = torch.float32, equalize_rows: bool = False) -> torch.Tensor:
    """Push the singular values of every matrix of g (..., rows, cols) towards 1 with 5 quintic iterations; returns
    g's dtype with each matrix's ‖·‖_F = √min(rows, cols), the norm of an exactly orthogonal matrix of that shape."""
    x = g.to(dtype)
    if equalize_rows:  # every output neuron's row counts equally, whatever the scale of its gradient
        x = x / (x.norm(dim=-1, keepdim=True) + 1e-7)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide orientation: X Xᵀ is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    for a, b, c in POLAR_EXPRESS:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    target = min(x.shape[-2:]) ** 0.5
    x = x * (target / (x.float().norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(x.dtype)
    return x.to(g.dtype)


def neuron_stat_shape(p: torch.Tensor) -> tuple[int, int]:
    """Shape of one matrix's neuron statistics: a neuron is a row of a tall (or square) matrix, a column of a wide
    one."""
    rows, cols = p.shape[-2:]
    return (rows, 1) if rows >= cols else (1, cols)


def normalize_neurons(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """Per-neuron second-moment normalisation of orthogonalised updates (..., rows, cols), keeping each matrix's
    Frobenius norm. `second_moment` (..., rows, 1) or (..., 1, cols), fp32, is the running mean of each neuron's
    squared update, updated in place."""
    dim = -1 if update.size(-2) >= update.size(-1) else -2
    u = update.float()
    second_moment.lerp_(u.square().mean(dim=dim, keepdim=True), 1 - beta2)
    scaled = u * second_moment.clamp_min(1e-10).rsqrt()
    ratio = u.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    return (scaled * ratio).to(update.dtype)


def muon_apply(p: torch.Tensor, update: torch.Tensor, lr: float, wd: float) -> None:
    """p -= shaped lr · (cautious decay + update), for one matrix or a stack of same-shape matrices."""
    # tall matrices step further (√(rows/cols)); the decay uses that same rate, as the reference does
    shaped_lr = lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5
    if wd:
        cautious = (update * p) > 0  # decay only where the update already shrinks the weight
        p.sub_(p * cautious, alpha=shaped_lr * wd)
    p.sub_(update, alpha=shaped_lr)


def muon_update(p: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor,
                second_moment: torch.Tensor | None, *, momentum: float, lr: float, wd: float,
                ns_dtype: torch.dtype, equalize_rows: bool = False, neuron_beta2: float | None = 0.9,
                orthogonalize_fn=orthogonalize) -> None:
    """One Muon step of the matrices p (k, rows, cols), in place, from their gradients and state (momentum_buffer
    like p, second_moment (k, *neuron_stat_shape) fp32, both updated in place; neuron_beta2 None: no neuron
    normalisation). `orthogonalize_fn` is `orthogonalize` or a compiled copy of it."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    nesterov = grad.lerp(momentum_buffer, momentum)
    update = orthogonalize_fn(nesterov, ns_dtype, equalize_rows)
    if neuron_beta2 is not None:
        update = normalize_neurons(update, second_moment, neuron_beta2)
    muon_apply(p, update, lr, wd)


def adamw_state(p: torch.Tensor, dtype: torch.dtype | None = None) -> dict:
    """Fresh AdamW state of p (a whole tensor, or one rank's flat slice of it): moments in `dtype`, the parameter's
    own dtype where not given."""
    dtype = dtype or p.dtype
    return {"step": 0, "exp_avg": torch.zeros_like(p, dtype=dtype), "exp_avg_sq": torch.zeros_like(p, dtype=dtype)}


def adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict],
                 betas: tuple[float, float], lr: float, wd: float, eps: float) -> None:
    """One AdamW step of every tensor of `params` (whole tensors or flat slices) and its state, in place; an empty
    state dict is filled with adamw_state first."""
    for p, state in zip(params, states):
        if not state:
            state.update(adamw_state(p))
    steps = sorted({state["step"] for state in states})
    if len(steps) > 1:  # a tensor that missed steps (no gradient) has its own bias corrections
        for step in steps:
            same = [i for i, state in enumerate(states) if state["step"] == step]
            adamw_update([params[i] for i in same], [grads[i] for i in same], [states[i] for i in same], betas, lr,
                         wd, eps)
        return
    if not params:
        return
    beta1, beta2 = betas
    t = steps[0] + 1
    for state in states:
        state["step"] = t
    grads = [g.float() for g in grads]
    stored = params + [s["exp_avg"] for s in states] + [s["exp_avg_sq"] for s in states]
    work = [t if t.dtype == torch.float32 else t.float() for t in stored]  # the maths in fp32, whatever is stored
    n = len(params)
    params, exp_avgs, exp_avg_sqs = work[:n], work[n:2 * n], work[2 * n:]
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    # lr · m̂ / (√v̂ + eps) with both bias corrections folded into scalars: m̂/(√v̂ + eps) equals
    # m·√bc2/bc1 / (√v + eps·√bc2), which takes fewer passes over these large tensors
    bc1, bc2_sqrt = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, eps * bc2_sqrt)
    if wd:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-lr * bc2_sqrt / bc1)
    for kept, new in zip(stored, work):
        if kept is not new:
            kept.copy_(new)
