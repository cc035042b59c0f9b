"""Evaluate a base checkpoint: CORE over the available tasks, train/val bits per byte, greedy samples.

    python -m scripts.base_eval --model-tag=d12 --max-per-task=500
"""

import argparse

from nanochat.checkpoint import load_model
from nanochat.common import UserError, compute_init, print0, run_cli
from nanochat.core_eval import core_table, evaluate_core
from nanochat.dataloader import PackedLoader
from nanochat.dataset import default_dataset
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from nanochat.training import print_samples


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="CORE, bits per byte and samples of a base model checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-tag", default=None, help="default: the largest base model")
    p.add_argument("--step", type=int, default=None, help="default: the last step")
    p.add_argument("--eval", default="core,bpb,sample", help="comma-separated: core, bpb, sample")
    p.add_argument("--max-per-task", type=int, default=-1, help="items per CORE task (-1 = all)")
    p.add_argument("--bpb-tokens", type=int, default=40 * 2 ** 19,
                   help="tokens per split for bits per byte (the reference's 40 x 2^19; fewer only for quick runs)")
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--device-type", default="")
    p.add_argument("--dry-run", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    wanted = set(args.eval.split(","))
    if wanted - {"core", "bpb", "sample"}:
        raise UserError(f"--eval takes core, bpb and sample, not {args.eval!r}")
    compute = compute_init(args.device_type)
    if args.dry_run:
        print0(f"base_eval dry run: would evaluate {sorted(wanted)} of base model {args.model_tag or '(largest)'}")
        return
    model, tokenizer, meta = load_model("base", compute.device, args.model_tag, args.step)
    tag, step = meta.model_tag, meta.step
    print0(f"base_eval: {tag} step {step}")
    results = {"model_tag": tag, "step": step, "dataset": meta.provenance.get("dataset") or default_dataset()}
    if "bpb" in wanted:
        token_bytes = get_token_bytes(compute.device)
        T, B, world = model.config.sequence_len, args.device_batch_size, compute.dist.world_size
        steps = max(1, args.bpb_tokens // (B * T * world))
        for split in ("train", "val"):
            dataset = results["dataset"]
            loader = PackedLoader(tokenizer, B, T, split, compute.device, dataset, rank=compute.dist.rank,
                                  world_size=world, seed=1234)
            bpb = evaluate_bpb(model, iter(loader), steps, token_bytes, autocast=compute.autocast)
            results[f"{split}_bpb"], results[f"{split}_bpb_tokens"] = bpb, steps * B * T * world
            print0(f"{split} bpb: {bpb:.4f} over {steps * B * T * world:,} tokens of {dataset}")
    if "core" in wanted:
        core = evaluate_core(model, tokenizer, compute.device, args.max_per_task, compute.autocast)
        print0(f"{core['label']}: {core['core']:.4f}")
        results[core["label"]] = core["core"]
        results["chance"] = {"CORE": 0.0}  # centered: 0 is chance, 1 is perfect
        results.update({f"{k} (centered)": v["centered"] for k, v in core["tasks"].items()})
        if core["missing"]:
            results["CORE missing tasks"] = ", ".join(core["missing"])
    tables = [core_table(core["tasks"])] if "core" in wanted else []
    samples = []
    if "sample" in wanted and compute.dist.is_master:
        samples = print_samples(model, tokenizer)
    if compute.dist.is_master:
        get_report().log("Base model evaluation", [results, {"max_per_task": args.max_per_task}, *tables,
                                                   {"samples": samples}])


if __name__ == "__main__":
    run_cli(main)
