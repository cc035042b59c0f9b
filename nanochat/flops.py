"""Peak matmul FLOP/s of the device, the denominator of MFU: a table for known GPUs, a measurement on CPUs."""

import json
import time

import torch

from nanochat.common import get_base_dir

GPU_PEAK_BF16 = {  # dense tensor-core peaks, FLOP/s
    "H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def measure_cpu_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0) -> float:
    """Best observed FLOP/s of an n×n matmul on this CPU with all its threads."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def device_peak_flops(device_type: str, dtype: torch.dtype) -> float:
    """Peak FLOP/s for MFU; CPU peaks are measured once per (threads, dtype) and cached in the base dir."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak if dtype in (torch.bfloat16, torch.float16) else peak / 2
        return float("inf")  # unknown GPU: MFU shows as 0 rather than a made-up number
    if device_type != "cpu":
        return float("inf")
    cache = get_base_dir() / "cpu_peak_flops.json"
    key = f"{torch.get_num_threads()}-{str(dtype).removeprefix('torch.')}"
    table = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in table:
        table[key] = measure_cpu_matmul_peak(dtype)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(table))
    return table[key]
