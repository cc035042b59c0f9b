"""One optimizer for the whole model: Muon for the 2-D matrices of the blocks, AdamW for everything else.

Muon: Nesterov momentum; the update is orthogonalised with 5 "Polar Express" quintic iterations (an approximation
of U·Vᵀ from the SVD) and rescaled to ‖·‖_F = √min(rows, cols); a per-neuron second-moment normalisation (β2 0.9,
Frobenius norm kept) evens out how much each neuron moves; the step is scaled by √max(1, rows/cols), with cautious
decoupled weight decay (only where the update and the weight agree in sign) at that same scaled rate. AdamW keeps its
maths in fp32 with eps 1e-10.

The reference design also equalises the rows' norms before orthogonalising (`equalize_rows`). Measured here on d4
over 60 steps (491,520 tokens, bf16): val bpb 2.2972 with it, 2.2899 without, 2.2891 with neither it nor the neuron
normalisation; so it is off by default and the neuron normalisation (neutral here, used at scale) stays on.

Under torchrun the optimizer is sharded ZeRO-2 style (no DDP wrapper; see nanochat/optim_shard.py for the layout):
one reduce-scatter per dtype hands each rank the averaged gradient of its slice of every AdamW tensor and of its
share of the Muon matrices; the rank keeps only that slice's state, updates it (Newton–Schulz batched over matrices of
one shape), and one all-gather returns the updated parameters to every rank. A single process runs the plain loop.
"""

import math

import torch
import torch.distributed as dist

POLAR_EXPRESS = [
    (8.15655, -22.48329, 15.87877),
    (4.04293, -2.80892, 0.50002),
    (3.89167, -2.77248, 0.50606),
    (3.28575, -2.36813, 0.46449),
    (2.34654, -1.70978, 0.42324),
]


def orthogonalize(g: torch.Tensor, dtype: torch.dtype = torch.float32, equalize_rows: bool = False) -> torch.Tensor:
    """Push the singular values of g (rows, cols) towards 1 with 5 quintic iterations; returns g's dtype with
    ‖·‖_F = √min(rows, cols), the norm of an exactly orthogonal matrix of that shape."""
    x = g.to(dtype)
    if equalize_rows:  # every output neuron's row counts equally, whatever the scale of its gradient
        x = x / (x.norm(dim=1, keepdim=True) + 1e-7)
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the wide orientation: X Xᵀ is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() * 1.01 + 1e-7)
    for a, b, c in POLAR_EXPRESS:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    x = x * (min(x.shape) ** 0.5 / (x.float().norm() + 1e-7)).to(x.dtype)
    return x.to(g.dtype)


