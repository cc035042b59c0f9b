"""ZeRO-2-style sharding of MuonAdamW over torchrun processes, written with plain torch.distributed.

The layout is a pure function of the parameter shapes and the world size W, so any rank (or a later run with another
W) can recompute where every piece of state lives:
- each AdamW tensor of n elements is flattened, padded to W·s (s = ceil(n / W)) and cut into W slices; rank r owns
  slice r and keeps AdamW state for those s elements only;
- the Muon matrices of a param group are bucketed by shape; a bucket of n matrices is padded to W·k (k = ceil(n / W))
  and rank r owns matrices r·k … r·k + k − 1, whose momentum and neuron statistics it keeps (padding matrices are
  zeros, and the update maths keeps zeros at zero).
A rank's pieces lie end to end in one flat segment of S elements; the whole model is a (W, S) buffer whose row r is
rank r's segment. The buffers live only inside a step: kept between steps they held 4.4 GiB on every rank at d20 on
8 ranks (the (W, S) buffer and two segments), six times the rank's optimizer state (0.68 GiB). One step:
  1. pack every gradient into the buffer; one reduce-scatter (sum, then ÷W) leaves rank r its segment of averaged
     gradients;
  2. AdamW on its slices, Muon on its matrices (Newton–Schulz batched over each bucket's k matrices, compiled on
     CUDA), written into its segment of parameters;
  3. one all-gather of the segments, unpacked into every parameter.
Communication per step and rank (ring algorithms): (W−1)/W · W·S · 4 bytes sent in the reduce-scatter and as much in
the all-gather: the volume of one all-reduce of the gradients (see bench/optim_shard.py for the d20 figures).

Overlapping the reduce-scatter with the backward pass (bucketed hooks) is not done: gloo on CPU gains nothing from it
and a GPU measurement is still to be made.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.common import print0
from nanochat.optim_math import adamw_state, adamw_update, muon_update, neuron_stat_shape


@dataclass(frozen=True)
class AdamSlice:
    index: int  # position among all parameters, the key of torch's optimizer state dict
    group: int
    numel: int
    shard: int  # s: elements per rank (the last ranks' slices end in padding)
    offset: int  # start of this tensor's slice in a segment


@dataclass(frozen=True)
class MuonBucket:
    indices: tuple[int, ...]  # the bucket's matrices, in parameter order
    group: int
    shape: tuple[int, int]
    per_rank: int  # k: matrices per rank, padding included
    offset: int

    def owner(self, j: int) -> tuple[int, int]:
        """(rank, slot) of the bucket's j-th matrix."""
        return divmod(j, self.per_rank)


@dataclass(frozen=True)
class ShardPlan:
    world: int
    adam: tuple[AdamSlice, ...]
    muon: tuple[MuonBucket, ...]
    segment: int  # S: elements per rank

    def owned_indices(self, rank: int) -> set[int]:
        """Parameters whose state rank `rank` holds: a slice of every AdamW tensor, its own Muon matrices."""
        owned = {a.index for a in self.adam}
        for b in self.muon:
            owned |= {i for j, i in enumerate(b.indices) if b.owner(j)[0] == rank}
        return owned


def plan_shards(param_groups: list[dict], world: int) -> ShardPlan:
    """Where each rank's share of every parameter sits; works on meta-device parameters too (for sizing)."""
    adam, muon, offset, index = [], [], 0, 0
    for gi, group in enumerate(param_groups):
        params = list(group["params"])
        if group["kind"] == "adamw":
            for p in params:
                shard = math.ceil(p.numel() / world)
                adam.append(AdamSlice(index, gi, p.numel(), shard, offset))
                offset += shard
                index += 1
        else:
            by_shape: dict[tuple[int, int], list[int]] = {}
            for p in params:
                by_shape.setdefault(tuple(p.shape), []).append(index)
                index += 1
            for shape, indices in by_shape.items():
                k = math.ceil(len(indices) / world)
                muon.append(MuonBucket(tuple(indices), gi, shape, k, offset))
                offset += k * shape[0] * shape[1]
    return ShardPlan(world, tuple(adam), tuple(muon), offset)


