"""How much GPU memory a training run needs, per GPU, counted from the real model and optimizer without a GPU.

The model and its optimizer are built on the meta device (shapes and dtypes, no storage), with the dtype policy of
the device the run targets (`GPT.apply_dtype_policy`), and their tensors are counted:
- parameters (and buffers), their gradients (one per trainable parameter, in its dtype; every rank keeps all of
  them, the sharded optimizer reduces them in step());
- optimizer state: one world-size-1 step on meta gradients, whose state tensors are counted; under torchrun, each
  rank's share from the sharded layout (`nanochat.optim_shard.state_bytes`);
- nothing else is kept between steps: the optimizer's working buffers are allocated inside `step()` and freed at its
  end, so they are a transient of the step, not static memory. Under torchrun, the step holds at most the gathered
  (W, S) buffer and two segments of S elements in the widest parameter dtype (`nanochat.optim_shard`); on one GPU,
  the largest Muon stack's gradients and parameters (k, rows, cols). The step runs after backward has freed the
  activations, so its peak is static + this transient.
Then one forward and backward of a device batch runs on the meta device under `torch.autograd.graph.
saved_tensors_hooks`, which sees every tensor autograd keeps for the backward pass; storages are deduplicated (views
of one tensor count once) and parameters are not counted again. Attention is traced as the flash kernel CUDA runs
(FA3 or SDPA's flash backend): it keeps q, k, v, its output and an fp32 log-sum-exp per query and head, never the
(T, T) scores that the meta device's SDPA fallback would; rms_norm as CUDA's fused kernel, which keeps its input and
an fp32 reciprocal RMS per row.

The trace is of the eager code. A compiled model (the default on CUDA) may save less (Inductor recomputes cheap
element-wise ops) or keep temporaries of its own; the peak printed here is an estimate:
    backward peak = static + all saved activations + the loss's share + the largest layer's saved bytes again
(the gradients of one layer's activations while its saved tensors are still alive; it also covers the chunked
loss's temporaries at the end of forward), before allocator fragmentation. Calibration, d20 at device batch 32 x 2048
in bf16 on one GPU: on the code measured on 2026-11-26 (95.4 GiB peak allocated) the estimate is 93.5 GiB; the
reference design measured 71.9 GiB compiled, and the same trace of its eager graph keeps 3.09 GiB a layer and 16.4 GiB
for the loss.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.distributed as dist

from nanochat import gpt as gpt_module
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig

GiB = 2 ** 30


@dataclass
class MemoryEstimate:
    """Bytes per GPU of one training run's parts; see the module docstring for how each is counted."""
    config: GPTConfig
    device_batch_size: int
    world_size: int
    device_type: str
    dtype: torch.dtype
    parameters: int
    gradients: int
    optimizer_state: int
    step_transient: int  # allocated and freed inside optimizer.step(): communication buffers, Muon stacks
    activations_per_layer: list[int]  # saved for backward by each block (the residual mix before it included)
    activations_other: int  # saved before the first block (embeddings, the first mix's inputs)
    loss: int  # saved after the last block: final norm, LM head, soft-cap and cross-entropy
    notes: list[str] = field(default_factory=list)
    saved_shapes: dict = field(default_factory=dict, repr=False)  # region -> [(shape, dtype)] of what it keeps

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state

    @property
    def activations(self) -> int:
        return sum(self.activations_per_layer) + self.activations_other

    @property
    def backward_peak(self) -> int:
        return self.static + self.activations + self.loss + max(self.activations_per_layer, default=0)

    @property
    def step_peak(self) -> int:
        return self.static + self.step_transient

    @property
    def peak(self) -> int:
        return max(self.backward_peak, self.step_peak)

    def table(self) -> str:
        per_layer = self.activations_per_layer
        mean = sum(per_layer) / max(1, len(per_layer))
        step_buffers = "communication buffers" if self.world_size > 1 else "Muon stacks"  # see _optimizer_bytes
        rows = [("parameters (and buffers)", self.parameters), ("gradients", self.gradients),
                ("optimizer state (this rank's share)", self.optimizer_state),
                ("static (kept between steps)", self.static),
                (f"step transient: {step_buffers}, inside step() only", self.step_transient),
                ("step peak (static + transient)", self.step_peak),
                (f"activations saved per layer (mean of {len(per_layer)}; max {max(per_layer, default=0) / GiB:.2f})",
                 mean),
                ("activations saved, all layers and embeddings", self.activations),
                ("loss (saved for backward)", self.loss), ("backward peak (estimate)", self.backward_peak)]
        c = self.config
        title = (f"memory per GPU (process): depth {c.n_layer} (n_embd {c.n_embd}), device batch "
                 f"{self.device_batch_size} x {c.sequence_len} tokens, {self.world_size} GPU(s), "
                 f"{self.device_type} policy, {str(self.dtype).removeprefix('torch.')}")
        lines = [title] + [f"  {name:<58} {nbytes / GiB:8.2f} GiB" for name, nbytes in rows]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def to_dict(self) -> dict:
        return {"depth": self.config.n_layer, "device_batch_size": self.device_batch_size,
                "sequence_len": self.config.sequence_len, "world_size": self.world_size,
                "device_type": self.device_type, "dtype": str(self.dtype).removeprefix("torch."),
                "parameters": self.parameters, "gradients": self.gradients, "optimizer_state": self.optimizer_state,
                "step_transient": self.step_transient, "step_peak": self.step_peak, "static": self.static,
                "activations_per_layer": self.activations_per_layer, "activations": self.activations,
                "loss": self.loss, "backward_peak": self.backward_peak, "notes": self.notes}


