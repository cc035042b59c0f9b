"""Reinforcement learning on GSM8K with simplified GRPO: sample, reward correct answers, push up what worked.

    python -m scripts.chat_rl --model-tag=d12
    torchrun --nproc_per_node=8 -m scripts.chat_rl -- --model-tag=d20

Each step: for every question, prefill once and sample --num-samples completions through the Engine with the
python tool on; reward 1 for the right final answer (GSM8K's own evaluate), advantage = reward − group mean; the loss
is −advantage · log p over the sampled tokens only (prompt, tool outputs and the stop token masked), divided by the
question's own number of sampled tokens, then averaged over questions. Learning rates: 0.2 / 0.004 / 0.02
(embedding / unembedding / matrix, not batch-scaled) × 0.05, decaying linearly to 0.
"""

import argparse
import time

import torch

from nanochat.checkpoint import CheckpointMeta, checkpoint_dir, load_stage, resume, save_checkpoint
from nanochat.common import UserError, compute_init, get_wandb, print0, run_cli
from nanochat.decode import DecodePolicy
from nanochat.engine import Engine
from nanochat.sandbox.execution import python_tool_banner
from nanochat.grpo import backward_in_passes, evaluate_pass_at_k, group_advantages, rollout, rollout_batch
from nanochat.loss_eval import accumulator_dtype
from nanochat.report import get_report
from nanochat.scaling import rl_schedule
from nanochat.tokenizer import get_tokenizer
from nanochat.training import restore_training_state, training_state
from tasks.gsm8k import GSM8K


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="GRPO-style RL of the SFT model on GSM8K.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-tag", default=None, help="SFT model to start from (default: the largest)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--num-steps", type=int, default=None, help="default: one pass over GSM8K train")
    p.add_argument("--examples-per-step", type=int, default=16, help="questions per step (over all processes)")
    p.add_argument("--num-samples", type=int, default=16, help="completions per question")
    p.add_argument("--device-batch-size", type=int, default=8,
                   help="samples per forward pass of the update (each pass's loss is normalised by its own tokens)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="every learning rate × this (then → 0)")
    p.add_argument("--std-normalize", action="store_true", help="divide advantages by the group's std")
    p.add_argument("--eval-every", type=int, default=60, help="pass@k on held-out questions (-1 = at the end)")
    p.add_argument("--eval-examples", type=int, default=400)
    p.add_argument("--eval-k", type=int, default=8)
    p.add_argument("--save-every", type=int, default=-1)
    p.add_argument("--resume-from-step", default=None, help="a step or 'latest' of this RL run")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0 = all)")
    p.add_argument("--device-type", default="")
    p.add_argument("--run", default="")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    compute = compute_init(args.device_type)
    print0(python_tool_banner())  # the sandbox layers in force, or why the python tool is off
    dist_info, device, world = compute.dist, compute.device, compute.dist.world_size
    if args.examples_per_step % world:
        raise UserError(f"--examples-per-step={args.examples_per_step} must be a multiple of the {world} processes")
    pass_size = min(args.device_batch_size, args.num_samples)
    if args.num_samples % pass_size:
        raise UserError(f"--num-samples={args.num_samples} must be a multiple of --device-batch-size="
                        f"{args.device_batch_size}: the update runs each question's samples in equal passes")
    if args.dry_run:
        steps = args.num_steps or 7473 // args.examples_per_step  # GSM8K train has 7,473 questions
        print0(f"chat_rl dry run: {steps} steps × {args.examples_per_step} questions × {args.num_samples} samples")
        return
    train, test = GSM8K("main", "train"), GSM8K("main", "test")
    num_steps = args.num_steps or len(train) // args.examples_per_step

    sft = load_stage("sft", args.model_tag, args.step, device)
    model, model_tag, sft_step = sft.model, sft.meta.model_tag, sft.step
    tokenizer = get_tokenizer()
    frac = args.init_lr_frac
    optimizer = model.setup_optimizer(embedding_lr=args.embedding_lr * frac, unembedding_lr=args.unembedding_lr * frac,
                                      matrix_lr=args.matrix_lr * frac, scalar_lr=args.scalar_lr * frac,
                                      smear_lr=0.2 * frac, weight_decay=0.0)
    per_rank = args.examples_per_step // world
    planned = num_steps * per_rank * args.max_new_tokens  # the most decode steps of this rank's rollouts
    engine = Engine(model, tokenizer, dtype=compute.dtype, policy=DecodePolicy.for_device(device, planned))
    print0(f"chat_rl {model_tag}: from SFT step {sft_step}; {num_steps} steps × {args.examples_per_step} questions × "
           f"{args.num_samples} samples, ≤{args.max_new_tokens} new tokens, temperature {args.temperature}, "
           f"top-k {args.top_k}; LRs {args.embedding_lr}/{args.unembedding_lr}/{args.matrix_lr} × {frac}, "
           "decaying to 0")
    ckpt_dir = checkpoint_dir("rl", model_tag)
    wandb = get_wandb(args.run, "nanochat-rl", vars(args), dist_info.is_master)
    curves = {"mean_reward": [], "pass@1": []}
    eval_indices = list(range(dist_info.rank, min(args.eval_examples, len(test)), world))
    start = 0
    # weights, optimizer, curves and RNG; rollout seeds follow from the step
    resumed = resume(ckpt_dir, args.resume_from_step, model, device, dist_info.rank, world,
                     lambda states: restore_training_state(states, optimizer, [], None, dist_info.rank))
    if resumed is not None:
        curves, start = resumed.curves, resumed.step
        print0(f"resumed RL from step {start}")

    def evaluate(step: int) -> dict:
        model.eval()
        local = evaluate_pass_at_k(engine, tokenizer, test, eval_indices, args.eval_k, args.max_new_tokens,
                                   args.top_k)
        sums = torch.tensor([v * len(eval_indices) for v in local.values()] + [len(eval_indices)],
                            dtype=accumulator_dtype(device), device=device)
        if dist_info.is_ddp:
            torch.distributed.all_reduce(sums)
        result = {k: (sums[i] / sums[-1].clamp(min=1)).item() for i, k in enumerate(local)}
        print0(f"  eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        for name in ("pass@1", f"pass@{args.eval_k}"):  # the ends of the curve; the whole curve is printed above
            curves.setdefault(name, []).append([step, 0, result[name]])
        wandb.log({"step": step, **result})
        return result

    last_eval = None
    t_start = time.time()
    for step in range(start, num_steps):
        if args.eval_every > 0 and step % args.eval_every == 0:
            last_eval = evaluate(step)
        schedule = rl_schedule(step, num_steps)
        optimizer.apply_schedule(**schedule)
        lrm = schedule["lr"]
        # --- rollouts (no grad), then one update -----------------------------------------------------------------
        t0 = time.time()
        model.eval()
        batches = []
        for j in range(per_rank):
            index = (step * args.examples_per_step + dist_info.rank * per_rank + j) % len(train)
            batches.append(rollout(engine, tokenizer, train, index, args.num_samples, args.max_new_tokens,
                                   args.temperature, args.top_k, seed=step * 1000 + index))
        sampled_tokens = sum(sum(m) for b in batches for m in b["masks"])
        model.train()
        for b in batches:
            advantages = group_advantages(b["rewards"].float(), args.std_normalize).to(device)
            inputs, targets = rollout_batch(b["sequences"], b["masks"], tokenizer.get_bos_token_id(), device,
                                            untrained=engine.tools.stops)
            # each pass's loss is normalised by its own sampled tokens; / (passes × per_rank) there and the
            # optimizer's average over processes make the step the mean over all passes of all questions
            backward_in_passes(model, inputs, targets, advantages, pass_size, per_rank, compute.autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        rewards = torch.cat([b["rewards"] for b in batches]).float()
        stats = torch.tensor([rewards.sum().item(), rewards.numel(), float(sampled_tokens)], device=device)
        if dist_info.is_ddp:
            torch.distributed.all_reduce(stats)
        mean_reward = (stats[0] / stats[1]).item()
        mean_len = (stats[2] / stats[1]).item()
        curves["mean_reward"].append([step + 1, 0, mean_reward])
        eta = (time.time() - t_start) / (step + 1 - start) * (num_steps - step - 1)
        print0(f"step {step + 1:04d}/{num_steps:04d} | mean reward {mean_reward:.3f} | mean completion length "
               f"{mean_len:.1f} | {stats[2].item() / dt:,.0f} sampled tok/s | lrm {lrm:.3f} | ETA {eta:.0f}s")
        wandb.log({"step": step + 1, "reward": mean_reward, "completion_length": mean_len})
        last = step + 1 == num_steps
        if last or (args.save_every > 0 and (step + 1) % args.save_every == 0):
            meta = CheckpointMeta(phase="rl", model_tag=model_tag, model_config=model.config,
                                  hyperparams=sft.meta.hyperparams, parent_phase="sft", parent_step=sft_step,
                                  curves=curves, args=vars(args))
            save_checkpoint(ckpt_dir, step + 1, model, meta, training_state(optimizer, []), dist_info.rank, world,
                            args.keep_last)
            print0(f"saved checkpoint {ckpt_dir} step {step + 1}")
    last_eval = evaluate(num_steps)
    if dist_info.is_master:
        get_report().log("Chat RL", [{"model_tag": model_tag, "sft_step": sft_step, "steps": num_steps,
                                      "examples_per_step": args.examples_per_step, "num_samples": args.num_samples,
                                      "final_mean_reward": curves["mean_reward"][-1][2] if curves["mean_reward"] else None,
                                      **{f"GSM8K {k}": v for k, v in last_eval.items()},
                                      "time_s": round(time.time() - t_start, 1)}], curves=curves)
    wandb.finish()


if __name__ == "__main__":
    run_cli(main)
