"""Preflight: before paying for hours of a GPU node, check on that node that the run will work, and what it will cost.

    python -m scripts.preflight                                   # the speedrun's d20 on this machine's GPUs
    python -m scripts.preflight --usd-per-gpu-hour=3 --json=preflight.json
    python -m scripts.preflight --depth=12 --nproc=1              # another run
    python -m scripts.preflight --skip decode allreduce           # leave checks out

One line per check, each with a verdict (ok / warn / FAIL); the exit code is 1 when any line fails:
- versions: torch, its CUDA and the driver's, and that the driver can run that torch (a too-old driver makes torch
  see no GPU, and the run would fall back to the CPU);
- gpus: how many, which, and their free memory (at least --min-free-gib each);
- attention: Flash Attention 3 installed and taken by nanochat/attention.py (checked against the kernel itself);
- compile: torch.compile of a tiny function runs and agrees with eager;
- allreduce: bus bandwidth of an all-reduce across the local GPUs, one process per GPU (NCCL); on a CPU, gloo
  between 2 processes;
- train: a few optimizer steps of the run's model on random tokens, in one process per GPU of the run (built,
  compiled and stepped by the library as base_train does, the optimizer sharded over the processes): tokens/s per
  GPU, MFU, peak reserved memory;
- predict: the pretraining's time and cost from its planned tokens (nanochat/scaling.py) at the measured rate;
- decode: the engine's decode at batch 1 and 32, and on CUDA that every step replays a captured CUDA graph.

On a CPU the same checks run a tiny version (depth 2, 2 steps, a short context): what CI tests.
"""

import argparse
import ctypes
import json
import math
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.checkpoint import build_model
from nanochat.common import (Compute, UserError, autodetect_device_type, compute_init, get_compute_dtype, run_cli,
                             synchronize)
from nanochat.decode import DecodePolicy, rows_bucket
from nanochat.engine import Engine
from nanochat.flops import device_peak_flops
from nanochat.scaling import Overrides, derive_hparams, pretraining_schedule
from nanochat.tokenizer import SPECIAL_TOKENS
from nanochat.training import Timer, format_duration, train_step

CHECKS = ("versions", "gpus", "attention", "compile", "allreduce", "train", "predict", "decode")
DECODE_BATCHES = (1, 32)
GiB = 2 ** 30
LOW_BUS_BANDWIDTH = 100e9  # bytes/s: below this the GPUs talk over PCIe, not NVLink (H100 SXM: ~350-450 GB/s)
MEMORY_HEADROOM = 0.92  # peak reserved above this share of a GPU's memory: a longer run may hit out-of-memory


@dataclass
class Check:
    name: str
    verdict: str  # ok | warn | FAIL
    detail: str
    values: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Plan:
    """What the run will be (the speedrun's settings by default) and what the preflight may spend measuring it."""
    device_type: str
    depth: int
    nproc: int
    sequence_len: int
    device_batch_size: int
    total_batch_size: int | None
    target_param_data_ratio: float
    window_pattern: str
    vocab_size: int
    compile: bool
    steps: int
    decode_tokens: int
    usd_per_gpu_hour: float
    min_free_gib: float


def predict_run(planned_tokens: int, tokens_per_s_per_gpu: float, gpus: int,
                usd_per_gpu_hour: float) -> tuple[float, float]:
    """(seconds, USD) to train `planned_tokens` on `gpus` GPUs, each at the rate measured per GPU when all of them
    train together, paying `usd_per_gpu_hour` for each GPU."""
    if tokens_per_s_per_gpu <= 0 or gpus < 1:
        raise ValueError(f"need a positive rate and at least one GPU, not {tokens_per_s_per_gpu} tok/s on {gpus}")
    seconds = planned_tokens / (tokens_per_s_per_gpu * gpus)
    return seconds, seconds / 3600 * gpus * usd_per_gpu_hour


# ---------------------------------------------------------------------------------------------------------------------
# versions and devices

