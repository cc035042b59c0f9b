"""Optional fp8 training of the model's large matrices through torchao's float8 training (`base_train --fp8`).

Off by default. As the reference design does it: every linear layer whose sizes are multiples of 16 (the fp8
matmul's tile) and at least 128 wide is converted, the LM head included (tensorwise scaling, torchao's default
recipe); the small gates (value embeddings, smear) stay in the compute dtype. The fp32 master weights, the optimizer
and the checkpoints do not change: torchao casts weights and activations to fp8 inside each matmul and keeps the
parameter itself. Evaluation (val bpb, CORE, samples) runs with fp8 off (`fp8_disabled`), so its figures are those
of the model in the compute dtype, comparable with a run without --fp8.

Which layers are chosen (`fp8_linear_names`) and the switch-off need no torchao, so CPU tests check both.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn

from nanochat.common import UserError
from nanochat.gpt import Linear

FP8_MIN_WIDTH = 128  # narrower layers gain nothing from fp8 and lose precision


def fp8_unavailable_reason() -> str | None:
    """Why fp8 training cannot run here, or None when it can (a CUDA GPU of compute capability ≥ 8.9 and torchao)."""
    if not torch.cuda.is_available():
        return "--fp8 needs a CUDA GPU with fp8 tensor cores (H100 or newer); drop --fp8 on this machine"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"--fp8 needs a GPU of compute capability 8.9 or newer (H100), this one is {major}.{minor}; drop --fp8"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "--fp8 needs torchao: pip install torchao (or drop --fp8)"
    return None


def fp8_linear_names(model: nn.Module) -> list[str]:
    """The qualified names of the linear layers fp8 training converts: the blocks' matrices and the LM head."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0
            and min(m.in_features, m.out_features) >= FP8_MIN_WIDTH]


def is_fp8_linear(module: nn.Module) -> bool:
    """A linear layer converted for fp8 training (torchao's Float8Linear)."""
    return type(module).__name__ == "Float8Linear"


def enable_fp8_training(model: nn.Module) -> int:
    """Swap the layers of `fp8_linear_names` for torchao Float8Linear in place; returns how many were converted.

    Call before building the optimizer and before torch.compile."""
    reason = fp8_unavailable_reason()
    if reason is not None:
        raise UserError(reason)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    chosen = set(fp8_linear_names(model))
    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=lambda m, fqn: fqn in chosen)
    return sum(is_fp8_linear(m) for m in model.modules())


@contextmanager
def fp8_disabled(model: nn.Module):
    """Evaluate without fp8: each Float8Linear is replaced by a plain nanochat Linear holding the same weight (no copy)
    and put back afterwards. A model without fp8 layers is left as it is."""
    swapped = []
    for name, module in list(model.named_modules()):
        if is_fp8_linear(module):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            with torch.device("meta"):  # no memory for a weight that is replaced at once
                plain = Linear(module.in_features, module.out_features)
            plain.weight = module.weight
            setattr(parent, attr, plain)
            swapped.append((parent, attr, module))
    try:
        yield model
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)
