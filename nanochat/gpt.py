"""The GPT: RoPE, QK-norm, untied embeddings, ReLU² MLP, parameter-free RMSNorm, no biases, GQA, sliding windows,
value embeddings (ResFormer), x0 residual mixing, soft-capped fp32 logits; optionally smear (a gated share of the
previous token's embedding) and backout (the middle layer's residual stream subtracted before the final norm).

Compute dtype: one policy from the embedding to the logits. The dtype is autocast's when the caller runs the model
under autocast (the scripts do, with `nanochat.common.get_compute_dtype`: bf16 on CUDA SM80+), else the weights'
own. The forward then runs with autocast off and casts explicitly: the residual stream, q/k/v, the rotary tables and
every activation saved for backward are in that dtype; the matrices keep fp32 master weights and are cast in
forward (`Linear`); only the logits, the soft-cap and the loss are fp32. Autocast itself would not do this: on CUDA
it runs rms_norm and pow (the ReLU² square) in fp32 and returns fp32, which promotes everything after it.

Shapes: B batch, T time, C n_embd, H query heads, Hkv key/value heads, D head_dim.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import few_rows
from nanochat.attention import attention
from nanochat.common import get_compute_dtype
from nanochat.few_rows import LM_HEAD_FORMS, product
from nanochat.kv_cache import KVCache
from nanochat.recompute import mix_and_norm, relu_square_linear
from nanochat.optim import MuonAdamW
from nanochat.sampling import soft_cap
from nanochat.softcap_loss import softcap_cross_entropy

SOFTCAP = 15.0
ROPE_BASE = 100_000
VE_GATE_CHANNELS = 12
SMEAR_GATE_CHANNELS = 24
ROTARY_CONTEXT_MULTIPLE = 10


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "L"
    smear: bool = False  # x[t] += λ_smear · sigmoid(W · x[t, :24]) · x[t-1] on the token embeddings
    backout: bool = False  # subtract λ_backout · (residual stream after block n_layer // 2) before the final norm

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 64) * 64

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"L", "S"}:
            raise ValueError(f"window_pattern={self.window_pattern!r} must be a string of L (full) and S (short)")

    def window_sizes(self) -> list[int]:
        """Keys each query sees, per layer: the pattern tiled over layers, the last layer always L.

        A window w (S = a quarter of the context rounded up to a multiple of 128, L = the context) covers the query
        and the w keys before it, w + 1 in all, as the reference's (w, 0) windows do.
        """
        short = min(self.sequence_len, -(-self.sequence_len // 4 // 128) * 128 or 128)
        pattern = self.window_pattern.upper()
        sizes = [short if pattern[i % len(pattern)] == "S" else self.sequence_len for i in range(self.n_layer)]
        sizes[-1] = self.sequence_len
        return [w + 1 for w in sizes]

    def has_value_embedding(self, layer: int) -> bool:
        return layer % 2 == (self.n_layer - 1) % 2

    # --- sizes and FLOPs in closed form (no model needed; GPT.num_params counts the real tensors) -------------------

    def param_counts(self) -> dict[str, int]:
        V, C, kv = self.padded_vocab_size, self.n_embd, self.n_kv_head * self.head_dim
        ve_layers = sum(self.has_value_embedding(i) for i in range(self.n_layer))
        attention = 2 * C * self.n_head * self.head_dim + 2 * C * kv  # q and proj, k and v
        mlp = 8 * C * C
        gates = ve_layers * VE_GATE_CHANNELS * self.n_kv_head
        counts = {"wte": V * C, "value_embeds": ve_layers * V * kv, "lm_head": V * C,
                  "transformer_matrices": self.n_layer * (attention + mlp) + gates,
                  "scalars": 2 * self.n_layer,
                  "smear_backout": (SMEAR_GATE_CHANNELS + 1) * self.smear + self.backout}
        counts["total"] = sum(counts.values())
        return counts

    def num_scaling_params(self) -> int:
        """Parameters that scaling laws count: transformer matrices + LM head (not the embedding tables)."""
        counts = self.param_counts()
        return counts["transformer_matrices"] + counts["lm_head"]

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul weight + the attention scores and values of each layer."""
        T, h, d = self.sequence_len, self.n_head, self.head_dim
        attention = sum(12 * h * d * min(w - 1, T) for w in self.window_sizes())  # counted as the reference: w
        return 6 * self.num_scaling_params() + attention


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))  # in x's dtype; the kernels reduce in fp32


