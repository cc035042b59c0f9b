"""Sandbox benchmark: calls per second and latency of a trivial program, and time to contain each attack."""

import json
import statistics
import time

from nanochat.sandbox.execution import execute_code, isolation_layers

ATTACKS = {
    "infinite_loop": ("while True: pass", 1.0),
    "fork_bomb": ("import os\nwhile True: os.fork()", 2.0),
    "memory_bomb": ("x = []\nwhile True: x.append(bytearray(10**7))", 10.0),
    "huge_output": ("while True: print('x' * 10000)", 1.0),
    # past the Python-level guards: only the kernel layers stop these
    "posix_fork_bomb": ("import posix\nwhile True: posix.fork()", 2.0),
}


def main() -> None:
    latencies = []
    for _ in range(30):
        t0 = time.perf_counter()
        assert execute_code("print(1+1)").stdout == "2\n"
        latencies.append(time.perf_counter() - t0)
    latencies.sort()
    result = {"calls_per_s": round(len(latencies) / sum(latencies), 1),
              "p50_ms": round(1000 * statistics.median(latencies), 1),
              "p95_ms": round(1000 * latencies[int(0.95 * len(latencies)) - 1], 1),
              "layers": isolation_layers()}
    for name, (code, timeout) in ATTACKS.items():
        t0 = time.perf_counter()
        r = execute_code(code, timeout=timeout, memory_limit_mb=256)
        result[f"contain_{name}_s"] = round(time.perf_counter() - t0, 2)
        result[f"contain_{name}_ok"] = not r.success
    disk = execute_code("n = 0\ntry:\n    for i in range(100):\n        open(f'f{i}', 'wb').write(b'x' * 2**20)\n"
                        "        n += 1\nexcept OSError:\n    pass\nprint(n)", max_file_mb=16)
    result["disk_fill_mb_written_of_32"] = int(disk.stdout or 0)  # 1 MB files, each under RLIMIT_FSIZE
    print(json.dumps(result))


if __name__ == "__main__":
    main()