def nvidia_smi(*args: str) -> list[str]:
    """nvidia-smi's output lines, or [] where it is missing or fails (no NVIDIA driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed driver supports (cuDriverGetVersion), or None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def check_versions(plan: Plan) -> Check:
    torch_cuda = torch.version.cuda
    driver = driver_cuda_version()
    driver_name = (nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader") or [None])[0]
    smi_gpus = nvidia_smi("-L")
    values = {"torch": torch.__version__, "torch_cuda": torch_cuda, "driver": driver_name,
              "driver_cuda": f"{driver[0]}.{driver[1]}" if driver else None, "python": sys.version.split()[0]}
    shown = (f"torch {torch.__version__} (CUDA {torch_cuda or 'none'}), driver {driver_name or 'none'} "
             f"(CUDA {values['driver_cuda'] or 'none'})")
    if smi_gpus and not torch.cuda.is_available():
        why = ("torch is a CPU build: reinstall the CUDA build (delete .venv and source runs/setup.sh)"
               if torch_cuda is None else
               f"torch is built for CUDA {torch_cuda}, the driver supports CUDA {values['driver_cuda']}: update the "
               "NVIDIA driver or install a torch built for an older CUDA (TORCH_VERSION in runs/setup.sh)")
        return Check("versions", "FAIL", f"{shown}; nvidia-smi sees {len(smi_gpus)} GPU(s) but torch cannot use "
                                         f"them ({why})", values)
    if plan.device_type == "cpu":
        return Check("versions", "ok", f"{shown}; no CUDA GPU: the tiny CPU version of the preflight", values)
    if torch_cuda is None or driver is None:
        return Check("versions", "FAIL", f"{shown}: a CUDA run needs the CUDA build of torch and an NVIDIA driver",
                     values)
    need = tuple(int(x) for x in torch_cuda.split(".")[:2])
    if driver[0] < need[0]:
        return Check("versions", "FAIL", f"{shown}: the driver is too old for this torch; update the NVIDIA driver",
                     values)
    if driver < need:
        return Check("versions", "warn", f"{shown}: runs through CUDA minor-version compatibility (no PTX JIT); "
                                         "a driver for CUDA {}.{} is safer".format(*need), values)
    return Check("versions", "ok", shown, values)


def available_host_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), or free pages where /proc/meminfo is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_gpus(plan: Plan) -> Check:
    if plan.device_type == "cpu":
        free = available_host_memory()
        values = {"count": 0, "threads": torch.get_num_threads(), "free_gib": [round(free / GiB, 1)]}
        detail = f"cpu, {torch.get_num_threads()} threads, {free / GiB:.1f} GiB of memory available"
        if free < plan.min_free_gib * GiB:
            return Check("gpus", "FAIL", f"{detail}, below --min-free-gib={plan.min_free_gib:g}", values)
        return Check("gpus", "ok", detail, values)
    count = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    memory = [torch.cuda.mem_get_info(i) for i in range(count)]  # (free, total) bytes
    values = {"count": count, "names": names, "free_gib": [round(f / GiB, 1) for f, _ in memory],
              "total_gib": [round(t / GiB, 1) for _, t in memory]}
    detail = (f"{count}× {names[0] if len(set(names)) == 1 else ' + '.join(names)}, free "
              f"{min(f for f, _ in memory) / GiB:.1f} of {memory[0][1] / GiB:.1f} GiB (least free)")
    if count < plan.nproc:
        return Check("gpus", "FAIL", f"{detail}: the run asks for --nproc={plan.nproc}", values)
    if min(f for f, _ in memory) < plan.min_free_gib * GiB:
        return Check("gpus", "FAIL", f"{detail}, below --min-free-gib={plan.min_free_gib:g}: another process holds "
                                     "GPU memory (see nvidia-smi)", values)
    if any(t - f > 2 * GiB for f, t in memory) or len(set(names)) > 1:
        return Check("gpus", "warn", f"{detail}: other processes hold GPU memory or the GPUs differ", values)
    return Check("gpus", "ok", detail, values)


def check_attention(plan: Plan) -> Check:
    from nanochat import attention
    if plan.device_type != "cuda":
        return Check("attention", "ok", f"not applicable on {plan.device_type}: PyTorch SDPA")
    major, minor = torch.cuda.get_device_capability()
    values = {"capability": f"{major}.{minor}", "fa3": attention.FA3 is not None}
    if attention.FA3 is None:
        if major != 9:
            return Check("attention", "warn", f"SM{major}{minor}: FA3 needs Hopper (SM90), attention runs PyTorch "
                                              "SDPA (slower, and flex_attention for short windows)", values)
        return Check("attention", "FAIL", f"FA3 ({attention.FA3_REPO}) is not loaded on this Hopper GPU, attention "
                                          "would fall back to SDPA: pip install -e '.[gpu]' (the line printed "
                                          "above says why it failed)", values)
    q, k, v = (torch.randn(2, 512, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    taken = attention.attention(q, k, v, window=512)  # the model's path, (B, T, H, D)
    direct = attention.FA3.flash_attn_func(q, k, v, causal=True, window_size=(-1, 0))
    direct = direct[0] if isinstance(direct, tuple) else direct
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            is_causal=True).transpose(1, 2)
    error = (taken.float() - sdpa.float()).abs().max().item()
    values.update(max_error_vs_sdpa=error, fa3_taken=torch.equal(taken, direct))
    if not values["fa3_taken"]:
        return Check("attention", "FAIL", "FA3 is loaded but nanochat/attention.py did not take it for bf16 inputs",
                     values)
    if error > 2e-2:
        return Check("attention", "FAIL", f"FA3 disagrees with SDPA by {error:.3g}: a broken kernel build", values)
    return Check("attention", "ok", f"FA3 ({attention.FA3_REPO}) taken; agrees with SDPA to {error:.1e}", values)


def check_compile(plan: Plan) -> Check:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x @ x.T).softmax(-1).sum(0)

    torch._dynamo.reset()
    x = torch.randn(64, 64, device=plan.device_type)
    compiled = torch.compile(f, dynamic=False, fullgraph=True)
    error = (compiled(x) - f(x)).abs().max().item()
    if not error < 1e-3:
        return Check("compile", "FAIL", f"torch.compile's result differs from eager by {error:.3g}")
    return Check("compile", "ok", f"torch.compile (Inductor) ran a tiny function; agrees with eager to {error:.1e}",
                 {"max_error": error})


# ---------------------------------------------------------------------------------------------------------------------
# Measurements in a group of local processes, one per GPU (NCCL), or gloo processes on a CPU

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessFailed(RuntimeError):
    """A process of a measurement failed; the message is its error's last line, type included."""


