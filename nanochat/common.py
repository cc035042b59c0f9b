"""Things every stage needs: where files live, which device and dtype to compute in, and torchrun's process group."""

import os
import re
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist


class UserError(RuntimeError):
    """An error caused by the user's input or environment; scripts print its one-line message and exit 1."""


def get_base_dir() -> Path:
    """Root of everything nanochat writes: data, tokenizer, checkpoints, report (`NANOCHAT_BASE_DIR`). Not created
    here: whatever writes makes its own folder, so that looking for something (a checkpoint) creates nothing."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    return Path(base)


# ---------------------------------------------------------------------------------------------------------------------
# Device and compute dtype

def git_commit() -> str:
    """The short commit of this checkout, or "unknown" (not a git checkout, or no git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def autodetect_device_type() -> str:
    """cuda > mps > cpu, unless `NANOCHAT_DEVICE` (or a script's --device-type) says otherwise."""
    forced = os.environ.get("NANOCHAT_DEVICE", "").strip()
    if forced:
        if forced not in ("cuda", "mps", "cpu"):
            raise UserError(f"NANOCHAT_DEVICE={forced!r} is not one of cuda, mps, cpu")
        return forced
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def get_compute_dtype(device_type: str) -> torch.dtype:
    """The one dtype policy: the scripts run the model under autocast to this dtype, and the model then computes in
    it from the embedding to the logits (see nanochat/gpt.py); master weights always stay fp32, the loss is fp32.

    bf16 on CUDA SM80+ (Ampere, Hopper); fp32 elsewhere. `NANOCHAT_DTYPE=bf16|fp16|fp32` overrides, e.g. bf16 on a
    CPU with AVX512-BF16 or AMX (runs/cpu.sh sets it where /proc/cpuinfo lists them), which roughly doubles matmul
    throughput there.
    """
    forced = os.environ.get("NANOCHAT_DTYPE", "").strip().lower()
    if forced:
        if forced not in _DTYPES:
            raise UserError(f"NANOCHAT_DTYPE={forced!r} is not one of bf16, fp16, fp32")
        return _DTYPES[forced]
    if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a compute dtype, as `NANOCHAT_DTYPE` and the --dtype flags spell it: bf16, fp16, fp32."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def autocast_ctx(device_type: str, dtype: torch.dtype):
    """Autocast to `dtype` for matmuls, or nothing when computing in fp32."""
    if dtype == torch.float32 or device_type == "mps":
        return nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=dtype)


def synchronize(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------------------------------------------------
# Distributed (torchrun) setup

@dataclass(frozen=True)
class DistInfo:
    is_ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def get_dist_info() -> DistInfo:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); a plain `python -m` run is rank 0 of 1."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return DistInfo(True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    return DistInfo(False, 0, 0, 1)


@dataclass(frozen=True)
class Compute:
    """What a stage computes on: device, dtype policy and its place in the process group."""
    device: torch.device
    device_type: str
    dtype: torch.dtype
    dist: DistInfo

    def autocast(self):
        return autocast_ctx(self.device_type, self.dtype)


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver's version (e.g. "535.104.05"), read without CUDA, or None when there is no driver."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        text = ""
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
    if match:
        return match.group(1)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def cuda_unusable_reason() -> str:
    """Why torch cannot use a CUDA GPU here, naming the NVIDIA driver and the CUDA version torch was built for. A
    driver older than the torch wheel's CUDA is the usual cause: torch then reports no GPU rather than an error."""
    driver = nvidia_driver_version()
    has = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver"
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build ({has} found): install the CUDA build of torch "
                "(runs/setup.sh does on a machine where nvidia-smi works)")
    if driver is None:
        return (f"no NVIDIA driver found (torch {torch.__version__} is built for CUDA {torch.version.cuda}): "
                "install the driver, or pass --device-type=cpu")
    return (f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use the GPU with NVIDIA driver "
            f"{driver}: a driver older than torch's CUDA is the usual cause; update the driver or install a torch "
            "build for an older CUDA")


def compute_init(device_type: str = "", announce: TextIO | None = None) -> Compute:
    """Pick the device, the compute dtype, and join torchrun's process group (nccl on CUDA, gloo otherwise); say
    which attention kernel runs on `announce` (stdout by default)."""
    requested = device_type
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device-type=cuda but no usable CUDA GPU: {cuda_unusable_reason()}")
    if not requested and device_type == "cpu" and nvidia_driver_version() is not None:
        print0(f"warning: running on the CPU although an NVIDIA driver is installed: {cuda_unusable_reason()}")
    info = get_dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if info.is_ddp and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
        dist.barrier()
    dtype = get_compute_dtype(device_type)
    from nanochat.attention import kernel_summary  # imported here: it resolves FA3 on CUDA machines
    print0(kernel_summary(device_type, dtype), file=announce or sys.stdout)  # the CLI's -p keeps stdout for the reply
    return Compute(device=device, device_type=device_type, dtype=dtype, dist=info)


def compute_cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down the group while another still talks to it
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, flushed so progress shows up live in logs and pipes."""
    if int(os.environ.get("RANK", 0)) == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


class DummyWandb:
    """Stands in for a wandb run when logging is off, so training code never branches on it."""

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


def get_wandb(run_name: str, project: str, config: dict, is_master: bool):
    """A real wandb run when `--run` names one (rank 0 only), otherwise a DummyWandb."""
    if not run_name or run_name == "dummy" or not is_master:
        return DummyWandb()
    try:
        import wandb  # optional: only --run needs it
    except ImportError as e:
        raise UserError("--run is set but wandb is not installed: pip install wandb (or drop --run)") from e
    return wandb.init(project=project, name=run_name, config=config)


def run_cli(main) -> None:
    """Run a script's main(); a UserError becomes one clear line on stderr and exit code 1, not a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    compute_cleanup()  # only after success: a failed rank exits at once and torchrun stops the others
