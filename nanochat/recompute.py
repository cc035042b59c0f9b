"""Two pieces of the block that recompute a cheap tensor in backward instead of keeping it for the whole step.

Every tensor a layer keeps for backward stays alive from its forward to its backward, so at d20, device batch 32,
one (B, T, C) bf16 tensor a layer is 3.3 GiB over the model and one (B, T, 4C) is 13 GiB. Autograd's own formulas
keep two tensors in two places where one suffices:
- the residual mix h = λ_resid·x + λ_x0·x0 followed by rms_norm(h): autograd keeps x (for dλ_resid) and h (for the
  norm); `mix_and_norm` keeps x and x0 (x0 is one tensor shared by every layer) and recomputes h and its norm;
- ReLU² then the MLP's output projection: autograd keeps ReLU's output (for the square) and the square (for the
  matmul's weight gradient), two (B, T, 4C) tensors; `relu_square_linear` keeps the pre-activation only and
  recomputes the square, an element-wise op, in backward.
Both compute exactly what the plain ops compute (tests/test_memory.py checks values and gradients against them).
"""

import torch
import torch.nn.functional as F


def _norm(h: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(h, (h.size(-1),))


class _MixAndNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x0, resid_lambda, x0_lambda):
        h = resid_lambda * x + x0_lambda * x0
        ctx.save_for_backward(x, x0, resid_lambda, x0_lambda)
        return h, _norm(h)

    @staticmethod
    def backward(ctx, grad_h, grad_normed):
        x, x0, resid_lambda, x0_lambda = ctx.saved_tensors
        with torch.enable_grad():
            h = (resid_lambda * x + x0_lambda * x0).detach().requires_grad_()
            (grad_through_norm,) = torch.autograd.grad(_norm(h), h, grad_normed)
        g = grad_through_norm if grad_h is None else grad_h + grad_through_norm
        acc = torch.promote_types(g.dtype, torch.float32)  # the two sums run over B·T·C products
        grad_resid = (g.to(acc) * x.to(acc)).sum().to(resid_lambda.dtype).reshape(resid_lambda.shape)
        grad_x0_lambda = (g.to(acc) * x0.to(acc)).sum().to(x0_lambda.dtype).reshape(x0_lambda.shape)
        return resid_lambda * g, x0_lambda * g, grad_resid, grad_x0_lambda


def mix_and_norm(x: torch.Tensor, x0: torch.Tensor, resid_lambda: torch.Tensor,
                 x0_lambda: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = resid_lambda·x + x0_lambda·x0; x, x0 (B, T, C), the lambdas 0-d in x's dtype.
    Keeps x and x0 for backward, not h."""
    if not torch.is_grad_enabled():  # inference: the plain ops, nothing to keep
        h = resid_lambda * x + x0_lambda * x0
        return h, _norm(h)
    return _MixAndNorm.apply(x, x0, resid_lambda, x0_lambda)


class _ReluSquareLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, weight):
        ctx.save_for_backward(u, weight)
        return F.linear(F.relu(u).square(), weight)

    @staticmethod
    def backward(ctx, grad):
        u, weight = ctx.saved_tensors
        r = F.relu(u)
        grad_weight = grad.reshape(-1, grad.size(-1)).mT @ r.square().reshape(-1, r.size(-1))  # (out, 4C)
        grad_u = (grad @ weight) * (2 * r)
        return grad_u, grad_weight


def relu_square_linear(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(relu(u)², weight); u (..., 4C), weight (C, 4C) in u's dtype. Keeps u for backward, not relu(u)²."""
    if not torch.is_grad_enabled():
        return F.linear(F.relu(u).square(), weight)
    return _ReluSquareLinear.apply(u, weight)
