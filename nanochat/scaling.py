"""One dial: everything a pretraining run needs, derived from --depth by scaling laws (pure functions, no model).

Reference point: a d12 model trained with a 2^19-token batch. Width = depth × aspect ratio rounded up to the head
dim; tokens = ratio × scaling parameters (matrices + LM head); batch = a power of two growing as (D/D_ref)^0.383;
learning rates × √(B/B_ref); Muon weight decay 0.28·√(B/B_ref)·(D_ref/D).
"""

import math
from dataclasses import asdict, dataclass, field, fields

from nanochat.common import UserError

B_REF = 2 ** 19
REF_DEPTH = 12


@dataclass
class Hyperparams:
    depth: int
    model_dim: int
    n_head: int
    n_kv_head: int
    head_dim: int
    max_seq_len: int
    window_pattern: str
    vocab_size: int
    scaling_params: int
    target_tokens: int
    total_batch_size: int
    device_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    scalar_lr: float
    weight_decay: float
    warmup_steps: int
    warmdown_ratio: float
    final_lr_frac: float
    target_param_data_ratio: float
    sources: dict = field(default_factory=dict)  # which values were set by a flag rather than derived

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = []
        for f in fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            shown = f"{value:,}" if isinstance(value, int) else (f"{value:.6g}" if isinstance(value, float) else value)
            lines.append(f"  {f.name:<24} {shown}{'  (flag)' if f.name in self.sources else ''}")
        return "\n".join(lines)