def run_in_group(worker, world: int, device_type: str, *args) -> dict:
    """Rank 0's result of `worker(compute, *args)` run in `world` fresh processes set up as torchrun's are
    (`compute_init`: the device, dtype policy and process group base_train gets). Fresh processes leave this one's
    memory and compile caches as they were; a failing rank stops them all, and its error's last line is raised
    here."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        try:
            mp.spawn(group_process, args=(world, free_port(), device_type, worker, args, out), nprocs=world)
        except mp.ProcessRaisedException as e:
            raise ProcessFailed(str(e).strip().splitlines()[-1]) from None
        return json.loads(Path(out).read_text())


def group_process(rank: int, world: int, port: int, device_type: str, worker, args: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    compute = compute_init(device_type)
    try:
        result = worker(compute, *args)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def allreduce_worker(compute: Compute, nbytes: int, iters: int) -> dict:
    """Checks one sum, then times `iters` all-reduces of `nbytes`."""
    world, device = compute.dist.world_size, compute.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.full((nbytes // dtype.itemsize,), float(compute.dist.rank + 1), device=device, dtype=dtype)
    dist.all_reduce(x)
    correct = bool((x == world * (world + 1) / 2).all())
    for _ in range(2):
        dist.all_reduce(x)  # warm-up
    synchronize(device.type)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    synchronize(device.type)
    return {"seconds": (time.perf_counter() - t0) / iters, "correct": correct}


def check_allreduce(plan: Plan) -> Check:
    world = plan.nproc if plan.device_type == "cuda" else 2
    if world < 2:
        return Check("allreduce", "ok", "not applicable: the run uses one GPU")
    if plan.device_type == "cuda" and world > torch.cuda.device_count():
        return Check("allreduce", "FAIL", f"--nproc={world} but {torch.cuda.device_count()} GPU(s) visible")
    nbytes, iters = (256 * 2 ** 20, 20) if plan.device_type == "cuda" else (8 * 2 ** 20, 5)
    result = run_in_group(allreduce_worker, world, plan.device_type, nbytes, iters)
    bus = nbytes / result["seconds"] * 2 * (world - 1) / world  # what each link carries, as nccl-tests reports it
    backend = "NCCL" if plan.device_type == "cuda" else "gloo"
    values = {"processes": world, "backend": backend, "megabytes": nbytes / 2 ** 20, "bus_gb_s": bus / 1e9,
              "correct": result["correct"]}
    detail = f"{backend}, {world} processes, {nbytes / 2 ** 20:.0f} MiB: bus bandwidth {bus / 1e9:.1f} GB/s"
    if not result["correct"]:
        return Check("allreduce", "FAIL", f"{detail}, but the sum came out wrong", values)
    if plan.device_type == "cuda" and bus < LOW_BUS_BANDWIDTH:
        return Check("allreduce", "warn", f"{detail}: no NVLink? multi-GPU steps will be slower than predicted",
                     values)
    return Check("allreduce", "ok", detail, values)


def random_batches(batch: int, seq: int, vocab: int, device: torch.device, seed: int):
    """Endless (inputs, targets) of random tokens: a step's speed does not depend on the data."""
    generator = torch.Generator(device=device).manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (batch, seq + 1), device=device, generator=generator)
        yield x[:, :-1].contiguous(), x[:, 1:].contiguous()


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak: memory reserved by the CUDA allocator, or the peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def train_worker(compute: Compute, plan: Plan, hp, warmup: int) -> dict:
    """A few optimizer steps of the run's model on each rank, as base_train builds, compiles and steps it (the
    optimizer sharded over the ranks, the run's micro-batches and accumulation)."""
    rank, world, device, dtype = compute.dist.rank, compute.dist.world_size, compute.device, compute.dtype
    torch.manual_seed(0)
    model = build_model(hp.model_config(), device)
    optimizer = model.setup_optimizer(embedding_lr=hp.embedding_lr, unembedding_lr=hp.unembedding_lr,
                                      matrix_lr=hp.matrix_lr, scalar_lr=hp.scalar_lr, weight_decay=hp.weight_decay)
    train_model = torch.compile(model, dynamic=False) if plan.compile else model
    streams = [random_batches(hp.device_batch_size, hp.sequence_len, hp.vocab_size, device, 1000 * rank + i)
               for i in range(hp.grad_accum_steps)]
    times, losses = [], []
    try:
        for step in range(warmup + plan.steps):
            optimizer.apply_schedule(**pretraining_schedule(hp, step))
            with Timer(device.type) as timer:
                losses.append(train_step(train_model, optimizer, streams, compute.autocast))
            times.append(timer.dt)
    except torch.OutOfMemoryError:
        raise RuntimeError(f"out of memory at --device-batch-size={hp.device_batch_size}: lower it (the "
                           "accumulation steps grow to keep the total batch)") from None
    memory = peak_memory_gib(device)
    if world > 1:
        memories = [None] * world
        dist.all_gather_object(memories, memory)
        memory = max(memories)
    step_s = statistics.median(times[warmup:])
    tok_s = hp.device_batch_size * hp.sequence_len * hp.grad_accum_steps / step_s
    flops_per_token = model.estimate_flops()
    peak_flops = device_peak_flops(device.type, dtype) if rank == 0 else float("inf")
    total_memory = torch.cuda.get_device_properties(device).total_memory / GiB if device.type == "cuda" else None
    return {"processes": world, "steps": plan.steps, "step_s": step_s, "warmup_s": sum(times[:warmup]),
            "tokens_per_s": tok_s, "mfu": flops_per_token * tok_s / peak_flops, "flops_per_token": flops_per_token,
            "peak_memory_gib": memory, "total_memory_gib": total_memory, "losses": losses}