class _Shards:
    """Per-optimizer buffers and layout, built at the first sharded step."""

    def __init__(self, optimizer, world: int, rank: int):
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.plan = plan_shards(optimizer.param_groups, world)
        self.rank, self.world = rank, world
        self.dtype, self.device = communication_dtype(self.params), self.params[0].device
        self.grads: torch.Tensor | None = None  # my averaged gradients, from the reduce-scatter to the step's end
        self.use_reduce_scatter = True
        self.stacks: dict[int, dict[str, torch.Tensor]] = {}  # bucket number -> stacked Muon state of my matrices


def communication_dtype(params) -> torch.dtype:
    """The dtype of the step's buffers: the widest parameter dtype (fp32 when the CUDA policy keeps the embedding
    tables in bf16 and the rest in fp32). Gradients are packed into it and parameters written back from it by
    casting copies, so an all-fp32 model steps exactly as before and a bf16 table is rounded once, at write-back."""
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _shards(optimizer) -> _Shards:
    world, rank = dist.get_world_size(), dist.get_rank()
    shards = getattr(optimizer, "_shards", None)
    if shards is None or shards.world != world:
        shards = optimizer._shards = _Shards(optimizer, world, rank)
    return shards


def _buffer(s: _Shards, rows: int) -> torch.Tensor:
    """A zeroed (rows, S) buffer for one collective: padding must read as zeros, and is never written."""
    return torch.zeros(rows, s.plan.segment, dtype=s.dtype, device=s.device)


def _pack_gradients(s: _Shards) -> torch.Tensor:
    """(W, S): every gradient, each rank's pieces in its row."""
    buf = _buffer(s, s.world)
    for a in s.plan.adam:
        grad = s.params[a.index].grad
        full, tail = divmod(a.numel, a.shard)
        cols = slice(a.offset, a.offset + a.shard)
        if grad is None:  # every rank must send the same layout: a missing gradient counts as zero
            buf[:, cols].zero_()
            continue
        g = grad.reshape(-1)
        if full:
            buf[:full, cols].copy_(g[:full * a.shard].view(full, a.shard))
        if tail:
            buf[full, a.offset:a.offset + tail].copy_(g[full * a.shard:])
    for b in s.plan.muon:
        size = b.shape[0] * b.shape[1]
        for j, index in enumerate(b.indices):
            rank, slot = b.owner(j)
            start = b.offset + slot * size
            grad = s.params[index].grad
            if grad is None:
                buf[rank, start:start + size].zero_()
            else:
                buf[rank, start:start + size].copy_(grad.reshape(-1))
    return buf


def reduce_gradients(optimizer) -> torch.Tensor:
    """This rank's segment of the averaged gradients (once per step; clip_grad_norm_ may already have done it)."""
    s = _shards(optimizer)
    if s.grads is not None:
        return s.grads
    buf = _pack_gradients(s)
    s.grads = _buffer(s, 1)[0]
    if s.use_reduce_scatter:
        try:
            dist.reduce_scatter_tensor(s.grads, buf.view(-1), op=dist.ReduceOp.SUM)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            # some gloo builds lack reduce_scatter: an all-reduce then a slice gives the same sums at twice the traffic
            print0(f"note: {dist.get_backend()} has no reduce_scatter_tensor ({str(e).splitlines()[0][:80]}); "
                   "using all_reduce for the gradients")
            s.use_reduce_scatter = False
    if not s.use_reduce_scatter:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        s.grads.copy_(buf[s.rank])
    s.grads /= s.world
    return s.grads


def clip_sharded_grad_norm_(optimizer, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ on the averaged gradient, computed from each rank's segment (padding is 0)."""
    grads = reduce_gradients(optimizer)
    total = grads.float().square().sum()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    total = total.sqrt()
    grads.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0).to(grads.dtype))
    return total


