"""Run by test_optim.py under torchrun (and alone): a few optimizer steps on a fixed batch (with a binding grad clip);
rank 0 saves the weights to argv[1], every rank its optimizer state dict to argv[1] + ".rank<r>"."""

import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import make_tiny_model  # noqa: E402


def main(out: str) -> None:
    distributed = "RANK" in __import__("os").environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
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
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
