"""One optimizer for the whole model: Muon for the 2-D matrices of the blocks, AdamW for everything else (the update
maths, written once for both layouts below, is in nanochat/optim_math.py).

The reference design also equalises the rows' norms before orthogonalising (`equalize_rows`). Measured here on d4
over 60 steps (491,520 tokens, bf16): val bpb 2.2972 with it, 2.2899 without, 2.2891 with neither it nor the neuron
normalisation; so it is off by default and the neuron normalisation (neutral here, used at scale) stays on.

Under torchrun the optimizer is sharded ZeRO-2 style (no DDP wrapper; see nanochat/optim_shard.py for the layout):
one reduce-scatter (in the widest parameter dtype, fp32) hands each rank the averaged gradient of its slice of every AdamW tensor and of its
share of the Muon matrices; the rank keeps only that slice's state, updates it, and one all-gather returns the
updated parameters to every rank. A single process steps each Muon param group's matrices of one shape as one stack
and each AdamW group in multi-tensor calls. Either way Newton–Schulz is batched over the matrices of one shape, and
compiled once per shape on CUDA.
"""

import torch
import torch.distributed as dist

from nanochat.optim_math import adamw_update, muon_update, orthogonalize
from nanochat.optim_shard import (clip_sharded_grad_norm_, merge_state_dicts, muon_stack, plan_shards,
                                  shard_state_dict, sharded_step)


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
        on_cuda = any(p.is_cuda for g in self.param_groups for p in g["params"])
        # one graph per stack shape (a handful per model), fused by Inductor; CPUs run it eagerly
        self.orthogonalize = torch.compile(orthogonalize, dynamic=False) if on_cuda else orthogonalize
        self._plan = plan_shards(self.param_groups, 1)  # one process: each group's matrices of one shape, stacked
        self._stacks: dict[int, dict[str, torch.Tensor]] = {}  # their stacked Muon state, by bucket number

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
            sharded_step(self)
            return
        for group in self.param_groups:
            if group["kind"] == "adamw":
                live = [p for p in group["params"] if p.grad is not None]
                adamw_update(live, [p.grad for p in live], [self.state[p] for p in live], group["betas"], group["lr"],
                             group["weight_decay"], group["eps"])
        self._muon_step()

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
        world = self.world_size()
        if len(states) == 1 and states[0].get("world_size", 1) == world:
            return self.load_state_dict(states[0])
        full = merge_state_dicts(self.param_groups, states)
        if world > 1:
            full = shard_state_dict(self.param_groups, full, dist.get_rank(), world)
        super().load_state_dict(full)

    def _muon_step(self) -> None:
        """Muon on one process: the matrices of each param group and shape as one stack (k, rows, cols), updated in
        one batched call chain and copied back. A matrix without a gradient counts as a zero gradient (momentum and
        decay still move it), as under torchrun; a stack where none has one is skipped."""
        params = [p for g in self.param_groups for p in g["params"]]
        for number, bucket in enumerate(self._plan.muon):
            matrices = [params[i] for i in bucket.indices]
            if all(p.grad is None for p in matrices):
                continue
            group = self.param_groups[bucket.group]
            grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in matrices])
            stack = muon_stack(self, params, self._stacks, number, bucket, rank=0)
            p_stack = torch.stack(matrices)  # (k, rows, cols)
            muon_update(p_stack, grads, stack["momentum"], stack["second"], momentum=group["momentum"],
                        lr=group["lr"], wd=group["weight_decay"], ns_dtype=self._ns_dtype(matrices[0]),
                        equalize_rows=self.equalize_rows, neuron_beta2=self.neuron_beta2,
                        orthogonalize_fn=self.orthogonalize)
            torch._foreach_copy_(matrices, list(p_stack.unbind(0)))
