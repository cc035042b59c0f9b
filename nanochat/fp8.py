"""Optional fp8 training of the transformer's matrices through torchao's float8 training (`base_train --fp8`).

Off by default. Only the blocks' linear layers are converted (tensorwise scaling, torchao's default recipe): the LM
head stays in bf16, as the loss is sensitive to it, and so do the small value-embedding gates. The fp32 master
weights, the optimizer and the checkpoints do not change: torchao casts weights and activations to fp8 inside each
matmul and keeps the parameter itself.
"""

import torch

from nanochat.common import UserError


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


def enable_fp8_training(model: torch.nn.Module) -> int:
    """Swap the blocks' linear layers for torchao Float8Linear in place; returns how many were converted.

    Call before building the optimizer and before torch.compile. Layers whose sizes are not multiples of 16 (the
    fp8 matmul's tile) are left as they are.
    """
    reason = fp8_unavailable_reason()
    if reason is not None:
        raise UserError(reason)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def wanted(module: torch.nn.Module, fqn: str) -> bool:
        return (fqn.startswith("blocks.") and isinstance(module, torch.nn.Linear)
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)
    convert_to_float8_training(model.blocks, config=Float8LinearConfig(),
                               module_filter_fn=lambda m, fqn: wanted(m, "blocks." + fqn))
    from torchao.float8.float8_linear import Float8Linear
    return sum(isinstance(m, Float8Linear) for m in model.blocks.modules())