def estimate_memory(config: GPTConfig, device_batch_size: int, world_size: int = 1, device_type: str = "cuda",
                    dtype: torch.dtype = torch.bfloat16) -> MemoryEstimate:
    """Bytes per GPU of training `config` at `device_batch_size` sequences of config.sequence_len tokens per forward
    pass on each of `world_size` processes, with `dtype` as the compute dtype and the parameter dtypes of
    `device_type`'s policy. Runs on the meta device: no GPU is needed and d20 takes seconds."""
    model = _meta_model(config, device_type, dtype)
    notes: list[str] = []
    parameters = _nbytes(list(model.parameters()) + list(model.buffers()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = _nbytes(trainable)
    optimizer = model.setup_optimizer()
    optimizer_state, step_transient = _optimizer_bytes(optimizer, trainable, world_size)
    shapes: dict = {}
    per_layer, other, loss = _trace_saved(model, device_batch_size, dtype, shapes)
    return MemoryEstimate(config, device_batch_size, world_size, device_type, dtype, parameters, gradients,
                          optimizer_state, step_transient, per_layer, other, loss, notes, shapes)


def estimate_memory_for_batches(config: GPTConfig, batch_sizes: list[int], world_size: int = 1,
                                device_type: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> list[MemoryEstimate]:
    """`estimate_memory` at each device batch size, counting the static memory (the optimizer's meta step is most
    of the time) once."""
    first = estimate_memory(config, batch_sizes[0], world_size, device_type, dtype)
    return [first] + [_with_batch(first, b) for b in batch_sizes[1:]]


def _meta_model(config: GPTConfig, device_type: str, dtype: torch.dtype) -> GPT:
    with torch.device("meta"):
        model = GPT(config)
    model.apply_dtype_policy(device_type, dtype)
    return model.train()


def _with_batch(estimate: MemoryEstimate, device_batch_size: int) -> MemoryEstimate:
    """`estimate`'s static memory with the activations of another batch size (traced anew)."""
    shapes: dict = {}
    per_layer, other, loss = _trace_saved(_meta_model(estimate.config, estimate.device_type, estimate.dtype),
                                          device_batch_size, estimate.dtype, shapes)
    return dataclasses.replace(estimate, device_batch_size=device_batch_size, activations_per_layer=per_layer,
                               activations_other=other, loss=loss, saved_shapes=shapes)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _optimizer_bytes(optimizer, trainable: list[torch.Tensor], world_size: int) -> tuple[int, int]:
    """(optimizer state, the step's transient buffers) per rank."""
    from nanochat import optim_shard
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if world_size == 1:
        for p in trainable:
            p.grad = torch.empty_like(p)
        optimizer.step()  # creates the state lazily, as in training; on meta it computes nothing
        for p in trainable:
            p.grad = None
        state = _nbytes(t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))
        # one Muon stack at a time: its stacked gradients and parameters (Newton–Schulz temporaries not counted)
        stacks = [2 * len(b.indices) * b.shape[0] * b.shape[1] * params[b.indices[0]].element_size()
                  for b in optimizer._plan.muon]
        return state, max(stacks, default=0)
    state = optim_shard.state_bytes(optimizer.param_groups, world_size)["state_bytes_per_rank"]
    segment = optim_shard.plan_shards(optimizer.param_groups, world_size).segment
    item = torch.empty(0, dtype=optim_shard.communication_dtype(params)).element_size()
    # the all-gather's (W, S) buffer with this rank's averaged gradients and updated parameters (S each) alive; the
    # reduce-scatter's (W, S) input is freed before them
    return state, (world_size + 2) * segment * item


class _FlashAttention(torch.autograd.Function):
    """What a flash-attention kernel keeps for its backward: q, k, v, the output and a fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, T, H, _ = q.shape
        out = torch.empty_like(q)
        lse = q.new_empty(B, H, T, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_attention(q, k, v, window, **kwargs):
    return _FlashAttention.apply(q, k, v)


class _FusedRmsNorm(torch.autograd.Function):
    """What CUDA's fused rms_norm keeps: its input and an fp32 reciprocal RMS per row (the meta device runs the
    decomposed form instead, which keeps an fp32 copy of the input)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x, x.new_empty(x.shape[:-1], dtype=torch.float32))
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(ctx.saved_tensors[0])