def normalize_neurons(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """Per-neuron second-moment normalisation of an orthogonalised update, keeping its Frobenius norm.

    A neuron is a row of a tall (or square) matrix and a column of a wide one; `second_moment` ((rows, 1) or
    (1, cols), fp32) is the running mean of that neuron's squared update, updated in place.
    """
    dim = 1 if update.size(0) >= update.size(1) else 0
    u = update.float()
    second_moment.lerp_(u.square().mean(dim=dim, keepdim=True), 1 - beta2)
    scaled = u * second_moment.clamp_min(1e-10).rsqrt()
    scaled = scaled * (u.norm() / scaled.norm().clamp_min(1e-10))
    return scaled.to(update.dtype)


def orthogonalize_stack(g: torch.Tensor, dtype: torch.dtype = torch.float32,
                        equalize_rows: bool = False) -> torch.Tensor:
    """`orthogonalize` for a stack of same-shape matrices (k, rows, cols) in one batched matmul chain."""
    x = g.to(dtype)
    if equalize_rows:
        x = x / (x.norm(dim=-1, keepdim=True) + 1e-7)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
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


def normalize_neurons_stack(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """`normalize_neurons` for a stack (k, rows, cols); second_moment is (k, rows, 1) or (k, 1, cols)."""
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


def adamw_update(p: torch.Tensor, grad: torch.Tensor, state: dict, betas: tuple[float, float], lr: float, wd: float,
                 eps: float) -> None:
    """One AdamW step of p (a whole tensor, or one rank's flat slice of it) and its state (step, exp_avg,
    exp_avg_sq)."""
    beta1, beta2 = betas
    grad = grad.float()
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
    state["step"] += 1
    t = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # lr · m̂ / (√v̂ + eps) with both bias corrections folded into scalars: m̂/(√v̂ + eps) equals
    # m·√bc2/bc1 / (√v + eps·√bc2), which takes fewer passes over these large tensors
    bc1, bc2_sqrt = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
    denom = exp_avg_sq.sqrt().add_(eps * bc2_sqrt)
    if wd:
        p.mul_(1 - lr * wd)
    p.addcdiv_(exp_avg, denom, value=-lr * bc2_sqrt / bc1)


def neuron_stat_shape(p: torch.Tensor) -> tuple[int, int]:
    return (p.size(0), 1) if p.size(0) >= p.size(1) else (1, p.size(1))


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry `kind` ('muon' or 'adamw'), `lr`, `weight_decay`, and `momentum` or `betas`.

    The training loops set `lr`, `momentum` and `weight_decay` each step through `apply_schedule`.
    """

    def __init__(self, param_groups: list[dict], eps: float = 1e-10, ns_dtype: torch.dtype | None = None,
                 equalize_rows: bool = False, neuron_beta2: float | None = 0.9):
        for g in param_groups:
            if g.get("kind") not in ("muon", "adamw"):
                raise ValueError(f"param group {g.get('name')} needs kind 'muon' or 'adamw'")
            if g["kind"] == "muon" and any(p.ndim != 2 for p in g["params"]):
                raise ValueError("Muon only takes 2-D matrices")
        super().__init__(param_groups, dict(eps=eps))
        self.ns_dtype = ns_dtype
        self.equalize_rows, self.neuron_beta2 = equalize_rows, neuron_beta2  # neuron_beta2 None: no normalisation

    def _ns_dtype(self, p: torch.Tensor) -> torch.dtype:
        if self.ns_dtype is not None:
            return self.ns_dtype
        return torch.bfloat16 if p.is_cuda else torch.float32

    @torch.no_grad()
    def step(self, closure=None, grad_clip: float = 0.0):
        """One update from the gradients of this process's backward passes. Under torchrun the gradients are
        averaged over processes here (callers never reduce them); `grad_clip` > 0 first clips the averaged
        gradient's global norm to it."""
        if grad_clip > 0:
            self.clip_grad_norm_(grad_clip)
        if self.world_size() > 1:
            from nanochat.optim_shard import sharded_step  # a cycle: optim_shard builds on this module's updates
            sharded_step(self)
            return
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw(group)
        muon_params = [p for g in self.param_groups if g["kind"] == "muon" for p in g["params"] if p.grad is not None]
        updates = self._muon_updates(muon_params)
        for group in self.param_groups:
            if group["kind"] != "muon":
                continue
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = updates[id(p)]
                if self.neuron_beta2 is not None:
                    state = self.state[p]
                    if "second_moment" not in state:
                        state["second_moment"] = torch.zeros(neuron_stat_shape(p), device=p.device)
                    update = normalize_neurons(update, state["second_moment"], self.neuron_beta2)
                muon_apply(p, update, lr, wd)

    def apply_schedule(self, lr: float, momentum: float | None = None, weight_decay: float | None = None) -> None:
        """This step's settings: every group's rate = its initial rate × `lr`; Muon's momentum = `momentum` and its
        weight decay = its initial decay × `weight_decay`, where given (nanochat.scaling's *_schedule functions)."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lr
            if group["kind"] == "muon":
                if momentum is not None:
                    group["momentum"] = momentum
                if weight_decay is not None:
                    group["weight_decay"] = group["initial_weight_decay"] * weight_decay

    def warm_start(self, states: list[dict]) -> None:
        """Another run's moments (Muon momentum, AdamW first and second moments; every rank's shard, re-sharded for
        this run) with this run's learning rates, weight decay and betas kept."""
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        self.load_state_dicts(states)
        for group, kept in zip(self.param_groups, settings):
            group.update(kept)

    @staticmethod
    def world_size() -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the averaged gradient's global norm under torchrun (on the reduce-scattered shards, so step() does not
        reduce again); a single process clips its own gradients. Returns the norm before clipping."""
        if self.world_size() > 1:
            from nanochat.optim_shard import clip_sharded_grad_norm_  # a cycle, as in step()
            return clip_sharded_grad_norm_(self, max_norm)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def state_dict(self) -> dict:
        """torch's optimizer state dict plus the world size whose layout its tensors follow: under torchrun each rank's
        holds only its own shard (see nanochat/optim_shard.py)."""
        return dict(super().state_dict(), world_size=self.world_size())

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("world_size", 1)
        if saved != self.world_size():
            raise ValueError(f"optimizer state saved by {saved} process(es), loaded by {self.world_size()}: "
                             "pass every rank's state to load_state_dicts to re-shard it")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "world_size"})

    def load_state_dicts(self, states: list[dict]) -> None:
        """Load the state dicts of every rank (in rank order) of a run with any world size, re-sharded for this
        one."""
        from nanochat.optim_shard import merge_state_dicts, shard_state_dict  # a cycle, as in step()
        world = self.world_size()
        if len(states) == 1 and states[0].get("world_size", 1) == world:
            return self.load_state_dict(states[0])
        full = merge_state_dicts(self.param_groups, states)
        if world > 1:
            full = shard_state_dict(self.param_groups, full, dist.get_rank(), world)
        super().load_state_dict(full)

    def _muon_updates(self, params: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        group_of = {id(p): g for g in self.param_groups if g["kind"] == "muon" for p in g["params"]}
        updates = {}
        for p in params:
            momentum = group_of[id(p)]["momentum"]
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            nesterov = p.grad.lerp(buf, momentum)
            updates[id(p)] = orthogonalize(nesterov, self._ns_dtype(p), self.equalize_rows)
        return updates

    def _adamw(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is not None:
                adamw_update(p, p.grad, self.state[p], group["betas"], group["lr"], group["weight_decay"], group["eps"])
