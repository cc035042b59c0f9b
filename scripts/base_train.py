"""Pretrain the base model. One dial, --depth, derives everything else (see nanochat/scaling.py).

    python -m scripts.base_train --depth=12
    torchrun --nproc_per_node=8 -m scripts.base_train -- --depth=20
"""

import argparse
import dataclasses
import math

import torch

from nanochat.attention import default_window_pattern
from nanochat.checkpoint import CheckpointMeta, build_model, checkpoint_dir, resume, save_checkpoint
from nanochat.common import UserError, compute_init, get_wandb, print0, run_cli
from nanochat.core_eval import evaluate_core
from nanochat.dataloader import PackedLoader, micro_batch_loaders
from nanochat.dataset import default_dataset, list_shards
from nanochat.flops import device_peak_flops
from nanochat.fp8 import enable_fp8_training, fp8_disabled, fp8_unavailable_reason
from nanochat.loss_eval import evaluate_bpb
from nanochat.memory import estimate_memory, free_gpu_bytes, pick_device_batch_size
from nanochat.report import get_report
from nanochat.scaling import Overrides, derive_hparams, pretraining_schedule
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import (Prefetching, Progress, Timer, print_samples, restore_training_state, train_step,
                               training_state)


def device_batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number of sequences nor auto") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain a base GPT; every size and rate follows from --depth.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="number of transformer layers: the one dial")
    p.add_argument("--aspect-ratio", type=int, default=64, help="n_embd = depth × aspect ratio (rounded)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: = query heads)")
    p.add_argument("--max-seq-len", dest="sequence_len", type=int, default=2048, help="context length in tokens")
    p.add_argument("--window-pattern", default=None,
                   help="per-layer attention windows, e.g. SSSL (S = 1/4 context; default: SSSL on CUDA, else L)")
    p.add_argument("--smear", action=argparse.BooleanOptionalAction, default=Overrides.smear,
                   help="mix a gated share of the previous token's embedding into each position")
    p.add_argument("--backout", action=argparse.BooleanOptionalAction, default=Overrides.backout,
                   help="subtract a learned share of the middle layer's residual stream before the final norm")
    p.add_argument("--muon-eq", action=argparse.BooleanOptionalAction, default=True,
                   help="equalise Muon's update rows before orthogonalising (MuonEq, as the reference)")
    p.add_argument("--num-iterations", type=int, default=None, help="override the derived number of steps")
    p.add_argument("--target-flops", type=float, default=None, help="derive steps from a compute budget")
    p.add_argument("--target-param-data-ratio", type=float, default=12.0, help="training tokens per parameter")
    p.add_argument("--device-batch-size", type=device_batch_size, default=32,
                   help="sequences per forward pass per process, or auto: the largest power of two that divides the "
                        "total batch and fits the GPU's free memory (nanochat/memory.py)")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step (all processes)")
    p.add_argument("--embedding-lr", type=float, default=None)
    p.add_argument("--unembedding-lr", type=float, default=None)
    p.add_argument("--matrix-lr", type=float, default=None)
    p.add_argument("--scalar-lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None, help="Muon weight decay (cosine-decayed to 0)")
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the global grad norm (0 = off)")
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = only at the end)")
    p.add_argument("--eval-tokens", type=int, default=80 * 2 ** 19,
                   help="tokens per val bpb evaluation (the reference's 80 x 2^19; fewer only for quick runs)")
    p.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps (-1 = never)")
    p.add_argument("--core-metric-every", type=int, default=-1, help="CORE every N steps (-1 = never)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500)
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (always at the end)")
    p.add_argument("--resume-from-step", default=None, help="a step number or 'latest' (fresh start if none)")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0 = all)")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default d<depth>)")
    p.add_argument("--dataset", default=None,
                   help="fineweb-edu, climbmix or a Hub repo (default $NANOCHAT_DATASET or fineweb-edu)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: on CUDA)")
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls via torchao, LM head included (H100+; default off)")
    p.add_argument("--run", default="", help="wandb run name (default: no wandb)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dry-run", action="store_true", help="derive and print the plan, check inputs, then exit")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    compute = compute_init(args.device_type)
    dist_info, device = compute.dist, compute.device
    torch.manual_seed(args.seed)

    # --- inputs -------------------------------------------------------------------------------------------------------
    dataset = default_dataset(args.dataset)
    try:
        tokenizer = get_tokenizer()
        token_bytes = get_token_bytes(device)
        list_shards("train", dataset), list_shards("val", dataset)
        vocab_size = tokenizer.get_vocab_size()
    except UserError as e:
        if not args.dry_run:
            raise
        print0(f"warning (dry run): {e}")
        tokenizer, vocab_size = None, 32768

    # --- the one dial ---------------------------------------------------------------------------------------------
    if args.window_pattern is None:
        compiled = args.compile == "on" or (args.compile == "auto" and compute.device_type == "cuda")
        args.window_pattern, why = default_window_pattern(compute.device_type, compiled)
        print0(f"window pattern {args.window_pattern} (default): {why}")
    overrides = Overrides.from_namespace(args)
    if args.device_batch_size == "auto":
        plan = derive_hparams(args.depth, dataclasses.replace(overrides, device_batch_size=1), vocab_size=vocab_size,
                              world_size=dist_info.world_size)
        batch, reason = pick_device_batch_size(plan.model_config(), plan.total_batch_size, dist_info.world_size,
                                               compute.device_type, compute.dtype, free_gpu_bytes(device))
        print0(reason)
        overrides = dataclasses.replace(overrides, device_batch_size=batch)
    hp = derive_hparams(args.depth, overrides, vocab_size=vocab_size, world_size=dist_info.world_size)
    config = hp.model_config()
    model_tag = args.model_tag or f"d{args.depth}"
    print0(f"base_train {model_tag} on {dataset}: {dist_info.world_size} process(es) on {compute.device_type}, "
           f"compute dtype {str(compute.dtype).removeprefix('torch.')}")
    print0(hp.describe())
    if args.fp8:
        if (reason := fp8_unavailable_reason()) is not None:
            raise UserError(reason)
    if args.dry_run:
        print0(estimate_memory(config, hp.device_batch_size, dist_info.world_size, compute.device_type,
                               compute.dtype).table())
        print0("dry run: arguments and derived hyper-parameters are valid; not training")
        return

    # --- model, optimizer, data ---------------------------------------------------------------------------------------
    model = build_model(config, device)
    if args.fp8:
        print0(f"fp8: {enable_fp8_training(model)} linear layers (the blocks' matrices and the LM head) train with fp8 "
               "matmuls (torchao); evaluation runs without")
    n = model.num_params()
    flops_per_token = model.estimate_flops()
    print0(f"parameters: {n['total']:,} ({', '.join(f'{k} {v:,}' for k, v in n.items() if k != 'total')}); "
           f"{flops_per_token:.3g} FLOPs/token; {hp.num_iterations * hp.total_batch_size:,} training tokens")
    optimizer = model.setup_optimizer(embedding_lr=hp.embedding_lr, unembedding_lr=hp.unembedding_lr,
                                      matrix_lr=hp.matrix_lr, scalar_lr=hp.scalar_lr, weight_decay=hp.weight_decay,
                                      equalize_rows=args.muon_eq)
    use_compile = args.compile == "on" or (args.compile == "auto" and compute.device_type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    world = dist_info.world_size
    loaders = micro_batch_loaders(lambda **shard: PackedLoader(tokenizer, hp.device_batch_size, hp.sequence_len,
                                                               "train", device, dataset, seed=args.seed, **shard),
                                  dist_info.rank, world, hp.grad_accum_steps)
    ckpt_dir = checkpoint_dir("base", model_tag)
    progress = Progress(hp.num_iterations, hp.total_batch_size, flops_per_token,
                        device_peak_flops(compute.device_type, compute.dtype) * world)
    curves = {"train_loss": [], "val_bpb": []}
    start_step = 0

    resumed = resume(ckpt_dir, args.resume_from_step, model, device, dist_info.rank, world,
                     lambda states: restore_training_state(states, optimizer, loaders, progress, dist_info.rank))
    if resumed is not None:
        curves, start_step = resumed.curves, resumed.step
        print0(f"resumed from {ckpt_dir} step {start_step}")
    progress.start_step = start_step
    streams = [Prefetching(loader) for loader in loaders]  # checkpoints take their states (see Prefetching)
    wandb = get_wandb(args.run, "nanochat", hp.to_dict(), dist_info.is_master)

    val_steps = max(1, args.eval_tokens // (hp.device_batch_size * hp.sequence_len * world))
    val_tokens = val_steps * hp.device_batch_size * hp.sequence_len * world

    def val_bpb() -> float:
        model.eval()
        val = PackedLoader(tokenizer, hp.device_batch_size, hp.sequence_len, "val", device, dataset,
                           rank=dist_info.rank, world_size=world)
        with fp8_disabled(model):  # evaluation in the compute dtype, comparable with runs without --fp8
            bpb = evaluate_bpb(model, iter(val), val_steps, token_bytes, autocast=compute.autocast)
        model.train()
        return bpb

    def save(step: int) -> None:
        rank_state = training_state(optimizer, streams, progress)
        meta = CheckpointMeta(phase="base", model_tag=model_tag, model_config=config, hyperparams=hp, curves=curves,
                              args=vars(args), provenance={"dataset": dataset,
                                                           "crop_fraction": loaders[0].stats["crop_fraction"]})
        path = save_checkpoint(ckpt_dir, step, model, meta, rank_state, dist_info.rank, world, args.keep_last)
        print0(f"saved checkpoint {path}")

    # --- the loop --------------------------------------------------------------------------------------------------------
    last_bpb = None
    for step in range(start_step, hp.num_iterations):
        schedule = pretraining_schedule(hp, step)
        optimizer.apply_schedule(**schedule)
        lrm = schedule["lr"]
        with Timer(compute.device_type) as timer:
            loss_value = train_step(train_model, optimizer, streams, compute.autocast, args.grad_clip)
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss became {loss_value} at step {step + 1}: lower the learning rates")
        curves["train_loss"].append([step + 1, (step + 1) * hp.total_batch_size * flops_per_token, loss_value])
        last = step + 1 == hp.num_iterations
        extra = ""
        if (args.eval_every > 0 and (step + 1) % args.eval_every == 0) or last:
            last_bpb = val_bpb()
            curves["val_bpb"].append([step + 1, (step + 1) * hp.total_batch_size * flops_per_token, last_bpb])
            extra = f" | val bpb {last_bpb:.4f}"
        print0(progress.line(step, loss_value, lrm, timer.dt, extra))
        wandb.log({"step": step + 1, "loss": loss_value, "lrm": lrm, "val_bpb": last_bpb})
        if args.sample_every > 0 and (step + 1) % args.sample_every == 0 and dist_info.is_master:
            model.eval()
            with fp8_disabled(model):
                print_samples(model, tokenizer)
            model.train()
        if args.core_metric_every > 0 and (step + 1) % args.core_metric_every == 0:
            model.eval()
            with fp8_disabled(model):
                core = evaluate_core(model, tokenizer, device, max_per_task=args.core_metric_max_per_task,
                                     autocast=compute.autocast)
            model.train()
            print0(f"  {core['label']}: {core['core']:.4f}")
        if last or (args.save_every > 0 and (step + 1) % args.save_every == 0):
            save(step + 1)

    # --- report ----------------------------------------------------------------------------------------------------------
    if dist_info.is_master:
        samples = []
        if tokenizer is not None:
            model.eval()
            with fp8_disabled(model):
                samples = print_samples(model, tokenizer)
        summary = {"model_tag": model_tag, "dataset": dataset, "parameters": n["total"],
                   "scaling_params": hp.scaling_params, "flops_per_token": flops_per_token,
                   "steps": hp.num_iterations, "tokens": hp.num_iterations * hp.total_batch_size,
                   "final_train_loss": curves["train_loss"][-1][2] if curves["train_loss"] else None,
                   "val_bpb": last_bpb, "val_bpb_tokens": val_tokens,
                   "training_time_s": round(progress.train_time, 1),
                   "compute_dtype": str(compute.dtype).removeprefix("torch."), "processes": world,
                   "crop_fraction": round(loaders[0].stats["crop_fraction"], 4)}
        get_report().log("Base model training", [summary, hp.to_dict(), {"samples": samples}], curves=curves)
    wandb.finish()


if __name__ == "__main__":
    run_cli(main)
