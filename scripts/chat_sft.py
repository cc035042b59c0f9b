"""Supervised fine-tuning: teach the base model to chat, answer multiple choice, do math with a tool, and spell.

    python -m scripts.chat_sft --model-tag=d12
    torchrun --nproc_per_node=8 -m scripts.chat_sft -- --model-tag=d20

Offline (NANOCHAT_MIRROR set and no SmolTalk in it) the chat data is HH-RLHF conversations plus the mirror's
Dolly/HH-RLHF JSONL, and MMLU's auxiliary_train is replaced by ARC train + MMLU dev; the first lines say so.
"""

import argparse
import math
import os

import torch

from nanochat.checkpoint import (build_model, checkpoint_dir, find_model_tag, last_step, load_checkpoint,
                                 save_checkpoint)
from nanochat.common import UserError, compute_init, get_wandb, print0, run_cli
from nanochat.flops import device_peak_flops
from nanochat.sft_data import SFTLoader
from nanochat.tokenizer import get_tokenizer
from nanochat.training import Progress, Timer, restore_training_state, train_step, training_state


def sft_lr_multiplier(step: int, num_iterations: int) -> float:
    """Flat for the first half, then linear to 0 at the last step; never increases."""
    progress = min(max(step / max(num_iterations, 1), 0.0), 1.0)
    return 1.0 if progress < 0.5 else max(0.0, 1.0 - (progress - 0.5) / 0.5)


def offline_mode() -> bool:
    mirror = os.environ.get("NANOCHAT_MIRROR", "")
    if not mirror:
        return False
    if mirror.startswith("http"):
        return True
    return not os.path.isdir(os.path.join(mirror, "hf/datasets/HuggingFaceTB/smol-smoltalk"))


def build_mixture(custom_json: list[str], spelling_size: int, simple_spelling_size: int):
    """The SFT task mixture and the list of stand-ins used (announced by the caller)."""
    from tasks.arc import ARC
    from tasks.chat import HHRLHF, CustomJSON, SmolTalk
    from tasks.common import TaskMixture
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.spelling import SimpleSpelling, SpellingBee
    notes = []
    if offline_mode():
        mirror = os.environ["NANOCHAT_MIRROR"]
        dolly = os.path.join(mirror, "files/chat/dolly-hhrlhf-1k.jsonl")
        chat = [HHRLHF("harmless-base", "test")] + ([CustomJSON(dolly)] if os.path.exists(dolly) else [])
        mmlu = [ARC("ARC-Easy", "train"), ARC("ARC-Challenge", "train"), MMLU("all", "dev")]
        notes.append("offline: SmolTalk → HH-RLHF conversations" + (" + Dolly/HH-RLHF JSONL" if len(chat) > 1 else ""))
        notes.append("offline: MMLU auxiliary_train → ARC-Easy/Challenge train + MMLU dev")
    else:
        chat = [SmolTalk("train")]
        mmlu = [MMLU("auxiliary_train")]
    gsm8k = GSM8K("main", "train")
    tasks = chat + mmlu * 3 + [gsm8k] * 4 + [SpellingBee(spelling_size, "train"),
                                              SimpleSpelling(simple_spelling_size, "train")]
    tasks += [CustomJSON(path) for path in custom_json]
    return TaskMixture(tasks), notes


