"""What the three training loops (base_train, chat_sft, chat_rl) share: one optimizer step over micro-batches, the
progress line, the training state a checkpoint keeps (and its restore, re-sharded for another number of processes),
and greedy samples for a look at the model during pretraining."""

import time

import torch

from nanochat.common import UserError, print0, synchronize
from nanochat.dataloader import stream_ids
from nanochat.decode import DecodePolicy
from nanochat.engine import Engine

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """One line per step: step/total, loss, lr multiplier, tokens/s, MFU, elapsed and ETA (excluding eval time; the
    ETA leaves out the session's first step, which includes compilation)."""

    def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float, peak_flops: float,
                 start_step: int = 0):
        self.total, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.start_step = start_step
        self.train_time = 0.0
        self.steady_time, self.steady_steps = 0.0, 0  # this session's steps after its first (compile, warm-up)
        self.ema, self.ema_steps = 0.0, 0

    def smoothed(self, loss: float) -> float:
        self.ema = 0.9 * self.ema + 0.1 * loss
        self.ema_steps += 1
        return self.ema / (1 - 0.9 ** self.ema_steps)  # debiased

    def line(self, step: int, loss: float, lrm: float, dt: float, extra: str = "") -> str:
        self.train_time += dt
        tok_s = self.tokens_per_step / max(dt, 1e-9)
        mfu = 100 * self.flops_per_token * tok_s / self.peak
        if step > self.start_step:
            self.steady_time += dt
            self.steady_steps += 1
        per_step = self.steady_time / self.steady_steps if self.steady_steps else dt
        eta = per_step * (self.total - step - 1)
        return (f"step {step + 1:05d}/{self.total:05d} ({100 * (step + 1) / self.total:5.1f}%) | loss "
                f"{self.smoothed(loss):.4f} | lrm {lrm:.3f} | {tok_s:,.0f} tok/s | MFU {mfu:.1f}% | "
                f"elapsed {format_duration(self.train_time)} | ETA {format_duration(eta)}{extra}")

    def state_dict(self) -> dict:
        return {"ema": self.ema, "ema_steps": self.ema_steps, "train_time": self.train_time}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.ema_steps, self.train_time = state["ema"], state["ema_steps"], state["train_time"]


class Prefetching:
    """A loader's batches, where `prefetch()` packs the next one ahead of time and holds it for the next `next()`.

    `state_dict()` is the loader's state before a held batch, so a checkpoint taken while one is held resumes with
    that batch: prefetching never changes which batches a run (or its resumption) trains on."""

    def __init__(self, loader):
        self.loader = loader
        self._batches = iter(loader)
        self._held = None  # (batch, the loader's state before it)

    def __iter__(self):
        return self

    def __next__(self):
        if self._held is not None:
            batch, self._held = self._held[0], None
            return batch
        return next(self._batches)

    def prefetch(self) -> None:
        if self._held is None:
            state = self.loader.state_dict()
            self._held = (next(self._batches), state)

    def state_dict(self) -> dict:
        return self._held[1] if self._held is not None else self.loader.state_dict()


def train_step(model, optimizer, streams, autocast, grad_clip: float = 0.0) -> float:
    """One optimizer step: a micro-batch from each stream (gradient accumulation), then the update, which averages
    the gradients over processes and clips their global norm (optimizer.step). Returns the mean loss over every
    micro-batch of every process.

    The loss is read back (`.item()`, which waits for the GPU) only after the next step's first micro-batch is
    packed, when that stream is `Prefetching`: the host packs it while the GPU runs the update, instead of the GPU
    idling while the host packs it after the wait. The other micro-batches are packed while the GPU runs the
    previous one's backward anyway."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    loss_sum = None
    for stream in streams:
        x, y = next(stream)
        with autocast():
            loss = model(x, y)
        (loss / len(streams)).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    world = 1
    if distributed:
        torch.distributed.all_reduce(loss_sum)
        world = torch.distributed.get_world_size()
    optimizer.step(grad_clip=grad_clip)
    optimizer.zero_grad(set_to_none=True)
    if isinstance(streams[0], Prefetching):
        streams[0].prefetch()
    return loss_sum.item() / (len(streams) * world)


def training_state(optimizer, loaders, progress=None) -> dict:
    """What a process needs, beyond the weights, to resume exactly: its optimizer shard, data positions, progress,
    RNG."""
    return {"optimizer": optimizer.state_dict(), "loaders": [loader.state_dict() for loader in loaders],
            "progress": progress.state_dict() if progress is not None else None, "rng": rng_state()}


def restore_training_state(states: list[dict], optimizer, loaders, progress=None, rank: int = 0) -> None:
    """Resume from the training states of a checkpoint: this rank's own (same world size), or every rank's of a run
    with another world size, which re-shards the optimizer and hands each data stream to its new owner."""
    if len(states) == 1 and states[0]["optimizer"].get("world_size", 1) == optimizer.world_size():
        optimizer.load_state_dict(states[0]["optimizer"])
        own = states[0]
        for loader, loader_state in zip(loaders, own["loaders"]):
            loader.load_state_dict(loader_state)
    else:
        optimizer.load_state_dicts([state["optimizer"] for state in states])
        # the old ranks' loaders, in rank order, are the global streams in order (see dataloader.stream_ids)
        streams = [loader_state for state in states for loader_state in state["loaders"]]
        if loaders and len(streams) != len(loaders) * optimizer.world_size():
            raise UserError(f"the checkpoint has {len(streams)} data streams and this run "
                            f"{len(loaders) * optimizer.world_size()}: keep --device-batch-size × processes × "
                            "accumulation the same to resume on another number of processes")
        for loader, stream in zip(loaders, stream_ids(rank, optimizer.world_size(), len(loaders))):
            loader.load_state_dict(streams[stream])
        own = states[rank] if rank < len(states) else states[0]
        print0(f"re-sharded the training state of {len(states)} processes for {optimizer.world_size()}")
    if progress is not None and own["progress"] is not None:
        progress.load_state_dict(own["progress"])
    set_rng_state(own["rng"])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@torch.no_grad()
def print_samples(model, tokenizer, max_tokens: int = 16) -> list[str]:
    """Greedy continuations of SAMPLE_PROMPTS through the engine, in the model's own dtype and eager (no copy of
    the weights, nothing compiled in the middle of a training run)."""
    engine = Engine(model, tokenizer, use_tools=False, dtype=next(model.parameters()).dtype, policy=DecodePolicy())
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        (sequence,), _ = engine.generate_batch(ids, 1, max_tokens=max_tokens, temperature=0.0)
        text = prompt + tokenizer.decode([t for t in sequence[len(ids):] if t not in engine.tools.stops])
        samples.append(text)
        print0(f"  sample: {text!r}")
    return samples


class Timer:
    def __init__(self, device_type: str):
        self.device_type = device_type

    def __enter__(self):
        synchronize(self.device_type)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device_type)
        self.dt = time.perf_counter() - self.t0
