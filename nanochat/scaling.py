"""One dial: everything a pretraining run needs, derived from --depth by scaling laws (pure functions, no model).

Reference point: a d12 model trained with a 2^19-token batch. Width = depth × aspect ratio rounded up to the head
dim; tokens = ratio × scaling parameters (matrices + LM head); batch = a power of two growing as (D/D_ref)^0.383;
learning rates × √(B/B_ref), given by flag or not; Muon weight decay 0.28·√(B/B_ref)·(D_ref/D). D_ref is the
tokens of a d12 with the run's own aspect ratio, head dim and vocabulary. The parameter and FLOP counts are
GPTConfig's closed forms, so nothing here builds a model.

What flags set instead is one `Overrides`; `derive_hparams` gives the `Hyperparams`, whose `model_config()` is the
model. The schedules of every stage (pretraining, SFT, RL) are here too, as pure functions of the step or progress,
applied through `MuonAdamW.apply_schedule`.
"""

import math
from dataclasses import asdict, dataclass, field, fields

from nanochat.common import UserError
from nanochat.gpt import GPTConfig

B_REF = 2 ** 19
# The rates at the reference batch B_REF and horizon D_ref (the reference's flag defaults).
REFERENCE_RATES = {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "scalar_lr": 0.5,
                   "weight_decay": 0.28}
REF_DEPTH = 12
LEGACY_NAMES = {"depth": "n_layer", "model_dim": "n_embd", "max_seq_len": "sequence_len"}  # older checkpoints


@dataclass(frozen=True)
class Overrides:
    """What the user chose instead of deriving it (base_train's flags): None means "derive it from the depth"."""
    aspect_ratio: int = 64
    head_dim: int = 128
    n_kv_head: int | None = None
    sequence_len: int = 2048
    window_pattern: str = "L"  # base_train picks SSSL where windows save work (attention.default_window_pattern)
    smear: bool = True  # on, as the reference's recipe
    backout: bool = True
    device_batch_size: int = 32
    total_batch_size: int | None = None
    num_iterations: int | None = None
    target_flops: float | None = None
    target_param_data_ratio: float = 12.0
    embedding_lr: float | None = None
    unembedding_lr: float | None = None
    matrix_lr: float | None = None
    scalar_lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05

    @classmethod
    def from_namespace(cls, args) -> "Overrides":
        """The fields of an argparse namespace whose names match (base_train's flags do)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


@dataclass
class Hyperparams:
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    sequence_len: int
    window_pattern: str
    smear: bool
    backout: bool
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

    def model_config(self) -> GPTConfig:
        return GPTConfig(sequence_len=self.sequence_len, vocab_size=self.vocab_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_kv_head=self.n_kv_head, n_embd=self.n_embd,
                         window_pattern=self.window_pattern, smear=self.smear, backout=self.backout)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Hyperparams":
        """From a checkpoint's meta, including those written before the names followed GPTConfig's."""
        d = {LEGACY_NAMES.get(k, k): v for k, v in d.items()}
        d.setdefault("smear", False)
        d.setdefault("backout", False)
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def describe(self) -> str:
        lines = []
        for f in fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            shown = (f"{value:,}" if isinstance(value, int) and not isinstance(value, bool)
                     else f"{value:.6g}" if isinstance(value, float) else value)
            lines.append(f"  {f.name:<24} {shown}{'  (flag)' if f.name in self.sources else ''}")
        return "\n".join(lines)


def model_shape(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> tuple[int, int]:
    """(n_embd, n_head): width depth·aspect rounded up to a multiple of head_dim."""
    if depth < 1:
        raise UserError(f"--depth={depth} must be at least 1")
    if head_dim < 2 or head_dim % 2:
        raise UserError(f"--head-dim={head_dim} must be an even number (rotary embeddings split it in halves)")
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    return n_embd, n_embd // head_dim


def reference_tokens(target_param_data_ratio: float, aspect_ratio: int = 64, head_dim: int = 128,
                     vocab_size: int = 32768) -> float:
    """Training tokens of the reference point, a d12 with the run's own aspect ratio, head dim and vocabulary (as the
    reference builds it), at this tokens-per-parameter."""
    n_embd, n_head = model_shape(REF_DEPTH, aspect_ratio, head_dim)
    ref = GPTConfig(n_layer=REF_DEPTH, n_embd=n_embd, n_head=n_head, n_kv_head=n_head, vocab_size=vocab_size)
    return target_param_data_ratio * ref.num_scaling_params()


def derive_hparams(n_layer: int, overrides: Overrides | None = None, *, vocab_size: int = 32768,
                   world_size: int = 1) -> Hyperparams:
    """Derive every hyper-parameter from the depth; what `overrides` sets replaces its derived value."""
    o = overrides or Overrides()
    sources = {}
    n_embd, n_head = model_shape(n_layer, o.aspect_ratio, o.head_dim)
    n_kv_head = o.n_kv_head or n_head
    if n_head % n_kv_head:
        raise UserError(f"--n-kv-head={n_kv_head} must divide the {n_head} query heads of depth {n_layer}")
    if set(o.window_pattern.upper()) - {"L", "S"} or not o.window_pattern:
        raise UserError(f"--window-pattern={o.window_pattern!r} must be made of L (full) and S (short window)")
    config = GPTConfig(sequence_len=o.sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd, window_pattern=o.window_pattern, smear=o.smear,
                       backout=o.backout)
    N = config.num_scaling_params()
    D_ref = reference_tokens(o.target_param_data_ratio, o.aspect_ratio, o.head_dim, vocab_size)
    D = int(o.target_param_data_ratio * N)

    total_batch_size = o.total_batch_size
    if total_batch_size is None:
        total_batch_size = 2 ** round(math.log2(B_REF * (D / D_ref) ** 0.383))
    else:
        sources["total_batch_size"] = "flag"
    per_step = o.device_batch_size * o.sequence_len * world_size
    if total_batch_size % per_step:
        raise UserError(f"--total-batch-size={total_batch_size} is not a multiple of device batch × sequence × "
                        f"processes = {o.device_batch_size}×{o.sequence_len}×{world_size} = {per_step}: change "
                        "--total-batch-size or --device-batch-size")

    num_iterations = o.num_iterations
    if num_iterations is not None:
        sources["num_iterations"] = "flag"
    elif o.target_flops is not None:
        num_iterations = round(o.target_flops / (config.estimate_flops() * total_batch_size))
        sources["num_iterations"] = "target_flops"
    else:
        num_iterations = max(1, D // total_batch_size)  # floored, as the reference does
    if num_iterations < 1:
        raise UserError(f"--num-iterations={num_iterations} must be at least 1")

    # Rates given by hand are scaled like the defaults, as the reference scales its flags (their defaults included):
    # a flag sets the rate at the reference batch, not the rate this batch runs at.
    lr_scale = math.sqrt(total_batch_size / B_REF)
    scale = dict(embedding_lr=lr_scale, unembedding_lr=lr_scale, matrix_lr=lr_scale, scalar_lr=lr_scale,
                 weight_decay=lr_scale * (D_ref / max(D, 1)))
    rates = {}
    for name, default in REFERENCE_RATES.items():
        given = getattr(o, name)
        rates[name] = (default if given is None else given) * scale[name]
        if given is not None:
            sources[name] = "flag"
    return Hyperparams(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head, head_dim=o.head_dim,
                       sequence_len=o.sequence_len, window_pattern=o.window_pattern, smear=o.smear, backout=o.backout,
                       vocab_size=vocab_size, scaling_params=N, target_tokens=D, total_batch_size=total_batch_size,
                       device_batch_size=o.device_batch_size, grad_accum_steps=total_batch_size // per_step,
                       num_iterations=num_iterations, warmup_steps=o.warmup_steps, warmdown_ratio=o.warmdown_ratio,
                       final_lr_frac=o.final_lr_frac, target_param_data_ratio=o.target_param_data_ratio,
                       sources=sources, **rates)


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
    """0.85 → 0.97 over the first 400 steps, flat, then 0.97 → 0.90 across the warmdown. As in the reference, the
    first 400 steps follow the warmup alone, even when the warmdown starts inside them (every run under ~1,140
    steps at the default ratio, every d4 ablation among them)."""
    if step < 400:
        return 0.85 + 0.12 * max(step, 0) / 400
    warmdown = round(warmdown_ratio * num_iterations)
    start = num_iterations - warmdown
    if warmdown > 0 and step >= start:
        frac = min((step - start) / warmdown, 1.0)
        return 0.97 * (1 - frac) + 0.90 * frac
    return 0.97


def weight_decay_multiplier(step: int, num_iterations: int) -> float:
    """Muon weight decay decays from full to zero on a cosine over training."""
    frac = min(max(step / max(num_iterations, 1), 0.0), 1.0)
    return 0.5 * (1 + math.cos(math.pi * frac))


def pretraining_schedule(hp: Hyperparams, step: int) -> dict[str, float]:
    """Pretraining's settings at `step`, for MuonAdamW.apply_schedule."""
    return {"lr": lr_multiplier(step, hp.num_iterations, hp.warmup_steps, hp.warmdown_ratio, hp.final_lr_frac),
            "momentum": muon_momentum(step, hp.num_iterations, hp.warmdown_ratio),
            "weight_decay": weight_decay_multiplier(step, hp.num_iterations)}


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning: SFT and RL start from the base run's rates as the user gave them (not batch-scaled), times a fraction.

