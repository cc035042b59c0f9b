"""Fit `runs/cpu.sh` to a time budget: measure this CPU's matmul speed, then choose how much work each stage does.

    python -m scripts.budget --minutes 15                 # measure, plan and print (what runs/cpu.sh calls)
    python -m scripts.budget --minutes 15 --set BASE_STEPS=300

The cost model is simple on purpose. Pretraining costs what its FLOPs cost at the MFU the compiled d4 step reaches
in the compute dtype (`TRAIN_MFU`, from bench/train.py). Every other stage costs a fixed part (start-up) plus a
part proportional to its work (steps, problems) on the reference CPU (`STAGE_COSTS`), scaled by the square root of
how much slower this CPU's fp32 matmuls are: evaluation, generation, compilation and the short SFT/RL runs are only
partly matmul-bound (Python, small kernels), and measured to slow down by about that much (`OVERHEAD_EXPONENT`).
Pretraining takes what the other stages leave, between a floor that still shows the loss falling and a ceiling;
when even the floor does not fit, SFT, RL and the evaluations shrink too, down to their own floors.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nanochat.common import UserError, dtype_name, get_compute_dtype, run_cli
from nanochat.flops import measure_cpu_matmul_peak
from nanochat.gpt import GPTConfig
from nanochat.report import get_report
from nanochat.scaling import model_shape

REFERENCE_CPU = "2-core Intel Xeon (AVX512-BF16/AMX)"
REFERENCE_FP32_FLOPS = 300e9  # its 1024² fp32 matmul speed (nanochat.flops.measure_cpu_matmul_peak)
# compiled d4 step, vocab 8192, over the probe: measured in runs/cpu.sh on the reference CPU (steady 4,942 tokens/s
# in fp32 with a 331 GFLOP/s probe, 7,863 in bf16 with a 1,078 GFLOP/s one)
TRAIN_MFU = {"fp32": 0.56, "bf16": 0.275}
COMPILE_S = 40.0  # compilation in the first pretraining step, reference CPU, cold cache (9-17 s when warm)

KNOBS = ("BASE_STEPS", "SFT_STEPS", "RL_STEPS", "MAX_PER_TASK", "CHAT_PROBLEMS")
DEFAULTS = {"BASE_STEPS": 300, "SFT_STEPS": 80, "RL_STEPS": 20, "MAX_PER_TASK": 50, "CHAT_PROBLEMS": 50}
FLOORS = {"BASE_STEPS": 120, "SFT_STEPS": 20, "RL_STEPS": 5, "MAX_PER_TASK": 16, "CHAT_PROBLEMS": 16}
BASE_STEPS_CEILING = 1500


@dataclass(frozen=True)
class StageCost:
    """Seconds on the reference CPU: `fixed` + `per_unit` × the stage's units (its knob's value)."""
    fixed: float
    per_unit: float
    knob: str | None = None


# Measured: the stage times runs/cpu.sh printed on the reference CPU at the default knobs, one run in bf16 and one
# with fp32 forced (base_eval 88 / 103 s, chat_sft 128 / 172 s, sft_eval 92 / 55 s, chat_rl 197 s, rl_eval 27 s),
# the slower of the two kept; chat_rl's per-step cost also fits a floor-sized run (5 steps) on a slower CPU.
STAGE_COSTS = {
    "data": StageCost(5.0, 0.0),
    "tok_train": StageCost(12.0, 0.0),
    "tok_eval": StageCost(6.0, 0.0),
    "base_eval": StageCost(50.0, 1.2, "MAX_PER_TASK"),
    "chat_sft": StageCost(30.0, 2.0, "SFT_STEPS"),
    "sft_eval": StageCost(15.0, 1.6, "CHAT_PROBLEMS"),
    "chat_rl": StageCost(0.0, 9.0, "RL_STEPS"),
    "rl_eval": StageCost(8.0, 0.4, "CHAT_PROBLEMS"),
}
# chat_rl also evaluates pass@k on CHAT_PROBLEMS at its end
RL_EVAL_PER_PROBLEM = 0.5
BASE_TRAIN_FIXED_S = 35.0  # start-up, periodic val bpb and checkpoints (reference CPU, measured)
# Stages other than pretraining's steps take slowdown ** OVERHEAD_EXPONENT times their reference time. Measured with
# fp32 forced on a 2-core AMD EPYC whose probe is 1.96x slower than the reference's: base_eval, chat_sft, sft_eval
# and rl_eval ran 1.1-1.6x their reference-CPU cost (√1.96 = 1.4), compilation 44 s against 40.
OVERHEAD_EXPONENT = 0.5


@dataclass(frozen=True)
class Machine:
    """What the probe measured: matmul FLOP/s in fp32 and in the compute dtype, and which dtype that is."""
    fp32_flops: float
    compute_flops: float
    dtype: str


@dataclass(frozen=True)
class Workload:
    """What one pretraining step is: tokens per step and training FLOPs per token of the model."""
    tokens_per_step: int
    flops_per_token: float


@dataclass
class Plan:
    budget_s: float
    knobs: dict[str, int]
    stage_s: dict[str, float]
    train_tokens_per_s: float
    slowdown: float
    overridden: list[str] = field(default_factory=list)
    shrunk: bool = False

    @property
    def total_s(self) -> float:
        return sum(self.stage_s.values())

    def describe(self, machine: Machine) -> str:
        measured = f"fp32 {machine.fp32_flops / 1e9:.0f} GFLOP/s"
        if machine.dtype != "fp32":
            measured += f", {machine.dtype} {machine.compute_flops / 1e9:.0f} GFLOP/s"
        lines = [f"time budget {self.budget_s / 60:g} min; measured matmul: {measured} (compute dtype "
                 f"{machine.dtype}): {self.slowdown:.2f}x the reference CPU's matmul time; pretraining expected at "
                 f"{self.train_tokens_per_s:,.0f} tokens/s",
                 "chosen: " + ", ".join(f"{k}={v}" + (" (set)" if k in self.overridden else "")
                                        for k, v in self.knobs.items())
                 + (" — SFT, RL and evals shrunk to fit" if self.shrunk else "")]
        lines += [f"  expected {name:<10} {_minutes(s)}" for name, s in self.stage_s.items()]
        lines.append(f"  expected {'total':<10} {_minutes(self.total_s)}")
        if self.total_s > 1.1 * self.budget_s:
            lines.append("warning: over the budget even at the floors: this CPU is slow or busy (other processes "
                         "running?); raise TIME_BUDGET_MIN or set smaller knobs")
        return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def base_step_seconds(machine: Machine, work: Workload) -> float:
    return work.tokens_per_step * work.flops_per_token / (machine.compute_flops * TRAIN_MFU[machine.dtype])


def stage_seconds(knobs: dict[str, int], machine: Machine, work: Workload) -> dict[str, float]:
    """Expected seconds of every stage of runs/cpu.sh with these knob values on this machine."""
    overhead = (REFERENCE_FP32_FLOPS / machine.fp32_flops) ** OVERHEAD_EXPONENT
    out = {}
    for name in ("data", "tok_train", "tok_eval"):
        out[name] = STAGE_COSTS[name].fixed * (1 if name == "data" else overhead)
    out["base_train"] = (BASE_TRAIN_FIXED_S + COMPILE_S) * overhead + knobs["BASE_STEPS"] * base_step_seconds(
        machine, work)
    for name in ("base_eval", "chat_sft", "sft_eval", "chat_rl", "rl_eval"):
        cost = STAGE_COSTS[name]
        out[name] = (cost.fixed + cost.per_unit * knobs[cost.knob]) * overhead
    out["chat_rl"] += RL_EVAL_PER_PROBLEM * knobs["CHAT_PROBLEMS"] * overhead
    return out


def plan_pipeline(machine: Machine, work: Workload, budget_s: float, overrides: dict[str, int] | None = None) -> Plan:
    """Choose the knobs so runs/cpu.sh takes about `budget_s` on `machine`; `overrides` are kept as given.

    Pretraining gets the time the other stages leave (at least FLOORS, at most BASE_STEPS_CEILING steps). If the
    other stages at their defaults leave less than pretraining's floor, they shrink by one common factor, each down
    to its floor; the plan may then exceed the budget, and says so through its expected total.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown knob(s) {sorted(unknown)}: the knobs are {', '.join(KNOBS)}")
    if budget_s <= 0:
        raise ValueError(f"the time budget must be positive, not {budget_s} s")
    knobs = {k: overrides.get(k, DEFAULTS[k]) for k in KNOBS}
    step_s = base_step_seconds(machine, work)

    def others(k: dict[str, int]) -> float:
        s = stage_seconds({**k, "BASE_STEPS": 0}, machine, work)
        return sum(s.values())

    base_floor = overrides.get("BASE_STEPS", FLOORS["BASE_STEPS"])
    shrinkable = [k for k in KNOBS if k != "BASE_STEPS" and k not in overrides]
    shrunk = False
    if others(knobs) + base_floor * step_s > budget_s and shrinkable:
        # the largest common factor (bisection: stage time grows with every knob) that fits the floor
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            trial = {**knobs, **{k: max(FLOORS[k], round(DEFAULTS[k] * mid)) for k in shrinkable}}
            lo, hi = (mid, hi) if others(trial) + base_floor * step_s <= budget_s else (lo, mid)
        knobs.update({k: max(FLOORS[k], round(DEFAULTS[k] * lo)) for k in shrinkable})
        shrunk = True
    if "BASE_STEPS" not in overrides:
        fit = math.floor((budget_s - others(knobs)) / step_s)
        knobs["BASE_STEPS"] = min(BASE_STEPS_CEILING, max(FLOORS["BASE_STEPS"], fit))
    return Plan(budget_s=budget_s, knobs=knobs, stage_s=stage_seconds(knobs, machine, work),
                train_tokens_per_s=work.tokens_per_step / step_s,
                slowdown=REFERENCE_FP32_FLOPS / machine.fp32_flops, overridden=sorted(overrides), shrunk=shrunk)


