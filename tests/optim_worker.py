"""Run by test_optim.py under torchrun (and alone): a few optimizer steps on a fixed batch (with a binding grad clip);
rank 0 saves the weights to argv[1], every rank its optimizer state dict to argv[1] + ".rank<r>" and the bytes of
the tensors its optimizer holds between steps to argv[1] + ".held<r>".

With `engine` as argv[2] it checks instead that an Engine keeping a separate bf16 copy of the fp32 model (as RL's
rollouts do on CUDA) samples from the weights of the last optimizer step: rank 0 saves, per step, the engine's
greedy tokens, a fresh engine's and whether the engine's weights equal the model's cast to bf16."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import FIXTURE_TEXT, make_tiny_model  # noqa: E402


def held_bytes(optimizer, parameters: set[int]) -> int:
    """Bytes of the distinct storages the optimizer keeps between steps (its state and any buffers of nanochat
    objects it holds), the model's parameters and gradients left out."""
    seen, total, todo = set(), 0, [optimizer.__dict__]
    while todo:
        obj = todo.pop()
        if torch.is_tensor(obj):
            storage = obj.untyped_storage()
            if id(obj) not in parameters and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            todo.extend(obj)
        elif type(obj).__module__.startswith("nanochat"):
            todo.append(vars(obj))
    return total


def optimizer_steps(out: str, rank: int, world: int) -> None:
    model = make_tiny_model(300)
    optimizer = model.setup_optimizer(embedding_lr=0.05, unembedding_lr=0.01, matrix_lr=0.02, scalar_lr=0.05,
                                      weight_decay=0.1)
    torch.manual_seed(123)
    data = torch.randint(0, 300, (8, 33))
    mine = data.chunk(world)[rank]
    for _ in range(3):
        loss = model(mine[:, :-1], mine[:, 1:])
        loss.backward()
        optimizer.clip_grad_norm_(0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    torch.save(optimizer.state_dict(), f"{out}.rank{rank}")
    parameters = {id(t) for p in model.parameters() for t in (p, p.grad) if t is not None}
    torch.save(held_bytes(optimizer, parameters), f"{out}.held{rank}")


def engine_follows_steps(out: str, rank: int, world: int) -> None:
    from nanochat.engine import Engine
    from nanochat.tokenizer import Tokenizer
    tokenizer = Tokenizer.train_from_iterator(iter([FIXTURE_TEXT] * 4), vocab_size=300)
    model = make_tiny_model(tokenizer.get_vocab_size())
    optimizer = model.setup_optimizer(embedding_lr=0.3, unembedding_lr=0.05, matrix_lr=0.05, scalar_lr=0.1)
    engine = Engine(model, tokenizer, use_tools=False, dtype=torch.bfloat16)
    assert engine.model is not model, "the engine must keep its own bf16 copy for this check"
    prompt = tokenizer.encode(FIXTURE_TEXT[:40])
    targets = torch.tensor([tokenizer.encode(FIXTURE_TEXT[:200])])

    def greedy(e: Engine) -> list[int]:
        return [column[0] for column, _ in e.generate(prompt, max_tokens=12, temperature=0.0)]

    results = []
    for _ in range(3):
        before = greedy(engine)
        model(targets[:, :-1], targets[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = greedy(engine)
        fresh = greedy(Engine(model, tokenizer, use_tools=False, dtype=torch.bfloat16))
        synced = all(torch.equal(a, b.to(torch.bfloat16))
                     for a, b in zip(engine.model.parameters(), model.parameters()))
        results.append(dict(before=before, after=after, fresh=fresh, synced=synced))
    if rank == 0:
        torch.save(results, out)


def main(out: str, mode: str = "steps") -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    {"steps": optimizer_steps, "engine": engine_follows_steps}[mode](out, rank, world)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