def muon_stack(optimizer, params: list[torch.Tensor], stacks: dict[int, dict[str, torch.Tensor]], number: int,
               bucket: MuonBucket, rank: int) -> dict[str, torch.Tensor]:
    """Stacked momentum / neuron statistics of rank `rank`'s matrices of a bucket, kept in `stacks`; each matrix's
    optimizer state holds views into them (so state_dict() sees per-matrix tensors). Rebuilt after load_state_dict
    replaced those views."""
    mine = [(slot, params[i]) for j, i in enumerate(bucket.indices) if (slot := bucket.owner(j))[0] == rank]
    stack = stacks.get(number)
    if stack is not None and all(optimizer.state[p].get("momentum_buffer") is not None and
                                 optimizer.state[p]["momentum_buffer"].data_ptr() == stack["momentum"][slot].data_ptr()
                                 for (_, slot), p in mine):
        return stack
    k, (rows, cols) = bucket.per_rank, bucket.shape
    like = params[bucket.indices[0]]
    stack = {"momentum": torch.zeros(k, rows, cols, dtype=like.dtype, device=like.device),
             "second": torch.zeros(k, *neuron_stat_shape(like), dtype=torch.float32, device=like.device)}
    keys = [("momentum_buffer", "momentum")] + ([("second_moment", "second")] if optimizer.neuron_beta2 else [])
    for (_, slot), p in mine:
        state = optimizer.state[p]
        for key, name in keys:
            if key in state:
                stack[name][slot].copy_(state[key])
            state[key] = stack[name][slot]
    stacks[number] = stack
    return stack


@torch.no_grad()
def sharded_step(optimizer) -> None:
    s = _shards(optimizer)
    grads = reduce_gradients(optimizer)
    values, groups = _buffer(s, 1)[0], optimizer.param_groups  # my updated parameters (padding stays zero)
    adam: dict[int, tuple[list, list, list]] = {}  # param group -> my slices, their gradients, their states
    for a in s.plan.adam:
        p = s.params[a.index]
        start = s.rank * a.shard
        mine = max(0, min(a.numel, start + a.shard) - start)  # real elements in my slice; the rest is padding
        if mine:
            values[a.offset:a.offset + mine].copy_(p.reshape(-1)[start:start + mine])
        cols = slice(a.offset, a.offset + a.shard)
        slices, slice_grads, states = adam.setdefault(a.group, ([], [], []))
        slices.append(values[cols])
        slice_grads.append(grads[cols])
        if not optimizer.state[p]:  # moments in the parameter's dtype, not the buffer's
            optimizer.state[p].update(adamw_state(values[cols], dtype=p.dtype))
        states.append(optimizer.state[p])
    for number, (slices, slice_grads, states) in adam.items():
        group = groups[number]
        adamw_update(slices, slice_grads, states, group["betas"], group["lr"], group["weight_decay"], group["eps"])
    for number, b in enumerate(s.plan.muon):
        group = groups[b.group]
        k, (rows, cols) = b.per_rank, b.shape
        span = slice(b.offset, b.offset + k * rows * cols)
        g, p_stack = grads[span].view(k, rows, cols), values[span].view(k, rows, cols)
        for j, index in enumerate(b.indices):
            rank, slot = b.owner(j)
            if rank == s.rank:
                p_stack[slot].copy_(s.params[index])
        stack = muon_stack(optimizer, s.params, s.stacks, number, b, s.rank)
        muon_update(p_stack, g, stack["momentum"], stack["second"], momentum=group["momentum"], lr=group["lr"],
                    wd=group["weight_decay"], ns_dtype=optimizer._ns_dtype(s.params[b.indices[0]]),
                    equalize_rows=optimizer.equalize_rows, neuron_beta2=optimizer.neuron_beta2,
                    orthogonalize_fn=optimizer.orthogonalize)
    s.grads = None
    buf = torch.empty(s.world, s.plan.segment, dtype=s.dtype, device=s.device)
    try:
        dist.all_gather_into_tensor(buf.view(-1), values)
    except (RuntimeError, NotImplementedError, ValueError):
        dist.all_gather(list(buf.unbind(0)), values)
    _unpack_parameters(s, buf)