# The base run's rates at the reference batch: its flags' defaults (the LM head's 0.008; the reference's 0.004 is
# only its fallback for checkpoints that recorded no flags).
BASE_RATES = {name: REFERENCE_RATES[name] for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")}


def finetune_rates(base_args: dict, overrides: dict, frac: float) -> dict[str, float]:
    """Each rate: the stage's flag if given, else the base run's flag if given, else BASE_RATES; then × frac. The
    base run's batch scaling is not inherited: SFT runs at its own batch with the rates the reference's flags set."""
    rates = {}
    for name, default in BASE_RATES.items():
        value = overrides.get(name)
        if value is None:
            value = base_args.get(name)
        rates[name] = (default if value is None else value) * frac
    return rates


def sft_lr_multiplier(progress: float, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.5,
                      final_lr_frac: float = 0.0) -> float:
    """On progress through the epoch (0 → 1): linear warmup, flat, then linear warmdown to final_lr_frac; never
    negative, and flat-or-falling after the warmup whatever the flags."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if warmdown_ratio <= 0 or progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
    return (1 - decay) + decay * final_lr_frac


def sft_muon_momentum(step: int) -> float:
    """0.85 → 0.95 over the first 300 steps, then flat."""
    frac = min(step / 300, 1.0)
    return 0.85 + 0.10 * frac


def sft_schedule(progress: float, step: int, warmup_ratio: float, warmdown_ratio: float,
                 final_lr_frac: float) -> dict[str, float]:
    """SFT's settings: the rates follow progress through the data, Muon's momentum the step."""
    return {"lr": sft_lr_multiplier(progress, warmup_ratio, warmdown_ratio, final_lr_frac),
            "momentum": sft_muon_momentum(step)}


def rl_schedule(step: int, num_steps: int) -> dict[str, float]:
    """RL's rates decay linearly from full to zero over the run."""
    return {"lr": 1.0 - step / num_steps}
