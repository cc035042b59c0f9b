"""GRPO maths: group advantages, masks that keep prompts and tool outputs out of the loss, the gradient's sign."""

from contextlib import nullcontext

import torch

from conftest import make_tiny_model
from nanochat.grpo import backward_in_passes, group_advantages, pass_at_k, policy_gradient_loss, rollout_batch


def test_all_correct_and_all_wrong_groups_have_zero_advantage():
    assert torch.equal(group_advantages(torch.ones(4)), torch.zeros(4))
    assert torch.equal(group_advantages(torch.zeros(4)), torch.zeros(4))
    assert torch.equal(group_advantages(torch.ones(4), std_normalize=True), torch.zeros(4))
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.allclose(group_advantages(torch.tensor([1.0, 0.0]), std_normalize=True), torch.tensor([1.0, -1.0]),
                          atol=1e-4)


def test_rollout_batch_masks_prompt_forced_tokens_and_padding():
    sequences = [[1, 2, 3, 4, 5], [1, 2, 6]]
    masks = [[0, 0, 1, 0, 1], [0, 0, 1]]
    inputs, targets = rollout_batch(sequences, masks, pad_id=0)
    assert inputs.tolist() == [[1, 2, 3, 4], [1, 2, 0, 0]]
    assert targets.tolist() == [[-1, 3, -1, 5], [-1, 6, -1, -1]]


def test_the_sampled_stop_token_is_not_trained_on():
    sequences, masks = [[1, 2, 3, 9], [1, 2, 9]], [[0, 0, 1, 1], [0, 0, 1]]
    _, targets = rollout_batch(sequences, masks, pad_id=0, untrained={9})
    assert targets.tolist() == [[-1, 3, -1], [-1, -1, -1]]


def test_loss_is_normalised_by_the_groups_own_sampled_tokens():
    logits = torch.randn(2, 4, 10)
    targets = torch.tensor([[-1, 3, 4, 5], [-1, 6, -1, -1]])
    advantages = torch.tensor([0.5, -0.5])
    logp = torch.log_softmax(logits, -1)
    total = 0.5 * (logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 5]) - 0.5 * logp[1, 1, 6]
    assert torch.allclose(policy_gradient_loss(logits, targets, advantages), -total / 4, atol=1e-6)
    assert torch.allclose(policy_gradient_loss(logits, targets, advantages, 8), -total / 8, atol=1e-6)


def test_raising_a_samples_reward_raises_its_probability():
    model = make_tiny_model(50)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    good, bad = [0, 7, 11, 13], [0, 7, 11, 29]
    sequences, masks = [good, bad], [[0, 0, 1, 1], [0, 0, 1, 1]]
    inputs, targets = rollout_batch(sequences, masks, pad_id=0)

    def logp(seq):
        with torch.no_grad():
            logits = model(torch.tensor([seq[:-1]]))
        return torch.log_softmax(logits[0, -1], -1)[seq[-1]].item()

    before_good, before_bad = logp(good), logp(bad)
    advantages = group_advantages(torch.tensor([1.0, 0.0]))
    loss = policy_gradient_loss(model(inputs), targets, advantages, num_tokens=int((targets >= 0).sum()))
    loss.backward()
    optimizer.step()
    assert logp(good) > before_good and logp(bad) < before_bad


def test_loss_has_no_gradient_through_masked_positions():
    model = make_tiny_model(50)
    inputs = torch.tensor([[1, 2, 3, 4]])
    logits = model(inputs).detach().requires_grad_(True)
    targets = torch.tensor([[-1, 3, -1, -1]])
    policy_gradient_loss(logits, targets, torch.tensor([1.0]), 1).backward()
    assert logits.grad[0, [0, 2, 3]].abs().sum() == 0 and logits.grad[0, 1].abs().sum() > 0


def test_pass_at_k():
    assert pass_at_k([False, True, False], 1) == 0.0 and pass_at_k([False, True, False], 2) == 1.0


def test_each_forward_pass_is_normalised_by_its_own_tokens_as_the_reference_does():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    inputs = torch.randint(0, 11, (4, 6))
    targets = torch.randint(0, 11, (4, 6))
    targets[0, 3:] = -1  # the first pass holds 6 + 3 sampled tokens, the second 12
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    backward_in_passes(model, inputs, targets, advantages, pass_size=2, questions=3, autocast=nullcontext)
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = sum(policy_gradient_loss(model(inputs[r]), targets[r], advantages[r], int((targets[r] >= 0).sum()))
                   for r in (slice(0, 2), slice(2, 4))) / (2 * 3)
    expected.backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ours, model.parameters()))
    model.zero_grad()  # one normalisation over the whole group (per question) gives another gradient
    (policy_gradient_loss(model(inputs), targets, advantages) / 3).backward()
    assert not all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ours, model.parameters()))


def test_evaluation_logs_the_pass_at_1_to_k_curve(monkeypatch):
    import nanochat.grpo
    outcomes = {0: [0, 1, 0, 0], 1: [0, 0, 0, 1], 2: [1, 1, 1, 1], 3: [0, 0, 0, 0]}
    monkeypatch.setattr(nanochat.grpo, "rollout", lambda engine, tok, task, i, k, *args, **kwargs:
                        {"rewards": torch.tensor(outcomes[i][:k], dtype=torch.float)})
    curve = nanochat.grpo.evaluate_pass_at_k(None, None, None, [0, 1, 2, 3], 4, 16, 50)
    assert curve == {"pass@1": 0.25, "pass@2": 0.5, "pass@3": 0.5, "pass@4": 0.75}