def _unpack_parameters(s: _Shards, buf: torch.Tensor) -> None:
    for a in s.plan.adam:
        p = s.params[a.index].view(-1)  # not .data: the write must bump the version the engine's copy watches
        full, tail = divmod(a.numel, a.shard)
        if full:
            p[:full * a.shard].copy_(buf[:full, a.offset:a.offset + a.shard].reshape(-1))
        if tail:
            p[full * a.shard:].copy_(buf[full, a.offset:a.offset + tail])
    for b in s.plan.muon:
        size = b.shape[0] * b.shape[1]
        for j, index in enumerate(b.indices):
            rank, slot = b.owner(j)
            start = b.offset + slot * size
            s.params[index].copy_(buf[rank, start:start + size].view(b.shape))


# ---------------------------------------------------------------------------------------------------------------------
# Re-sharding saved state (resume on another world size, warm starts)

def _kinds(param_groups: list[dict]) -> list[tuple[str, torch.Tensor]]:
    return [(g["kind"], p) for g in param_groups for p in g["params"]]


def merge_state_dicts(param_groups: list[dict], states: list[dict]) -> dict:
    """One whole (single-process layout) optimizer state dict from the state dicts of all ranks of a run, by rank."""
    world = states[0].get("world_size", 1)
    if len(states) != world:
        raise ValueError(f"optimizer state of {world} ranks needs all {world} state dicts, got {len(states)}")
    merged = {}
    for index, (kind, p) in enumerate(_kinds(param_groups)):
        pieces = [st["state"][index] for st in states if index in st["state"]]
        if not pieces:
            continue
        if kind == "adamw" and world > 1:
            entry = {"step": pieces[0]["step"]}
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = torch.cat([piece[key].reshape(-1) for piece in pieces])[:p.numel()].view(p.shape)
            merged[index] = entry
        else:  # a Muon matrix lives on its owner only (or this is a single-process state)
            merged[index] = {k: v.clone() if torch.is_tensor(v) else v for k, v in pieces[0].items()}
    return {"state": merged, "param_groups": states[0]["param_groups"]}


def shard_state_dict(param_groups: list[dict], full: dict, rank: int, world: int) -> dict:
    """The part of a whole optimizer state dict that rank `rank` of `world` holds."""
    plan = plan_shards(param_groups, world)
    owned = plan.owned_indices(rank)
    adam = {a.index: a for a in plan.adam}
    state = {}
    for index, entry in full["state"].items():
        if index not in owned:
            continue
        if index in adam:
            a = adam[index]
            entry = dict(entry)
            for key in ("exp_avg", "exp_avg_sq"):
                flat = torch.zeros(a.shard * world, dtype=entry[key].dtype, device=entry[key].device)
                flat[:a.numel] = entry[key].reshape(-1)
                entry[key] = flat[rank * a.shard:(rank + 1) * a.shard].clone()
        state[index] = entry
    return {"state": state, "param_groups": full["param_groups"]}


def state_bytes(param_groups: list[dict], world: int, neuron_stats: bool = True) -> dict:
    """Optimizer-state bytes per rank (AdamW m and v and Muon momentum in their parameter's dtype, Muon neuron
    statistics in fp32) and the elements each rank sends per step, from shapes alone (meta-device parameters are
    fine)."""
    plan = plan_shards(param_groups, world)
    params = [p for g in param_groups for p in g["params"]]
    nbytes = sum(2 * a.shard * params[a.index].element_size() for a in plan.adam)
    for b in plan.muon:
        stat = math.prod(neuron_stat_shape(params[b.indices[0]])) if neuron_stats else 0
        nbytes += b.per_rank * (b.shape[0] * b.shape[1] * params[b.indices[0]].element_size() + 4 * stat)
    return {"world_size": world, "state_bytes_per_rank": nbytes,
            "segment_elements": plan.segment, "padded_elements": world * plan.segment}
