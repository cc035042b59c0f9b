"""Simplified GRPO: rollouts of a question through the engine, group-relative advantages and a token-level
policy-gradient loss.

No critic, no KL term, no ratio clipping (on-policy, one update per batch of samples): each question's samples are
compared with each other, advantage = reward − the group's mean reward (optionally / its std), and the loss pushes up
the log-probability of every sampled token of a sequence in proportion to its advantage.
"""

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """rewards (num_samples,) of one question → advantages; all-equal groups (all right or all wrong) give 0."""
    advantages = rewards - rewards.mean()
    if std_normalize:
        advantages = advantages / (rewards.std(unbiased=False) + eps)
    return advantages


def rollout_batch(sequences: list[list[int]], masks: list[list[int]], pad_id: int,
                  device: torch.device | str = "cpu", untrained: set[int] = frozenset()) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Samples (prompt + completion, with masks 1 only on sampled tokens) → inputs (B, T) and targets (B, T).

    Targets are -1 wherever the next token was not sampled by the policy (prompt, forced tool output), is padding,
    or is one of `untrained` (the stop tokens: the reference does not train on <|assistant_end|>).
    """
    T = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), T), -1, dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        n = len(seq) - 1
        inputs[i, :n] = torch.tensor(seq[:-1])
        target = torch.tensor(seq[1:])
        sampled = torch.tensor([m == 1 and t not in untrained for m, t in zip(mask[1:], seq[1:])], dtype=torch.bool)
        targets[i, :n] = target.masked_fill(~sampled, -1)
    return inputs.to(device), targets.to(device)


def policy_gradient_loss(logits: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                         num_tokens: int | float | None = None) -> torch.Tensor:
    """−Σ advantage · log p(sampled token) over valid targets, divided by num_tokens (default: the batch's own
    count of valid targets: token-level normalisation within one question's group of samples, as the reference).

    logits (B, T, V), targets (B, T) with -1 = not a sampled token, advantages (B,).
    """
    logp = -F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                            reduction="none").view(targets.shape)  # (B, T), 0 where ignored
    valid = (targets >= 0).float()
    denominator = valid.sum().clamp(min=1.0) if num_tokens is None else max(float(num_tokens), 1.0)
    return -(logp * valid * advantages[:, None]).sum() / denominator


def backward_in_passes(model, inputs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                       pass_size: int, questions: int, autocast) -> float:
    """Backpropagate one question's group of samples in forward passes of `pass_size` samples, as the reference
    does: each pass's loss is normalised by that pass's own sampled tokens, then divided by the number of passes and
    of `questions` (this process's questions of the step), so the gradient is the mean over passes and questions.
    Returns the summed loss."""
    passes = -(-inputs.size(0) // pass_size)
    total = 0.0
    for start in range(0, inputs.size(0), pass_size):
        rows = slice(start, start + pass_size)
        with autocast():
            logits = model(inputs[rows])
        loss = policy_gradient_loss(logits, targets[rows], advantages[rows]) / (passes * questions)
        loss.backward()
        total += loss.item()
    return total


def pass_at_k(correct: list[bool], k: int) -> float:
    """1 if any of the first k samples of a question is correct (samples are independent draws)."""
    return float(any(correct[:k]))


def completion_text(tokenizer, sequence: list[int], prompt_len: int, stops: set[int]) -> str:
    return tokenizer.decode([t for t in sequence[prompt_len:] if t not in stops])


def rollout(engine, tokenizer, task, index: int, num_samples: int, max_new_tokens: int, temperature: float,
            top_k: int, seed: int) -> dict:
    """`num_samples` completions of question `index` of `task` (one prefill), each rewarded by the task."""
    conv = task[index]
    prompt = tokenizer.render_for_completion(conv)
    sequences, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top_k, seed=seed)
    texts = [completion_text(tokenizer, s, len(prompt), engine.tools.stops) for s in sequences]
    rewards = torch.tensor([task.reward(conv, t) for t in texts])
    return {"sequences": sequences, "masks": masks, "rewards": rewards, "prompt_len": len(prompt)}


@torch.no_grad()
def evaluate_pass_at_k(engine, tokenizer, task, indices, k: int, max_new_tokens: int, top_k: int) -> dict:
    """The pass@1 … pass@k curve over the questions `indices`, k samples each at temperature 1: pass@j is the share
    of questions solved by one of their first j samples, as the reference logs it."""
    solved = [0.0] * k
    for i in indices:
        r = rollout(engine, tokenizer, task, i, k, max_new_tokens, 1.0, top_k, seed=10_000 + i)
        correct = [bool(x) for x in r["rewards"]]
        for j in range(k):
            solved[j] += pass_at_k(correct, j + 1)
    return {f"pass@{j + 1}": solved[j] / max(1, len(indices)) for j in range(k)}