def _fused_rms_norm(x, normalized_shape, weight=None, eps=None):
    return _FusedRmsNorm.apply(x)


@contextmanager
def _regions(model: GPT, log: dict):
    """Label saved tensors by where the forward pass is: 'embed', then each block i (from its start to the next
    block's, so the residual mix and value embedding of block i+1 count for block i), then 'loss'."""
    log["region"] = "embed"

    def enter(i):
        def hook(module, args):
            log["region"] = i
        return hook

    handles = [block.register_forward_pre_hook(enter(i)) for i, block in enumerate(model.blocks)]
    handles.append(model.blocks[-1].register_forward_hook(lambda *a: log.__setitem__("region", "loss")))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _trace_saved(model: GPT, B: int, dtype: torch.dtype, shapes: dict) -> tuple[list[int], int, int]:
    """Bytes saved for backward by each block, before the blocks, and by the loss, in one forward + backward;
    `shapes` receives each region's saved (shape, dtype) pairs."""
    T = model.config.sequence_len
    params = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    log: dict = {}
    saved: dict = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if log["region"] != "backward" and key not in params and key not in seen:
            seen.add(key)
            saved[log["region"]] = saved.get(log["region"], 0) + t.untyped_storage().nbytes()
            shapes.setdefault(log["region"], []).append((tuple(t.shape), t.dtype))
        return t

    idx = torch.zeros(B, T, dtype=torch.long, device="meta")
    with _regions(model, log), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            mock.patch.object(gpt_module, "attention", _flash_attention), \
            mock.patch.object(torch.nn.functional, "rms_norm", _fused_rms_norm):
        loss = model(idx, idx, dtype=dtype)
        log["region"] = "backward"  # what backward itself saves (recomputation) is transient: not counted
        loss.backward()
    for p in model.parameters():
        p.grad = None
    per_layer = [saved.get(i, 0) for i in range(model.config.n_layer)]
    return per_layer, saved.get("embed", 0), saved.get("loss", 0)