class Linear(nn.Linear):
    """A bias-free linear layer whose fp32 master weight is cast to the activations' dtype in forward."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)  # inference: cast once
        return product(x, weight)  # F.linear, or its fastest form for a decode step's few rows on CPUs


def compute_dtype(device_type: str, weights_dtype: torch.dtype) -> torch.dtype:
    """The dtype the forward pass computes in: autocast's when it is on for this device, else the weights'."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weights_dtype


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos, sin: (B or 1, T, 1, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C = config.n_embd
        self.c_q = Linear(C, self.n_head * self.head_dim)
        self.c_k = Linear(C, self.n_kv_head * self.head_dim)
        self.c_v = Linear(C, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_head * self.head_dim, C)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if config.has_value_embedding(layer) else None

    def forward(self, x, ve, cos, sin, window: int, kv_cache: KVCache | None, slots, positions):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qk = qkv = None
        if kv_cache is not None:
            # a decode step on a CPU: q, k and v in one product of their stacked weights, where these are small
            # (1-5% less a step on a 2-core AMD EPYC, which reads them from memory), and q and k side by side
            qkv = few_rows.joint_product(x, (self.c_q.weight, self.c_k.weight, self.c_v.weight))
        if qkv is not None:
            qkv = qkv.view(B, T, H + 2 * Hkv, D)
            qk, v = qkv[:, :, :H + Hkv], qkv[:, :, H + Hkv:]
        else:
            q = self.c_q(x).view(B, T, H, D)
            k = self.c_k(x).view(B, T, Hkv, D)
            v = self.c_v(x).view(B, T, Hkv, D)
        if ve is not None:  # value embedding mixed into V through an input-dependent gate per KV head
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        if kv_cache is None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            q, k = norm(q) * 1.2, norm(k) * 1.2  # QK-norm after RoPE
            y = attention(q, k, v, window)  # (B, T, H, D)
        else:
            # Inference: the same per-head rotary and norm, applied to q and k together (the elements and ops are
            # the same, so is the result): half the small ops, which a decode step is made of (+5-6% tokens/s on
            # a 2-core CPU). Training keeps them apart rather than pay for the joined copy in memory.
            qk = norm(apply_rotary(torch.cat([q, k], dim=2) if qk is None else qk, cos, sin)) * 1.2
            q, k = qk[:, :, :H], qk[:, :, H:]
            keys, values = kv_cache.write_and_read(self.layer, slots, positions, k, v)  # (B, Hkv, L, D)
            y = attention(q, keys, values, window, positions=positions, aligned=kv_cache.aligned,
                          shared=kv_cache.shared)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        u = self.c_fc(x)  # (B, T, 4C)
        if torch.is_grad_enabled() and isinstance(self.c_proj, Linear):  # not fp8's: it casts its own way
            return relu_square_linear(u, self.c_proj.weight.to(u.dtype))  # keeps u only (nanochat/recompute.py)
        return self.c_proj(F.relu(u).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kv_cache, slots, positions, normed=None):
        normed = norm(x) if normed is None else normed  # GPT passes it, computed with the residual mix
        x = x + self.attn(normed, ve, cos, sin, window, kv_cache, slots, positions)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        V, C = config.padded_vocab_size, config.n_embd
        kv_dim = config.n_kv_head * config.head_dim
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim)
                                           for i in range(config.n_layer) if config.has_value_embedding(i)})
        self.lm_head = Linear(C, V)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = Linear(SMEAR_GATE_CHANNELS, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        self.windows = config.window_sizes()
        # RoPE tables 10x the training context, as the reference's: generation past the context and CORE prompts
        # scored whole (core_eval.py) fit; not saved in checkpoints.
        cos, sin = self._rotary_tables(config.sequence_len * ROTARY_CONTEXT_MULTIPLE)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.config.head_dim // 2
        inv_freq = 1.0 / ROPE_BASE ** (torch.arange(half, dtype=torch.float32, device=device) / half)
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (L, D/2)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, L, 1, D/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference initialisation; call after `to_empty()` when the model was built on the meta device."""
        C, L = self.config.n_embd, self.config.n_layer
        s = math.sqrt(3) / math.sqrt(C)
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        frac = torch.linspace(0, 1, L) if L > 1 else torch.zeros(1)
        self.resid_lambdas.copy_(1.15 - 0.10 * frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        if self.config.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            nn.init.zeros_(self.smear_lambda)
        if self.config.backout:
            self.backout_lambda.fill_(0.2)
        cos, sin = self._rotary_tables(self.cos.size(1), device=self.wte.weight.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        if self.wte.weight.device.type == "cuda":
            self.apply_dtype_policy("cuda", get_compute_dtype("cuda"))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                slots: torch.Tensor | list[int] | None = None, loss_reduction: str = "mean", last_only: bool = False,
                capped: bool = True, dtype: torch.dtype | None = None):
        """idx (B, T) → logits (B, T, vocab_size) fp32, or the fp32 loss when targets (B, T; -1 = ignore) are given.
        `last_only` computes the logits of the last position only (B, 1, vocab_size): what generation needs after
        a prefill, without paying the LM head for every prompt token. `capped` False returns the logits before the
        soft-cap, for a caller that caps only the ones it looks at (a decode step's sampler: `sample_tokens`).

        With a kv_cache, the T new tokens are appended to the cache rows `slots` (default 0..B-1), each at its own
        position, and attend to that row's history. `dtype` sets the compute dtype where autocast cannot (the meta
        device, which nanochat.memory traces on).
        """
        dtype = dtype or compute_dtype(idx.device.type, self.lm_head.weight.dtype)
        with torch.autocast(idx.device.type, enabled=False) if idx.device.type in ("cuda", "cpu") else nullcontext():
            return self._forward(idx, targets, kv_cache, slots, loss_reduction, last_only, dtype, capped)

    def apply_dtype_policy(self, device_type: str, compute_dtype: torch.dtype) -> None:
        """The parameter dtypes of a model that trains on `device_type` in `compute_dtype`. On CUDA in bf16 the token
        and value embedding tables are stored in bf16, as the reference design does: a step reads and updates only
        the rows of the batch's tokens, and the tables with their gradients and optimizer state are 3.4 GiB of fp32
        at d20 that an 80 GB GPU needs for activations. Everything else (and every parameter elsewhere) is an fp32
        master."""
        if device_type == "cuda" and compute_dtype == torch.bfloat16:
            self.wte.to(compute_dtype)
            self.value_embeds.to(compute_dtype)

    def _forward(self, idx, targets, kv_cache, slots, loss_reduction, last_only, dtype, capped):
        B, T = idx.shape
        if kv_cache is None:
            positions = None
            if T > self.cos.size(1):  # a whole CORE prompt of a short-context model: tables for this call
                cos, sin = self._rotary_tables(T, device=idx.device)
            else:
                cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:
            slots = kv_cache.resolve_slots(slots, B)
            positions = kv_cache.positions(slots, T)  # (B, T)
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2)
        cos, sin = cos.to(dtype), sin.to(dtype)
        x = self.embed(idx, dtype)  # (B, T, C) in the compute dtype from here to the LM head
        if self.config.smear:  # on the normalised embeddings, as the reference
            x = self.smear(x, kv_cache, slots, positions)
        x0 = x
        backout_layer = self.config.n_layer // 2 if self.config.backout else -1
        x_mid = None
        for i, block in enumerate(self.blocks):
            # resid·x + x0λ·x0 and its norm, recomputed in backward rather than kept (nanochat/recompute.py)
            x, normed = mix_and_norm(x, x0, self.resid_lambdas[i].to(dtype), self.x0_lambdas[i].to(dtype))
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i], kv_cache, slots, positions, normed)
            if i == backout_layer:
                x_mid = x
        if kv_cache is not None:
            kv_cache.advance(slots, T)
        if last_only and targets is None:
            x = x[:, -1:]
            x_mid = x_mid[:, -1:] if x_mid is not None else None
        if x_mid is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        x = norm(x)
        chunked = loss_reduction != "none" or not torch.is_grad_enabled()
        if targets is not None and chunked:
            # The same loss in chunks of rows (nanochat/softcap_loss.py), on every device: the fp32 logits of a
            # whole batch are 8 GiB at d20 and device batch 32, which a GPU would otherwise keep for backward, and
            # on CPUs they cost more in memory traffic than in FLOPs.
            return softcap_cross_entropy(x, self.lm_head.weight[:self.config.vocab_size], targets, SOFTCAP,
                                         loss_reduction)
        # GPUs call the module, so that a head converted for fp8 (nanochat/fp8.py) computes in fp8
        head = self.lm_head(x) if x.is_cuda else product(x, self.lm_head.weight.to(x.dtype), LM_HEAD_FORMS)
        logits = head[..., :self.config.vocab_size].float()
        if targets is None:
            return soft_cap(logits, SOFTCAP if capped else None)
        logits = soft_cap(logits, SOFTCAP)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def embed(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """idx (B, T) → the normalised token embeddings (B, T, C) in `dtype`: what smear mixes and x0 holds (and what
        a decoder that copies a cached prefix must remember for smear)."""
        return norm(self.wte(idx).to(dtype))

    def smear(self, emb: torch.Tensor, kv_cache: KVCache | None, slots, positions) -> torch.Tensor:
        """emb (B, T, C) → each position t ≥ 1 plus λ_smear · sigmoid(W · emb[t, :24]) · emb[t-1].

        With a KV cache, the embedding before a chunk's first token is the one the slot last saw
        (`KVCache.prev_embedding`), and position 0 of a sequence gets nothing, so decoding equals a full forward.
        """
        gate = self.smear_lambda.to(emb.dtype) * torch.sigmoid(self.smear_gate(emb[..., :SMEAR_GATE_CHANNELS]))  # (B, T, 1)
        if kv_cache is None:
            prev = F.pad(emb[:, :-1], (0, 0, 1, 0))  # (B, T, C): position 0 has no predecessor
            return emb + gate * prev
        last = kv_cache.previous_embeddings(slots, emb.size(-1), emb.dtype)  # (B, C)
        prev = torch.cat([last[:, None], emb[:, :-1]], dim=1)  # (B, T, C)
        prev = prev * (positions > 0)[..., None].to(emb.dtype)
        kv_cache.remember_embeddings(slots, emb[:, -1])
        return emb + gate * prev

    # --- sizes and FLOPs ---------------------------------------------------------------------------------------------

    def num_params(self) -> dict[str, int]:
        counts = {
            "wte": self.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.blocks.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
            "smear_backout": sum(p.numel() for p in self.smear_backout_parameters()),
        }
        counts["total"] = sum(counts.values())
        return counts

    def num_scaling_params(self) -> int:
        return self.config.num_scaling_params()

    def estimate_flops(self) -> float:
        return self.config.estimate_flops()

    def smear_backout_parameters(self) -> list[nn.Parameter]:
        params = []
        if self.config.smear:
            params += [self.smear_gate.weight, self.smear_lambda]
        if self.config.backout:
            params.append(self.backout_lambda)
        return params

    # --- optimizer ----------------------------------------------------------------------------------------------------

    def setup_optimizer(self, embedding_lr: float = 0.3, unembedding_lr: float = 0.008, matrix_lr: float = 0.02,
                        scalar_lr: float = 0.5, weight_decay: float = 0.28, adam_lr_scale: float | None = None,
                        smear_lr: float = 0.2, equalize_rows: bool = True):
        """Muon for the 2-D matrices of the blocks, AdamW for everything else, with the reference's groups.

        The embedding and LM-head rates are multiplied by (C/768)^-0.5 (`adam_lr_scale` to override); the scalar
        lambdas and the smear/backout parameters take their rates as given, like the reference. The caller scales
        the learning rates by √(B/B_ref) beforehand where it wants that (see nanochat.scaling).
        """
        scale = adam_lr_scale if adam_lr_scale is not None else (self.config.n_embd / 768) ** -0.5
        matrices = [p for p in self.blocks.parameters()]
        groups = [
            dict(kind="adamw", name="lm_head", params=[self.lm_head.weight], lr=unembedding_lr * scale,
                 betas=(0.8, 0.96), weight_decay=0.01),
            dict(kind="adamw", name="wte", params=[self.wte.weight], lr=embedding_lr * scale,
                 betas=(0.8, 0.995), weight_decay=0.001),
            dict(kind="adamw", name="value_embeds", params=list(self.value_embeds.parameters()),
                 lr=embedding_lr * 0.5 * scale, betas=(0.8, 0.995), weight_decay=0.01),
            dict(kind="adamw", name="resid_lambdas", params=[self.resid_lambdas], lr=scalar_lr * 0.01,
                 betas=(0.8, 0.95), weight_decay=0.05),
            dict(kind="adamw", name="x0_lambdas", params=[self.x0_lambdas], lr=scalar_lr,
                 betas=(0.96, 0.95), weight_decay=0.0),
            dict(kind="adamw", name="smear_backout", params=self.smear_backout_parameters(), lr=smear_lr,
                 betas=(0.8, 0.95), weight_decay=0.0),
            dict(kind="muon", name="matrices", params=matrices, lr=matrix_lr, momentum=0.95,
                 weight_decay=weight_decay),
        ]
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g["initial_lr"] = g["lr"]
            g["initial_weight_decay"] = g["weight_decay"]
        return MuonAdamW(groups, equalize_rows=equalize_rows)  # MuonEq: on by default, as the reference's recipe