# ---------------------------------------------------------------------------------------------------------------------
# The command line: measure, plan, print (human lines on stderr, KEY=VALUE lines on stdout for the shell to eval)

def measure_machine(dtype: str) -> Machine:
    fp32 = measure_cpu_matmul_peak(torch.float32)
    compute = fp32 if dtype == "fp32" else measure_cpu_matmul_peak(torch.bfloat16)
    return Machine(fp32_flops=fp32, compute_flops=compute, dtype=dtype)


def gpu_visible() -> bool:
    return torch.cuda.is_available()


def model_workload(depth: int, vocab_size: int, seq_len: int, device_batch: int) -> Workload:
    width, heads = model_shape(depth, head_dim=64)
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=heads, n_kv_head=heads,
                       n_embd=width)
    return Workload(tokens_per_step=device_batch * seq_len, flops_per_token=config.estimate_flops())


def parse_overrides(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in KNOBS or not value.isdigit() or int(value) <= 0:
            raise UserError(f"--set {item!r}: expected KNOB=positive integer with KNOB one of {', '.join(KNOBS)}")
        out[key] = int(value)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Size runs/cpu.sh to a time budget on this machine.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="target time of the whole pipeline after setup")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="compute dtype (default: the CPU's compute dtype, $NANOCHAT_DTYPE else fp32)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device-batch", type=int, default=16)
    p.add_argument("--set", action="append", default=[], metavar="KNOB=N", help="a value to keep (repeatable)")
    p.add_argument("--plan-file", default=None, help="reuse this plan if it exists, else write it (re-runs keep "
                                                     "their step counts)")
    p.add_argument("--report", action="store_true", help="record the plan in the report card")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        raise UserError(f"--minutes={args.minutes}: the time budget must be positive (TIME_BUDGET_MIN)")
    overrides = parse_overrides(args.set)
    dtype = args.dtype or dtype_name(get_compute_dtype("cpu"))
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"compute dtype {dtype!r}: runs/cpu.sh plans for fp32 or bf16 (NANOCHAT_DTYPE)")
    plan_file = Path(args.plan_file) if args.plan_file else None
    if plan_file is not None and plan_file.exists():
        record = json.loads(plan_file.read_text())
        record["knobs"].update(overrides)
        if not args.report:
            print(f"[budget] reusing the plan in {plan_file}: "
                  + ", ".join(f"{k}={v}" for k, v in record["knobs"].items()), file=sys.stderr, flush=True)
    else:
        machine = measure_machine(dtype)
        work = model_workload(args.depth, args.vocab_size, args.seq_len, args.device_batch)
        plan = plan_pipeline(machine, work, args.minutes * 60, overrides)
        print("\n".join(f"[budget] {line}" for line in plan.describe(machine).splitlines()), file=sys.stderr,
              flush=True)
        if gpu_visible():
            print("[budget] a CUDA GPU is visible: the stages will run on it, much faster than this CPU plan",
                  file=sys.stderr, flush=True)
        record = {"time_budget_min": args.minutes, "machine": asdict(machine), "workload": asdict(work),
                  **asdict(plan), "reference_cpu": REFERENCE_CPU}
        if plan_file is not None:
            plan_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = plan_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, plan_file)
    if args.report:
        get_report().log("Pipeline plan", report_rows(record))
    print("\n".join(f"{k}={v}" for k, v in record["knobs"].items()))


def report_rows(record: dict) -> list[dict]:
    """The plan as the report card shows it: what was measured, what was chosen, what each stage should take."""
    machine = record["machine"]
    return [{"time_budget_min": record["time_budget_min"], "compute_dtype": machine["dtype"],
             "matmul_fp32_gflops": round(machine["fp32_flops"] / 1e9, 1),
             f"matmul_{machine['dtype']}_gflops": round(machine["compute_flops"] / 1e9, 1),
             **record["knobs"], "set_by_user": ", ".join(record["overridden"]) or "none",
             "expected_total_min": round(sum(record["stage_s"].values()) / 60, 1)},
            {f"expected_{k}_s": round(v) for k, v in record["stage_s"].items()}]

if __name__ == "__main__":
    run_cli(main)
