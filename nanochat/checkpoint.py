"""Checkpoints: one directory per step, written whole under a temporary name and renamed into place.

<base>/<phase>_checkpoints/<model_tag>/step_000123/
    model.safetensors     weights (fp32 master copy)
    optim_rank0.pt        optimizer state (and per-rank loader state / RNG) of each rank
    meta.json             model config, derived hyper-parameters, step, versions, git commit
A crash mid-write leaves only a `.tmp` directory behind; the previous checkpoint stays the latest loadable one.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanochat.common import UserError, get_base_dir
from nanochat.gpt import GPT, GPTConfig

PHASE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_root(phase: str) -> Path:
    if phase not in PHASE_DIRS:
        raise UserError(f"unknown model source {phase!r}: use one of {', '.join(PHASE_DIRS)}")
    return get_base_dir() / PHASE_DIRS[phase]


def checkpoint_dir(phase: str, model_tag: str) -> Path:
    return checkpoint_root(phase) / model_tag


def step_dir(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:06d}"


def list_steps(ckpt_dir: Path) -> list[int]:
    if not Path(ckpt_dir).is_dir():
        return []
    return sorted(int(m.group(1)) for p in Path(ckpt_dir).iterdir() if (m := STEP_DIR.match(p.name)))


def last_step(ckpt_dir: Path) -> int | None:
    steps = list_steps(ckpt_dir)
    return steps[-1] if steps else None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights with any torch.compile wrapper prefix removed (removeprefix, not lstrip, which eats characters)."""
    return {k.removeprefix("_orig_mod."): v.detach().float().contiguous()
            for k, v in model.state_dict().items()}


def save_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module, meta: dict, rank_state: dict | None = None,
                    rank: int = 0, world_size: int = 1, keep_last: int = 0) -> Path:
    """Write step_<step>/ atomically. Every rank calls this (rank_state = its optimizer/loader/RNG state); rank 0
    writes the weights and meta; the directory is renamed into place once all ranks have written their part."""
    import torch.distributed as dist
    distributed = world_size > 1 and dist.is_initialized()
    final = step_dir(ckpt_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if distributed:
        dist.barrier()
    if rank == 0:
        save_file(model_state_dict(model), str(tmp / "model.safetensors"))
        meta = dict(meta, step=step, git_commit=git_commit(), torch_version=torch.__version__, world_size=world_size)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    if rank_state is not None:
        torch.save(rank_state, tmp / f"rank{rank}.pt")
    if distributed:
        dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            for old in list_steps(ckpt_dir)[:-keep_last]:
                shutil.rmtree(step_dir(ckpt_dir, old), ignore_errors=True)
    if distributed:
        dist.barrier()
    return final


def load_checkpoint(ckpt_dir: Path, step: int, device: torch.device | str = "cpu", rank: int = 0) -> dict:
    """{'model': state dict, 'meta': dict, 'rank_state': dict | None} of one saved step."""
    path = step_dir(ckpt_dir, step)
    if not (path / "meta.json").exists():
        raise UserError(f"no checkpoint at {path} (steps present: {list_steps(ckpt_dir) or 'none'})")
    state = load_file(str(path / "model.safetensors"), device=str(device))
    meta = json.loads((path / "meta.json").read_text())
    rank_file = path / f"rank{rank}.pt"
    rank_state = torch.load(rank_file, map_location=device, weights_only=False) if rank_file.exists() else None
    return {"model": state, "meta": meta, "rank_state": rank_state}


def build_model(model_config: dict, device: torch.device | str, state: dict | None = None) -> GPT:
    """A GPT from a saved config: built on the meta device, materialised on `device`, weights loaded or init."""
    config = GPTConfig(**model_config)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # also fills the non-persistent rotary buffers
    if state is not None:
        model.load_state_dict(state, strict=True, assign=False)
    return model


def find_model_tag(phase: str) -> str:
    """The default model: the deepest tag (d20 over d12), the most recently written among equals."""
    root = checkpoint_root(phase)
    tags = [p for p in root.iterdir() if p.is_dir() and list_steps(p)] if root.is_dir() else []
    if not tags:
        maker = {"base": "python -m scripts.base_train", "sft": "python -m scripts.chat_sft",
                 "rl": "python -m scripts.chat_rl"}[phase]
        raise UserError(f"no {phase} checkpoints in {root}: create one with `{maker}`")

    def key(p: Path):
        m = re.match(r"^d(\d+)", p.name)
        return (int(m.group(1)) if m else -1, p.stat().st_mtime)
    return max(tags, key=key).name


def load_model(phase: str, device: torch.device | str = "cpu", model_tag: str | None = None,
               step: int | None = None):
    """(model in eval mode, tokenizer, meta) of a saved checkpoint; defaults: the largest tag, its last step."""
    from nanochat.tokenizer import get_tokenizer
    model_tag = model_tag or find_model_tag(phase)
    ckpt_dir = checkpoint_dir(phase, model_tag)
    step = step if step is not None else last_step(ckpt_dir)
    if step is None:
        raise UserError(f"no checkpoints in {ckpt_dir}")
    ckpt = load_checkpoint(ckpt_dir, step, device)
    model = build_model(ckpt["meta"]["model_config"], device, ckpt["model"])
    model.eval()
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise UserError(f"the tokenizer in {get_base_dir() / 'tokenizer'} has {tokenizer.get_vocab_size()} tokens but "
                        f"the {phase} model {model_tag} was trained with {model.config.vocab_size}: retrain one of them")
    return model, tokenizer, ckpt["meta"]