def model_shape(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> tuple[int, int]:
    """(model_dim, n_head): width depth·aspect rounded up to a multiple of head_dim."""
    if depth < 1:
        raise UserError(f"--depth={depth} must be at least 1")
    if head_dim < 2 or head_dim % 2:
        raise UserError(f"--head-dim={head_dim} must be an even number (rotary embeddings split it in halves)")
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    return model_dim, model_dim // head_dim


def scaling_params(depth: int, model_dim: int, n_head: int, n_kv_head: int, vocab_size: int) -> int:
    """Transformer matrices + LM head, in closed form (equals GPT.num_scaling_params())."""
    head_dim = model_dim // n_head
    kv = n_kv_head * head_dim
    attn = model_dim * model_dim * 2 + 2 * model_dim * kv
    mlp = 8 * model_dim * model_dim
    gates = sum(12 * n_kv_head for i in range(depth) if i % 2 == (depth - 1) % 2)
    padded_vocab = -(-vocab_size // 64) * 64
    return depth * (attn + mlp) + gates + padded_vocab * model_dim


def derive_hparams(depth: int, vocab_size: int = 32768, world_size: int = 1, aspect_ratio: int = 64,
                   head_dim: int = 128, n_kv_head: int | None = None, max_seq_len: int = 2048,
                   window_pattern: str = "L", device_batch_size: int = 32, total_batch_size: int | None = None,
                   num_iterations: int | None = None, target_flops: float | None = None,
                   flops_per_token: float | None = None, target_param_data_ratio: float = 12.0,
                   embedding_lr: float | None = None, unembedding_lr: float | None = None,
                   matrix_lr: float | None = None, scalar_lr: float | None = None, weight_decay: float | None = None,
                   warmup_steps: int = 40, warmdown_ratio: float = 0.65, final_lr_frac: float = 0.05) -> Hyperparams:
    """Derive every hyper-parameter from depth; any argument given explicitly overrides its derived value."""
    sources = {}
    model_dim, n_head = model_shape(depth, aspect_ratio, head_dim)
    n_kv_head = n_kv_head or n_head
    if n_head % n_kv_head:
        raise UserError(f"--n-kv-head={n_kv_head} must divide the {n_head} query heads of depth {depth}")
    if set(window_pattern.upper()) - {"L", "S"} or not window_pattern:
        raise UserError(f"--window-pattern={window_pattern!r} must be made of L (full) and S (short window)")
    N = scaling_params(depth, model_dim, n_head, n_kv_head, vocab_size)
    ref_dim, ref_heads = model_shape(REF_DEPTH, 64, 128)
    D_ref = target_param_data_ratio * scaling_params(REF_DEPTH, ref_dim, ref_heads, ref_heads, 32768)
    D = int(target_param_data_ratio * N)

    if total_batch_size is None:
        total_batch_size = 2 ** round(math.log2(B_REF * (D / D_ref) ** 0.383))
    else:
        sources["total_batch_size"] = "flag"
    per_step = device_batch_size * max_seq_len * world_size
    if total_batch_size % per_step:
        raise UserError(f"--total-batch-size={total_batch_size} is not a multiple of device batch × sequence × "
                        f"processes = {device_batch_size}×{max_seq_len}×{world_size} = {per_step}: change "
                        "--total-batch-size or --device-batch-size")
    grad_accum = total_batch_size // per_step

    if num_iterations is not None:
        sources["num_iterations"] = "flag"
    elif target_flops is not None:
        if not flops_per_token:
            raise UserError("--target-flops needs the model's FLOPs per token")
        num_iterations = round(target_flops / (flops_per_token * total_batch_size))
        sources["num_iterations"] = "target_flops"
    else:
        num_iterations = max(1, round(D / total_batch_size))
    if num_iterations < 1:
        raise UserError(f"--num-iterations={num_iterations} must be at least 1")

    lr_scale = math.sqrt(total_batch_size / B_REF)
    derived = dict(embedding_lr=0.3 * lr_scale, unembedding_lr=0.008 * lr_scale, matrix_lr=0.02 * lr_scale,
                   scalar_lr=0.5 * lr_scale,
                   weight_decay=0.28 * lr_scale * (D_ref / max(D, 1)))
    given = dict(embedding_lr=embedding_lr, unembedding_lr=unembedding_lr, matrix_lr=matrix_lr,
                 scalar_lr=scalar_lr, weight_decay=weight_decay)
    lrs = {}
    for name, value in given.items():
        lrs[name] = derived[name] if value is None else value
        if value is not None:
            sources[name] = "flag"
    return Hyperparams(depth=depth, model_dim=model_dim, n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim,
                       max_seq_len=max_seq_len, window_pattern=window_pattern, vocab_size=vocab_size,
                       scaling_params=N, target_tokens=D, total_batch_size=total_batch_size,
                       device_batch_size=device_batch_size, grad_accum_steps=grad_accum,
                       num_iterations=num_iterations, warmup_steps=warmup_steps, warmdown_ratio=warmdown_ratio,
                       final_lr_frac=final_lr_frac, target_param_data_ratio=target_param_data_ratio,
                       sources=sources, **lrs)


# ---------------------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step, clamped so no flag combination can make them negative or run backwards.

def lr_multiplier(step: int, num_iterations: int, warmup_steps: int, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup over warmup_steps, flat, then linear warmdown over the last warmdown_ratio of steps to
    final_lr_frac.

    The warmup keeps its length when the run is shorter than it (as the reference does): a 10-step run with a
    40-step warmup climbs to 10/40 and never jumps down at its last step.
    """
    step = min(max(step, 0), num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if warmdown <= 0 or step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown  # 1 → 0 across the warmdown
    return max(final_lr_frac, progress * 1.0 + (1 - progress) * final_lr_frac)


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float) -> float:
    """0.85 → 0.97 over the first 400 steps, flat, then 0.97 → 0.90 across the warmdown."""
    warm = min(step / 400, 1.0)
    momentum = 0.85 + 0.12 * warm
    warmdown = round(warmdown_ratio * num_iterations)
    start = num_iterations - warmdown
    if warmdown > 0 and step > start:
        frac = min((step - start) / warmdown, 1.0)
        momentum = momentum * (1 - frac) + 0.90 * frac
    return momentum


def weight_decay_multiplier(step: int, num_iterations: int) -> float:
    """Muon weight decay decays from full to zero on a cosine over training."""
    frac = min(max(step / max(num_iterations, 1), 0.0), 1.0)
    return 0.5 * (1 + math.cos(math.pi * frac))
