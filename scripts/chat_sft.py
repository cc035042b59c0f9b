"""Supervised fine-tuning: teach the base model to chat, answer multiple choice, do math with a tool, and spell.

    python -m scripts.chat_sft --model-tag=d12
    torchrun --nproc_per_node=8 -m scripts.chat_sft -- --model-tag=d20

Offline (NANOCHAT_MIRROR set and no SmolTalk in it) the chat data is HH-RLHF conversations plus the mirror's
Dolly/HH-RLHF JSONL, and MMLU's auxiliary_train is replaced by ARC train + MMLU dev; the first lines say so.
"""

import argparse
import math

import torch

from nanochat.chat_eval import run_chat_eval
from nanochat.checkpoint import (CheckpointMeta, checkpoint_dir, load_stage, read_optimizer_states, resume,
                                 save_checkpoint)
from nanochat.common import UserError, compute_init, get_wandb, print0, run_cli
from nanochat.dataloader import micro_batch_loaders
from nanochat.flops import device_peak_flops
from nanochat.report import get_report
from nanochat.scaling import finetune_rates, sft_schedule
from nanochat.sft_data import SFTLoader, sft_mixture, sft_validation, smoltalk_offline
from nanochat.tokenizer import get_tokenizer
from nanochat.training import Progress, Timer, restore_training_state, train_step, training_state


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Supervised fine-tuning of a base model on a chat task mixture.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-tag", default=None, help="base model to start from (default: the largest)")
    p.add_argument("--step", type=int, default=None, help="base checkpoint step (default: the last)")
    p.add_argument("--num-iterations", type=int, default=None, help="default: stop after one epoch (counted)")
    p.add_argument("--num-epochs", type=int, default=1, help="passes over the mixture when --num-iterations is unset")
    p.add_argument("--device-batch-size", type=int, default=None, help="default: the base run's")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the base run's")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per step (default: the base run's)")
    p.add_argument("--embedding-lr", type=float, default=None, help="default: the base run's flag, else 0.3")
    p.add_argument("--unembedding-lr", type=float, default=None, help="default: the base run's flag, else 0.008")
    p.add_argument("--matrix-lr", type=float, default=None, help="default: the base run's flag, else 0.02")
    p.add_argument("--scalar-lr", type=float, default=None, help="default: the base run's flag, else 0.5")
    p.add_argument("--init-lr-frac", type=float, default=0.8, help="every learning rate × this")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="share of the epoch spent warming up")
    p.add_argument("--warmdown-ratio", type=float, default=0.5, help="share of the epoch decaying the LR")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="LR multiplier at the end of the warmdown")
    p.add_argument("--mmlu-epochs", type=int, default=3, help="copies of the MMLU data in the mixture")
    p.add_argument("--gsm8k-epochs", type=int, default=4, help="copies of GSM8K train in the mixture")
    p.add_argument("--custom-json", action="append", default=[], help="extra JSONL conversations (repeatable)")
    p.add_argument("--spelling-size", type=int, default=80_000)
    p.add_argument("--simple-spelling-size", type=int, default=200_000)
    p.add_argument("--eval-every", type=int, default=200, help="val loss every N steps (-1 = only at the end)")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-metrics-every", type=int, default=-1, help="chat evals every N steps (-1 = never)")
    p.add_argument("--eval-metrics-max-problems", type=int, default=100)
    p.add_argument("--save-every", type=int, default=-1)
    p.add_argument("--resume-from-step", default=None, help="a step or 'latest' of this SFT run")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0 = all)")
    p.add_argument("--device-type", default="")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: on CUDA)")
    p.add_argument("--run", default="", help="wandb run name (default: off)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    compute = compute_init(args.device_type)
    dist_info, device = compute.dist, compute.device

    # --- the base model and its recipe ---------------------------------------------------------------------------
    if args.dry_run:
        chat = "HH-RLHF + Dolly JSONL (offline)" if smoltalk_offline() else "SmolTalk"
        print0(f"chat_sft dry run: mixture of {chat}, MMLU ×{args.mmlu_epochs}, GSM8K ×{args.gsm8k_epochs}, "
               f"SpellingBee ({args.spelling_size:,}), SimpleSpelling ({args.simple_spelling_size:,}), "
               f"{len(args.custom_json)} custom JSONL; not training")
        return
    mixture, notes = sft_mixture(args.custom_json, args.spelling_size, args.simple_spelling_size, args.mmlu_epochs,
                                 args.gsm8k_epochs)
    for note in notes:
        print0(note)
    base = load_stage("base", args.model_tag, args.step, device)
    model, base_meta, base_step = base.model, base.meta, base.step
    model_tag, hp = base_meta.model_tag, base_meta.hyperparams
    tokenizer = get_tokenizer()
    T = args.max_seq_len or hp.sequence_len
    B = args.device_batch_size or hp.device_batch_size
    world = dist_info.world_size
    total = args.total_batch_size or hp.total_batch_size
    if total % (B * T * world):
        raise UserError(f"--total-batch-size={total} is not a multiple of {B}×{T}×{world}: change it or "
                        "--device-batch-size")
    accum = total // (B * T * world)
    frac = args.init_lr_frac
    lrs = finetune_rates(base_meta.args, vars(args), frac)
    optimizer = model.setup_optimizer(**lrs, weight_decay=0.0, smear_lr=0.2 * frac)
    base_states = read_optimizer_states(base.ckpt_dir, base_step, device, dist_info.rank, world)
    if base_states is not None:
        optimizer.warm_start(base_states)
    # Compiled like base_train: every micro-batch is (B, T), conversations packed and padded to the row, so one
    # graph serves the whole run (with dynamic=False a new shape would mean a recompile).
    use_compile = args.compile == "on" or (args.compile == "auto" and compute.device_type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    epochs = None if args.num_iterations else args.num_epochs
    loaders = micro_batch_loaders(lambda **shard: SFTLoader(mixture, tokenizer, B, T, device, epochs=epochs, **shard),
                                  dist_info.rank, world, accum)
    # the step count of an epoch is only known at its end; until then the progress line shows an estimate
    num_iterations = args.num_iterations or math.ceil(len(mixture) * args.num_epochs / (B * world * accum * 2))
    print0(f"chat_sft {model_tag}: from base step {base_step}; {len(mixture):,} conversations; "
           + (f"{num_iterations} steps" if args.num_iterations else f"{args.num_epochs} epoch(s), counted")
           + f" of {B}×{T}×{world}×{accum} tokens; LRs {', '.join(f'{k} {v:.4g}' for k, v in lrs.items())} "
           f"(× {frac}), weight decay 0")

    ckpt_dir = checkpoint_dir("sft", model_tag)
    progress = Progress(num_iterations, total, model.estimate_flops(),
                        device_peak_flops(compute.device_type, compute.dtype) * world)
    curves = {"train_loss": [], "val_loss": []}
    start = 0
    resumed = resume(ckpt_dir, args.resume_from_step, model, device, dist_info.rank, world,
                     lambda states: restore_training_state(states, optimizer, loaders, progress, dist_info.rank))
    if resumed is not None:
        curves, start = resumed.curves, resumed.step
        print0(f"resumed SFT from step {start}")
    progress.start_step = start
    streams = [iter(loader) for loader in loaders]
    wandb = get_wandb(args.run, "nanochat-sft", vars(args), dist_info.is_master)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        val = SFTLoader(sft_validation(), tokenizer, B, T, device, rank=dist_info.rank, world_size=world)
        # float64 sums, except on MPS, which has no float64 (float32 holds these sums to ~1e-7 relative)
        acc_dtype = torch.float32 if device.type == "mps" else torch.float64
        total_loss = torch.zeros(2, dtype=acc_dtype, device=device)
        it = iter(val)
        for _ in range(args.eval_steps):
            x, y = next(it)
            with compute.autocast():
                loss = model(x, y, loss_reduction="sum")
            total_loss[0] += loss.to(acc_dtype)
            total_loss[1] += (y >= 0).sum().to(acc_dtype)
        if dist_info.is_ddp:
            torch.distributed.all_reduce(total_loss)
        model.train()
        return (total_loss[0] / total_loss[1].clamp(min=1)).item()

    def save(step: int) -> None:
        rank_state = training_state(optimizer, loaders, progress)
        meta = CheckpointMeta(phase="sft", model_tag=model_tag, model_config=model.config, hyperparams=hp,
                              parent_phase="base", parent_step=base_step, curves=curves, args=vars(args))
        save_checkpoint(ckpt_dir, step, model, meta, rank_state, dist_info.rank, world, args.keep_last)
        print0(f"saved checkpoint {ckpt_dir} step {step}")

    def epoch_progress() -> float:
        """Epochs done by the furthest loader of any process: the epoch ends when one of them has packed its whole
        share (the others are within a row or two of theirs), as the reference counts it."""
        furthest = max(loader.progress for loader in loaders)
        if dist_info.is_ddp:
            t = torch.tensor([furthest], dtype=torch.float32, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            furthest = t.item()
        return furthest

    # --- the loop ------------------------------------------------------------------------------------------------
    model.train()
    last_val = None
    first_val = val_loss() if start == 0 else None
    if first_val is not None:
        print0(f"val loss before SFT: {first_val:.4f}")
    done = epoch_progress()
    step = start
    while (step < num_iterations) if args.num_iterations else (done < args.num_epochs):
        schedule = sft_schedule(step / num_iterations if args.num_iterations else done / args.num_epochs, step,
                                args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        optimizer.apply_schedule(**schedule)
        lrm = schedule["lr"]
        with Timer(compute.device_type) as timer:
            loss_value = train_step(train_model, optimizer, streams, compute.autocast)
        if not math.isfinite(loss_value):
            raise RuntimeError(f"SFT loss became {loss_value} at step {step + 1}: lower --init-lr-frac")
        curves["train_loss"].append([step + 1, (step + 1) * total * progress.flops_per_token, loss_value])
        done = epoch_progress()
        if args.num_iterations:
            last = step + 1 == num_iterations
        else:
            last = done >= args.num_epochs
            progress.total = step + 1 if last else max(step + 2, round((step + 1) * args.num_epochs / max(done, 1e-9)))
        extra = ""
        if (args.eval_every > 0 and (step + 1) % args.eval_every == 0) or last:
            last_val = val_loss()
            curves["val_loss"].append([step + 1, (step + 1) * total * progress.flops_per_token, last_val])
            extra = f" | val loss {last_val:.4f}"
        print0(progress.line(step, loss_value, lrm, timer.dt, extra))
        wandb.log({"step": step + 1, "loss": loss_value, "lrm": lrm, "val_loss": last_val})
        if args.eval_metrics_every > 0 and (step + 1) % args.eval_metrics_every == 0:
            model.eval()
            for name in ("ARC-Easy", "MMLU"):
                acc = run_chat_eval(name, model, tokenizer, max_problems=args.eval_metrics_max_problems,
                                    autocast=compute.autocast)
                print0(f"  {name} accuracy {acc:.4f}")
            model.train()
        if last or (args.save_every > 0 and (step + 1) % args.save_every == 0):
            save(step + 1)
        step += 1

    trained = torch.tensor([sum(loader.consumed for loader in loaders)], device=device)
    if dist_info.is_ddp:
        torch.distributed.all_reduce(trained)
    print0(f"SFT done after {step} steps ({'--num-iterations' if args.num_iterations else f'{args.num_epochs} epoch(s)'}"
           f"): {int(trained.item()):,} conversations packed of {len(mixture):,} in the mixture")
    if dist_info.is_master:
        get_report().log("Chat SFT", [{"model_tag": model_tag, "base_step": base_step, "steps": step,
                                       "conversations": len(mixture), "conversations_trained": int(trained.item()),
                                       "val_loss_before": first_val,
                                       "val_loss": last_val, "final_train_loss": curves["train_loss"][-1][2],
                                       "training_time_s": round(progress.train_time, 1)},
                                      {"data": "; ".join(notes) or "online mixture"}], curves=curves)
    wandb.finish()


if __name__ == "__main__":
    run_cli(main)