def build_validation():
    from tasks.common import TaskMixture
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    return TaskMixture([GSM8K("main", "test", stop=200), MMLU("all", "validation", stop=200)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Supervised fine-tuning of a base model on a chat task mixture.")
    p.add_argument("--model-tag", default=None, help="base model to start from (default: the largest)")
    p.add_argument("--step", type=int, default=None, help="base checkpoint step (default: the last)")
    p.add_argument("--num-iterations", type=int, default=None, help="default: one epoch of the mixture")
    p.add_argument("--num-epochs", type=float, default=1.0)
    p.add_argument("--device-batch-size", type=int, default=None, help="default: the base run's")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the base model's context")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per step (default: one micro-batch "
                   "per process)")
    p.add_argument("--init-lr-frac", type=float, default=0.8, help="learning rates = base run's × this")
    p.add_argument("--custom-json", action="append", default=[], help="extra JSONL conversations (repeatable)")
    p.add_argument("--spelling-size", type=int, default=80_000)
    p.add_argument("--simple-spelling-size", type=int, default=200_000)
    p.add_argument("--eval-every", type=int, default=200, help="val loss every N steps (-1 = only at the end)")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-metrics-every", type=int, default=-1, help="chat evals every N steps (-1 = never)")
    p.add_argument("--eval-metrics-max-problems", type=int, default=100)
    p.add_argument("--save-every", type=int, default=-1)
    p.add_argument("--resume-from-step", default=None, help="a step or 'latest' of this SFT run")
    p.add_argument("--device-type", default="")
    p.add_argument("--run", default="", help="wandb run name (default: off)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    compute = compute_init(args.device_type)
    dist_info, device = compute.dist, compute.device

    # --- the base model and its recipe ---------------------------------------------------------------------------
    if args.dry_run:
        chat = "HH-RLHF + Dolly JSONL (offline)" if offline_mode() else "SmolTalk"
        print0(f"chat_sft dry run: mixture of {chat}, MMLU ×3, GSM8K ×4, SpellingBee ({args.spelling_size:,}), "
               f"SimpleSpelling ({args.simple_spelling_size:,}), {len(args.custom_json)} custom JSONL; not training")
        return
    mixture, notes = build_mixture(args.custom_json, args.spelling_size, args.simple_spelling_size)
    for note in notes:
        print0(note)
    model_tag = args.model_tag or find_model_tag("base")
    base_dir = checkpoint_dir("base", model_tag)
    base_step = args.step if args.step is not None else last_step(base_dir)
    if base_step is None:
        raise UserError(f"no base checkpoint in {base_dir}: run `python -m scripts.base_train` first")
    base = load_checkpoint(base_dir, base_step, device, rank=0)
    hp = base["meta"]["hyperparams"]
    model = build_model(base["meta"]["model_config"], device, base["model"])
    tokenizer = get_tokenizer()
    T = args.max_seq_len or model.config.sequence_len
    B = args.device_batch_size or hp["device_batch_size"]
    world = dist_info.world_size
    total = args.total_batch_size or B * T * world
    if total % (B * T * world):
        raise UserError(f"--total-batch-size={total} is not a multiple of {B}×{T}×{world}: change it or "
                        "--device-batch-size")
    accum = total // (B * T * world)
    frac = args.init_lr_frac
    optimizer = model.setup_optimizer(embedding_lr=hp["embedding_lr"] * frac, unembedding_lr=hp["unembedding_lr"] * frac,
                                      matrix_lr=hp["matrix_lr"] * frac, scalar_lr=hp["scalar_lr"] * frac,
                                      weight_decay=0.0)
    if base["rank_state"] is not None:  # warm-start the optimizer's moments from the base run
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(base["rank_state"]["optimizer"])
        for group, settings in zip(optimizer.param_groups, fresh):
            group.update(settings)
    loaders = [SFTLoader(mixture, tokenizer, B, T, device, rank=dist_info.rank * accum + i, world_size=world * accum)
               for i in range(accum)]
    epoch_steps = math.ceil(len(mixture) * args.num_epochs / max(1, B * world * accum * 2))  # ~2 convs a row
    num_iterations = args.num_iterations or max(1, epoch_steps)
    print0(f"chat_sft {model_tag}: from base step {base_step}; {len(mixture):,} conversations; {num_iterations} steps "
           f"of {B}×{T}×{world}×{accum} tokens; LRs × {frac} of the base run, weight decay 0")

    ckpt_dir = checkpoint_dir("sft", model_tag)
    progress = Progress(num_iterations, total, model.estimate_flops(),
                        device_peak_flops(compute.device_type, compute.dtype) * world)
    curves = {"train_loss": [], "val_loss": []}
    start = 0
    if args.resume_from_step is not None:
        step = last_step(ckpt_dir) if args.resume_from_step == "latest" else int(args.resume_from_step)
        if step is not None:
            ckpt = load_checkpoint(ckpt_dir, step, device, rank=dist_info.rank)
            model.load_state_dict(ckpt["model"])
            restore_training_state(ckpt["rank_state"], optimizer, loaders, progress)
            curves, start = ckpt["meta"]["curves"], step
            print0(f"resumed SFT from step {step}")
    progress.start_step = start
    streams = [iter(loader) for loader in loaders]
    wandb = get_wandb(args.run, "nanochat-sft", vars(args), dist_info.is_master)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        val = SFTLoader(build_validation(), tokenizer, B, T, device, rank=dist_info.rank, world_size=world)
        total_loss = torch.zeros(2, dtype=torch.float64, device=device)
        it = iter(val)
        for _ in range(args.eval_steps):
            x, y = next(it)
            with compute.autocast():
                loss = model(x, y, loss_reduction="sum")
            total_loss += torch.tensor([loss.item(), (y >= 0).sum().item()], dtype=torch.float64, device=device)
        if dist_info.is_ddp:
            torch.distributed.all_reduce(total_loss)
        model.train()
        return (total_loss[0] / total_loss[1].clamp(min=1)).item()

    def save(step: int) -> None:
        rank_state = training_state(optimizer, loaders, progress)
        meta = {"model_config": base["meta"]["model_config"], "hyperparams": hp, "args": vars(args),
                "model_tag": model_tag, "base_step": base_step, "curves": curves}
        save_checkpoint(ckpt_dir, step, model, meta, rank_state, dist_info.rank, world)
        print0(f"saved checkpoint {ckpt_dir} step {step}")

    # --- the loop ------------------------------------------------------------------------------------------------
    model.train()
    last_val = None
    first_val = val_loss() if start == 0 else None
    if first_val is not None:
        print0(f"val loss before SFT: {first_val:.4f}")
    for step in range(start, num_iterations):
        lrm = sft_lr_multiplier(step, num_iterations)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        with Timer(compute.device_type) as timer:
            loss_value = train_step(model, optimizer, streams, compute.autocast)
        if not math.isfinite(loss_value):
            raise RuntimeError(f"SFT loss became {loss_value} at step {step + 1}: lower --init-lr-frac")
        curves["train_loss"].append([step + 1, (step + 1) * total * progress.flops_per_token, loss_value])
        last = step + 1 == num_iterations
        extra = ""
        if (args.eval_every > 0 and (step + 1) % args.eval_every == 0) or last:
            last_val = val_loss()
            curves["val_loss"].append([step + 1, (step + 1) * total * progress.flops_per_token, last_val])
            extra = f" | val loss {last_val:.4f}"
        print0(progress.line(step, loss_value, lrm, timer.dt, extra))
        wandb.log({"step": step + 1, "loss": loss_value, "lrm": lrm, "val_loss": last_val})
        if args.eval_metrics_every > 0 and (step + 1) % args.eval_metrics_every == 0:
            from nanochat.chat_eval import run_chat_eval
            model.eval()
            for name in ("ARC-Easy", "MMLU"):
                acc = run_chat_eval(name, model, tokenizer, max_problems=args.eval_metrics_max_problems,
                                    autocast=compute.autocast)
                print0(f"  {name} accuracy {acc:.4f}")
            model.train()
        if last or (args.save_every > 0 and (step + 1) % args.save_every == 0):
            save(step + 1)

    if dist_info.is_master:
        from nanochat.report import get_report
        get_report().log("Chat SFT", [{"model_tag": model_tag, "base_step": base_step, "steps": num_iterations,
                                       "conversations": len(mixture), "val_loss_before": first_val,
                                       "val_loss": last_val, "final_train_loss": curves["train_loss"][-1][2],
                                       "training_time_s": round(progress.train_time, 1)},
                                      {"data": "; ".join(notes) or "online mixture"}], curves=curves)
    wandb.finish()


if __name__ == "__main__":
    run_cli(main)