def check_train(plan: Plan, hp) -> Check:
    warmup = 2
    if plan.device_type == "cuda" and plan.nproc > torch.cuda.device_count():
        return Check("train", "FAIL", f"--nproc={plan.nproc} but {torch.cuda.device_count()} GPU(s) visible")
    values = run_in_group(train_worker, plan.nproc, plan.device_type, plan, hp, warmup)
    memory_kind = "peak reserved" if plan.device_type == "cuda" else "process peak RSS"
    values["peak_memory_kind"] = memory_kind
    unit, units = ("GPU", "GPU(s)") if plan.device_type == "cuda" else ("process", "process(es)")
    detail = (f"d{hp.n_layer} on {plan.nproc} {units}, batch {hp.device_batch_size}×{hp.sequence_len}×"
              f"{hp.grad_accum_steps} accum: {values['tokens_per_s']:,.0f} tok/s per {unit}, MFU "
              f"{100 * values['mfu']:.1f}%, {memory_kind} {values['peak_memory_gib']:.1f} GiB, first {warmup} steps "
              f"{values['warmup_s']:.1f} s{' (compile)' if plan.compile else ''}")
    if not all(math.isfinite(loss) for loss in values["losses"]):
        return Check("train", "FAIL", f"{detail}; the loss is not finite ({values['losses']})", values)
    total = values["total_memory_gib"]
    if total and values["peak_memory_gib"] > MEMORY_HEADROOM * total:
        return Check("train", "warn", f"{detail}: {100 * values['peak_memory_gib'] / total:.0f}% of the GPU's "
                                      f"{total:.0f} GiB, little headroom; consider a lower --device-batch-size",
                     values)
    return Check("train", "ok", detail, values)


