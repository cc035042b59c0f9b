"""The shared training step: the next step's first micro-batch is packed before the loss is read back (the wait for
the GPU), and prefetching never changes which batches a run or its resumption trains on."""

from contextlib import nullcontext

import torch

from nanochat.training import Prefetching, train_step


class CountingLoader:
    """Batches numbered 0, 1, 2, …; records each one it packs in `events`, and resumes from its state."""

    def __init__(self, name: str, events: list, start: int = 0):
        self.name, self.events, self.next = name, events, start

    def __iter__(self):
        while True:
            self.events.append(f"pack {self.name}{self.next}")
            x = torch.full((2, 3), float(self.next))
            self.next += 1
            yield x, x.sum(dim=1)

    def state_dict(self) -> dict:
        return {"next": self.next}


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(3, 1)

    def forward(self, x, y):
        return ((self.w(x).squeeze(-1) - y) ** 2).mean()


class PlainOptimizer:
    def __init__(self, model):
        self.sgd = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(self, grad_clip: float = 0.0):
        self.sgd.step()

    def zero_grad(self, set_to_none: bool = True):
        self.sgd.zero_grad(set_to_none=set_to_none)


def test_the_next_steps_first_micro_batch_is_packed_before_the_loss_is_read_back(monkeypatch):
    events = []
    real_item = torch.Tensor.item

    def item(tensor):
        events.append("loss.item")
        return real_item(tensor)
    monkeypatch.setattr(torch.Tensor, "item", item)
    model = Regression()
    streams = [Prefetching(CountingLoader("a", events)), Prefetching(CountingLoader("b", events))]
    for _ in range(2):
        train_step(model, PlainOptimizer(model), streams, nullcontext)
    assert events == ["pack a0", "pack b0", "pack a1", "loss.item",  # step 1, then step 2's first micro-batch
                      "pack b1", "pack a2", "loss.item"]


def test_a_state_taken_while_a_batch_is_held_resumes_with_that_batch():
    events = []
    stream = Prefetching(CountingLoader("a", events))
    assert next(stream)[0][0, 0] == 0
    stream.prefetch()  # batch 1 packed and held
    state = stream.state_dict()
    assert state == {"next": 1}
    resumed = Prefetching(CountingLoader("a", [], start=state["next"]))
    assert [next(stream)[0][0, 0].item() for _ in range(3)] == [next(resumed)[0][0, 0].item() for _ in range(3)]
    assert stream.state_dict() == {"next": 4}  # nothing held: the loader's own state