def reference_saved_per_layer(config: GPTConfig, B: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a layer of the reference design keeps for backward (averaged over layers), from first principles: a
    flash-attention block whose residual mix is recomputed. Per token, in the compute dtype unless said: the block's
    input (the mix's and the attention norm's backward need it; the mix's output is recomputed); the normed input of
    q, k, v; q and k after rotary and QK-norm, and v, as the attention kernel keeps them; on the layers with a value
    embedding, that embedding and its gate (one per KV head); the attention output and its fp32 log-sum-exp per head;
    the residual after attention and its norm (the MLP's input); the MLP's pre-activation and its ReLU² (the output
    projection's input)."""
    C, H, Hkv, D = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
    item = torch.empty(0, dtype=dtype).element_size()
    ve = sum(config.has_value_embedding(i) for i in range(config.n_layer)) / config.n_layer
    per_token = item * (C + C + H * D + 2 * Hkv * D + ve * (Hkv * D + Hkv) + H * D + 2 * C + 4 * C + 4 * C)
    per_token += 4 * H
    return math.ceil(B * config.sequence_len * per_token)


AUTO_BATCH_MARGIN = 0.10  # of free memory kept back: allocator fragmentation, compile workspaces, the estimate's error
AUTO_BATCH_CPU = 32  # what --device-batch-size=auto takes where there is no GPU memory to fit


def pick_device_batch_size(config: GPTConfig, total_batch_size: int, world_size: int, device_type: str,
                           dtype: torch.dtype, free_bytes: int | None,
                           margin: float = AUTO_BATCH_MARGIN) -> tuple[int, str]:
    """--device-batch-size=auto: the largest power of two that divides the total batch (in sequences per process)
    and whose estimated peak (backward's or the optimizer step's, the larger) fits (1 − margin) of `free_bytes`; returns it and a one-line reason.

    Without GPU memory to fit (`free_bytes` None: a CPU or MPS run) it takes AUTO_BATCH_CPU or the largest power of
    two below it that divides. The peak is linear in the batch (activations, loss) plus a constant (static memory,
    weights cast for the matmuls), so two traces, at 1 and 2 sequences, give it for every batch."""
    T = config.sequence_len
    if total_batch_size % (T * world_size):
        raise UserError(f"--total-batch-size={total_batch_size} is not a multiple of sequence × processes = "
                        f"{T}×{world_size}: change --total-batch-size")
    per_process = total_batch_size // (T * world_size)
    candidates = [2 ** i for i in range(per_process.bit_length() - 1, -1, -1) if per_process % 2 ** i == 0]
    if free_bytes is None:
        batch = next(b for b in candidates if b <= AUTO_BATCH_CPU)
        return batch, (f"device batch auto: {batch} on {device_type} (no GPU memory to size it from; "
                       f"{AUTO_BATCH_CPU} or the largest power of two below that divides the {per_process} "
                       "sequences per process)")
    one, two = (e.peak for e in estimate_memory_for_batches(config, [1, 2], world_size, device_type, dtype))

    def peak(b: int) -> int:
        return one + (b - 1) * (two - one)

    usable = (1 - margin) * free_bytes
    fits = [b for b in candidates if peak(b) <= usable]
    budget = (f"{usable / GiB:.1f} GiB usable = {1 - margin:.0%} of {free_bytes / GiB:.1f} GiB free per GPU")
    if not fits:
        raise UserError(f"depth {config.n_layer} does not fit: one sequence of {T} tokens needs about "
                          f"{peak(1) / GiB:.1f} GiB per GPU, {budget}; use a smaller --depth or --max-seq-len, or "
                          "more GPUs")
    batch = fits[0]
    larger = [b for b in candidates if b > batch]  # descending: the last is the next size up
    beyond = f"; {larger[-1]} would need {peak(larger[-1]) / GiB:.1f} GiB" if larger else ""
    return batch, (f"device batch auto: {batch} (estimated peak {peak(batch) / GiB:.1f} GiB of {budget}{beyond}; "
                   f"{per_process // batch} micro-batch(es) a step)")


def free_gpu_bytes(device: torch.device) -> int | None:
    """Free memory of this process's GPU, the smallest over torchrun's processes (they must pick one batch size);
    None off CUDA."""
    if device.type != "cuda":
        return None
    free = torch.tensor(torch.cuda.mem_get_info(device)[0], dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    return int(free)