def check_predict(plan: Plan, hp, train: Check) -> Check:
    tokens = hp.num_iterations * hp.total_batch_size
    if train.verdict == "FAIL" or "tokens_per_s" not in train.values:
        return Check("predict", "FAIL", "no prediction without a training measurement")
    seconds, usd = predict_run(tokens, train.values["tokens_per_s"], plan.nproc, plan.usd_per_gpu_hour)
    values = {"planned_tokens": tokens, "steps": hp.num_iterations, "gpus": plan.nproc, "seconds": seconds,
              "usd": usd, "usd_per_gpu_hour": plan.usd_per_gpu_hour}
    unit = "GPU(s)" if plan.device_type == "cuda" else "process(es)"
    return Check("predict", "ok", f"pretraining {tokens:,} tokens ({hp.num_iterations:,} steps) on {plan.nproc} "
                                  f"{unit}: {format_duration(seconds)}, ${usd:,.2f} at ${plan.usd_per_gpu_hour:g}/GPU-"
                                  "hour at the measured rate (evals, SFT and RL come on top)", values)


class TokenIds:
    """What the engine needs of a tokenizer when nothing is decoded to text: special-token ids, no stop tokens (every
    sample decodes its full length)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode_special(self, name: str) -> int:
        return self.vocab_size - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index(name)

    def stop_tokens(self) -> set[int]:
        return set()


def check_decode(plan: Plan, hp) -> list[Check]:
    """The engine's decode of the run's model (random weights; its own copy of them in the compute dtype, CUDA
    graphs on CUDA) at each batch."""
    device = torch.device(plan.device_type)
    dtype = get_compute_dtype(device.type)
    torch.manual_seed(0)
    model = build_model(hp.model_config(), device).eval()
    engine = Engine(model, TokenIds(model.config.vocab_size), use_tools=False, dtype=dtype,
                    policy=DecodePolicy.for_device(device))
    prompt = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    checks = []
    for batch in DECODE_BATCHES:
        t0 = time.perf_counter()
        # the same lengths as the timed run: builds (and on CUDA captures) every step it will take
        engine.generate_batch(prompt, batch, max_tokens=plan.decode_tokens, temperature=1.0, top_k=50)
        warmup = time.perf_counter() - t0
        first, steps = None, 0
        for _ in engine.generate(prompt, num_samples=batch, max_tokens=plan.decode_tokens, temperature=1.0, top_k=50):
            steps += 1
            if first is None:
                first = time.perf_counter()
        tok_s = (steps - 1) * batch / max(time.perf_counter() - first, 1e-9)
        rows = rows_bucket(batch, engine.decoder.slots)
        keys = [key for key in engine.decoder.built_steps if key[0] == rows]
        uncaptured = [key for key in keys if key not in engine.decoder.captured]
        values = {"batch": batch, "tokens_per_s": tok_s, "steps": steps, "warmup_s": warmup,
                  "policy": asdict(engine.policy), "step_keys": len(keys), "uncaptured": len(uncaptured)}
        detail = f"batch {batch}: {tok_s:,.0f} tok/s over {steps} steps"
        name = f"decode_b{batch}"
        if not engine.policy.graph:
            checks.append(Check(name, "ok", f"{detail}; CUDA-graph capture not applicable on {device.type}", values))
        elif uncaptured:
            checks.append(Check(name, "FAIL", f"{detail}; {len(uncaptured)} of {len(keys)} decode steps were not "
                                              "captured as CUDA graphs (see the warnings above)", values))
        else:
            checks.append(Check(name, "ok", f"{detail}; all {len(keys)} step shapes captured as CUDA graphs",
                                values))
    return checks


# ---------------------------------------------------------------------------------------------------------------------
# the table

def timed(name: str, fn, *args) -> list[Check]:
    """Run one check; an exception becomes its FAIL line, so one broken part never hides the others."""
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 (any failure of a check is that check's verdict)
        message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        result = Check(name, "FAIL", message if isinstance(e, ProcessFailed) else f"{type(e).__name__}: {message}")
    checks = result if isinstance(result, list) else [result]
    for check in checks:
        check.seconds = time.perf_counter() - t0
    return checks


def table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.name:<{width}}  {c.verdict:<4}  {c.detail}" for c in checks)


def verdict(checks: list[Check]) -> str:
    verdicts = {c.verdict for c in checks}
    return "FAIL" if "FAIL" in verdicts else "warn" if "warn" in verdicts else "ok"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Check a machine before a run: versions, GPUs, FA3, compile, "
                                            "all-reduce, training speed and memory, predicted time and cost, decode.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device-type", default="", help="cuda|cpu (default: autodetect; cpu runs the tiny version)")
    p.add_argument("--depth", type=int, default=None, help="the run's depth (default 20 on CUDA, 2 on a CPU)")
    p.add_argument("--nproc", type=int, default=None, help="GPUs the run uses (default: every visible GPU)")
    p.add_argument("--max-seq-len", dest="sequence_len", type=int, default=None, help="default 2048 (256 on CPU)")
    p.add_argument("--device-batch-size", type=int, default=None, help="default 32 (2 on CPU)")
    p.add_argument("--total-batch-size", type=int, default=None, help="default: derived (one micro-batch on CPU)")
    p.add_argument("--target-param-data-ratio", type=float, default=10.5, help="the speedrun's tokens per parameter")
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--vocab-size", type=int, default=32768, help="the tokenizer's (the speedrun trains 32768)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="compile the training step "
                   "(auto: on CUDA, as base_train)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps after 2 warm-up ones (default 10, "
                   "2 on CPU)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens per decode sample (default 128, 16 on CPU)")
    p.add_argument("--usd-per-gpu-hour", type=float, default=3.0, help="the node's price per GPU and hour")
    p.add_argument("--min-free-gib", type=float, default=0.0, help="fail when a GPU (CPU: RAM) has less free")
    p.add_argument("--skip", nargs="+", default=[], choices=CHECKS, help="checks to leave out")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace, device_type: str) -> Plan:
    cuda = device_type == "cuda"
    nproc = args.nproc or (max(torch.cuda.device_count(), 1) if cuda else 1)
    seq = args.sequence_len or (2048 if cuda else 256)
    batch = args.device_batch_size or (32 if cuda else 2)
    total = args.total_batch_size or (None if cuda else batch * seq * nproc)
    for flag, value in (("--nproc", nproc), ("--max-seq-len", seq), ("--device-batch-size", batch)):
        if value < 1:
            raise UserError(f"{flag}={value} must be at least 1")
    return Plan(device_type=device_type, depth=args.depth or (20 if cuda else 2), nproc=nproc, sequence_len=seq,
                device_batch_size=batch, total_batch_size=total, target_param_data_ratio=args.target_param_data_ratio,
                window_pattern=args.window_pattern, vocab_size=args.vocab_size,
                compile=args.compile == "on" or (args.compile == "auto" and cuda),
                steps=args.steps or (10 if cuda else 2), decode_tokens=args.decode_tokens or (128 if cuda else 16),
                usd_per_gpu_hour=args.usd_per_gpu_hour, min_free_gib=args.min_free_gib)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    device_type = args.device_type or autodetect_device_type()
    if device_type not in ("cuda", "cpu"):
        raise UserError(f"--device-type={device_type}: the preflight checks cuda or cpu machines")
    plan = make_plan(args, device_type)
    hp = derive_hparams(plan.depth, Overrides(sequence_len=plan.sequence_len, window_pattern=plan.window_pattern,
                                              device_batch_size=plan.device_batch_size,
                                              total_batch_size=plan.total_batch_size,
                                              target_param_data_ratio=plan.target_param_data_ratio),
                        vocab_size=plan.vocab_size, world_size=plan.nproc)
    print(f"preflight of d{plan.depth} on {plan.nproc} {device_type} process(es): device batch "
          f"{plan.device_batch_size}×{plan.sequence_len}, {hp.num_iterations:,} steps of {hp.total_batch_size:,} "
          "tokens planned", flush=True)
    wanted = [name for name in CHECKS if name not in args.skip]
    checks = []
    if "versions" in wanted:
        checks += timed("versions", check_versions, plan)
    if device_type == "cuda" and not torch.cuda.is_available():
        checks.append(Check("gpus", "FAIL", "--device-type=cuda but torch sees no usable CUDA GPU (see versions): "
                                            "the other checks need one"))
        wanted = []
    for name in ("gpus", "attention", "compile", "allreduce"):
        if name in wanted:
            checks += timed(name, globals()[f"check_{name}"], plan)
    if "train" in wanted or "predict" in wanted:
        train = timed("train", check_train, plan, hp)[0]
        checks += [train] if "train" in wanted else []
        if "predict" in wanted:
            checks += timed("predict", check_predict, plan, hp, train)
    if "decode" in wanted:
        checks += timed("decode", check_decode, plan, hp)
    overall = verdict(checks)
    elapsed = time.perf_counter() - start
    print(table(checks))
    print(f"preflight: {overall} in {format_duration(elapsed)}", flush=True)
    if args.json:
        report = {"verdict": overall, "elapsed_s": elapsed, "plan": asdict(plan), "hyperparams": hp.to_dict(),
                  "checks": [asdict(c) for c in checks]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    if overall == "FAIL":
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
