"""Checkpoints: one directory per step, which every node writes for itself and which counts only once it is marked.

<base>/<phase>_checkpoints/<model_tag>/step_000123/
    model.safetensors     weights (fp32 master copy), written by the first process of each node
    meta.json             model config, derived hyper-parameters, step, versions, git commit (same writers)
    rank<r>.pt            process r's training state: its optimizer shard, data-loader positions, progress, RNG
    COMPLETE              the marker: step, world size, and the size of every file above in this folder

Every process creates the folder itself and writes its files (temporary name, fsync, rename, fsync the folder), so
nodes without a shared filesystem each hold their own part. After a barrier, rank 0 (and the first process of every
other node, for its own folder) writes COMPLETE. Loaders ignore folders without it, check the sizes it lists, and
fall back to the previous complete step, with one line saying why, when the latest is partial or corrupt.
Inference reads only model.safetensors and meta.json; the rank files are read (weights_only) only to resume training.
"""

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanochat.common import UserError, get_base_dir, git_commit, print0
from nanochat.gpt import GPT, GPTConfig
from nanochat.scaling import Hyperparams
from nanochat.tokenizer import Tokenizer, get_tokenizer

PHASE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
PARENT_PHASE = {"sft": "base", "rl": "sft"}
MAKER = {"base": "python -m scripts.base_train", "sft": "python -m scripts.chat_sft", "rl": "python -m scripts.chat_rl"}
STEP_DIR = re.compile(r"^step_(\d{6,})$")
MARKER = "COMPLETE"


class CheckpointError(UserError):
    """A checkpoint folder that cannot be used: unmarked, missing a file, or corrupt (the message says which)."""


@dataclass
class CheckpointMeta:
    """meta.json: what a step folder holds and where it came from. `parent_*` name the checkpoint a stage started
    from (SFT: a base step; RL: an SFT step); `provenance` is what save_checkpoint adds (git commit, torch version,
    processes) plus what the stage records about its inputs (dataset, crop fraction)."""
    phase: str
    model_tag: str
    model_config: GPTConfig
    hyperparams: Hyperparams
    step: int = 0
    parent_phase: str | None = None
    parent_step: int | None = None
    curves: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, phase: str | None = None) -> "CheckpointMeta":
        """Also reads the meta.json of checkpoints written before this schema (flat keys, base_step / sft_step)."""
        phase = d.get("phase") or phase or "base"
        config = GPTConfig(**d["model_config"])
        args = d.get("args") or {}
        tag = d.get("model_tag") or args.get("model_tag") or f"d{config.n_layer}"
        provenance = dict(d.get("provenance") or {})
        for key in ("git_commit", "torch_version", "world_size", "dataset", "crop_fraction"):
            if key in d:
                provenance[key] = d[key]
        parent_step = d.get("parent_step", d.get("base_step", d.get("sft_step")))
        return cls(phase=phase, model_tag=tag, model_config=config, hyperparams=Hyperparams.from_dict(d["hyperparams"]),
                   step=d.get("step", 0), parent_phase=d.get("parent_phase") or (PARENT_PHASE.get(phase)
                                                                                 if parent_step is not None else None),
                   parent_step=parent_step, curves=d.get("curves") or {}, args=args, provenance=provenance)


def checkpoint_root(phase: str) -> Path:
    if phase not in PHASE_DIRS:
        raise UserError(f"unknown model source {phase!r}: use one of {', '.join(PHASE_DIRS)}")
    return get_base_dir() / PHASE_DIRS[phase]


def checkpoint_dir(phase: str, model_tag: str) -> Path:
    return checkpoint_root(phase) / model_tag


def step_dir(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:06d}"


def list_steps(ckpt_dir: Path) -> list[int]:
    """Steps with a completion marker, oldest first (unmarked folders are partial saves and never count)."""
    if not Path(ckpt_dir).is_dir():
        return []
    return sorted(int(m.group(1)) for p in Path(ckpt_dir).iterdir()
                  if (m := STEP_DIR.match(p.name)) and (p / MARKER).is_file())


def last_step(ckpt_dir: Path) -> int | None:
    steps = list_steps(ckpt_dir)
    return steps[-1] if steps else None


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights with any torch.compile wrapper prefix removed (removeprefix, not lstrip, which eats characters)."""
    return {k.removeprefix("_orig_mod."): v.detach().float().contiguous()
            for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# Writing

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) under a temporary name, fsync it, rename it to `path` (the caller fsyncs the folder)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _barrier(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist
        dist.barrier()


def save_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module, meta: CheckpointMeta,
                    rank_state: dict | None = None, rank: int = 0, world_size: int = 1, keep_last: int = 0) -> Path:
    """Write step_<step>/. Every process calls this with its own rank_state (optimizer shard, loaders, RNG); the first
    process of each node (LOCAL_RANK 0) also writes the weights and meta, so every node holds a loadable copy."""
    import torch.distributed as dist
    distributed = world_size > 1 and dist.is_initialized()
    leader = rank == 0 or int(os.environ.get("LOCAL_RANK", rank)) == 0
    final = step_dir(ckpt_dir, step)
    if leader:  # a stale or older save of this step: unmark it first, so no loader trusts it while it is rewritten
        (final / MARKER).unlink(missing_ok=True)
        shutil.rmtree(final, ignore_errors=True)
    _barrier(distributed)
    final.mkdir(parents=True, exist_ok=True)  # every process: a node without a shared filesystem makes its own
    written = []
    if leader:
        write_atomic(final / "model.safetensors", lambda tmp: save_file(model_state_dict(model), str(tmp)))
        meta.step = step
        meta.provenance.update(git_commit=git_commit(), torch_version=torch.__version__, world_size=world_size)
        record = meta.to_dict()
        write_atomic(final / "meta.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
        written += ["model.safetensors", "meta.json"]
    if rank_state is not None:
        write_atomic(final / f"rank{rank}.pt", lambda tmp: torch.save(rank_state, tmp))
        written.append(f"rank{rank}.pt")
    fsync_dir(final)
    # every process has written and synced its files; the marker lists all of them, wherever they were written, so
    # a rank file copied over from another node can be checked too
    files = {name: (final / name).stat().st_size for name in written}
    if distributed:
        everyone = [None] * world_size
        dist.all_gather_object(everyone, files)
        files = {name: size for part in everyone for name, size in part.items()}
    if leader:
        marker = {"step": step, "world_size": world_size, "files": dict(sorted(files.items()))}
        write_atomic(final / MARKER, lambda tmp: tmp.write_text(json.dumps(marker, indent=1)))
        fsync_dir(final)
        fsync_dir(final.parent)
        if keep_last > 0:
            for old in list_steps(ckpt_dir)[:-keep_last]:
                shutil.rmtree(step_dir(ckpt_dir, old), ignore_errors=True)
    _barrier(distributed)
    return final


# ---------------------------------------------------------------------------------------------------------------------
# Reading

def read_marker(path: Path) -> dict:
    try:
        marker = json.loads((path / MARKER).read_text())
        if not isinstance(marker.get("files"), dict):
            raise ValueError("no file list")
        return marker
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MARKER} marker (a save that did not finish)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / MARKER} is unreadable ({e})") from None


def check_files(path: Path, marker: dict, names: list[str]) -> None:
    """Each named file is listed by the marker and has the size it lists."""
    for name in names:
        if name not in marker["files"]:
            raise CheckpointError(f"{path} has no {name} (its {MARKER} does not list it)")
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path / name} is missing") from None
        if size != marker["files"][name]:
            raise CheckpointError(f"{path / name} is {size} bytes, {MARKER} says {marker['files'][name]}: "
                                  "truncated or overwritten")


def read_weights(path: Path, device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """(state dict, meta) of a marked step folder: safetensors and JSON only, nothing unpickled."""
    marker = read_marker(path)
    check_files(path, marker, ["model.safetensors", "meta.json"])
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'meta.json'} is corrupt ({e})") from None
    try:
        state = load_file(str(path / "model.safetensors"), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'model.safetensors'} is corrupt ({str(e).splitlines()[0][:120]})") from None
    return state, meta


def read_rank_states(path: Path, world_size: int, rank: int, device: torch.device | str = "cpu") -> list[dict]:
    """The training states to resume rank `rank` of `world_size` from: its own file when the checkpoint was written
    by as many processes, otherwise every rank's file (all must be in this folder) for re-sharding."""
    marker = read_marker(path)
    saved = marker["world_size"]
    ranks = [rank] if saved == world_size else list(range(saved))
    if saved != world_size:
        missing = [f"rank{r}.pt" for r in ranks if not (path / f"rank{r}.pt").is_file()]
        if missing:
            raise UserError(f"{path} was saved by {saved} processes and this run has {world_size}; re-sharding needs "
                            f"every rank file but {', '.join(missing)} are not here: resume with {saved} processes, "
                            "or copy every node's rank*.pt of this step into this folder")
    check_files(path, marker, [f"rank{r}.pt" for r in ranks])
    states = []
    for r in ranks:
        try:
            states.append(torch.load(path / f"rank{r}.pt", map_location=device, weights_only=True))
        except Exception as e:  # any unpickling failure of a damaged or foreign file is "corrupt"
            raise CheckpointError(f"{path / f'rank{r}.pt'} is corrupt ({str(e).splitlines()[0][:120]})") from None
    return states


def load_checkpoint(ckpt_dir: Path, step: int, device: torch.device | str = "cpu", rank: int | None = None,
                    world_size: int = 1) -> dict:
    """{'model', 'meta', 'rank_states'} of one marked step; rank_states (see read_rank_states) only when a rank is
    given, else None: inference never opens the rank files."""
    path = step_dir(ckpt_dir, step)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path} (complete steps: {list_steps(ckpt_dir) or 'none'})")
    state, meta = read_weights(path, device)
    rank_states = read_rank_states(path, world_size, rank, device) if rank is not None else None
    return {"model": state, "meta": meta, "rank_states": rank_states, "step": step}


def load_latest(ckpt_dir: Path, device: torch.device | str = "cpu") -> dict | None:
    """The newest step whose weights load, saying in one line why each newer one was skipped; None if there is none."""
    for step in reversed(list_steps(ckpt_dir)):
        try:
            return load_checkpoint(ckpt_dir, step, device)
        except CheckpointError as e:
            print(f"warning: skipping checkpoint step {step}: {e}; trying the previous complete step",
                  file=sys.stderr, flush=True)
    return None


def load_for_resume(ckpt_dir: Path, requested: str | int, device: torch.device | str, rank: int,
                    world_size: int) -> dict | None:
    """The checkpoint every process can resume from: `requested` (a step) or the newest step that loads on all ranks
    ('latest'); None if there is none. A rank that cannot load a step says why in one line, and all move on together."""
    import torch.distributed as dist
    distributed = world_size > 1 and dist.is_initialized()
    if requested == "latest":
        steps = set(list_steps(ckpt_dir))
        if distributed:  # nodes may see different folders: try every step any of them has, newest first
            seen = [None] * world_size
            dist.all_gather_object(seen, sorted(steps))
            steps = set().union(*map(set, seen))
        candidates = sorted(steps, reverse=True)
    else:
        candidates = [int(requested)]
    for step in candidates:
        ckpt, error = None, None
        try:
            ckpt = load_checkpoint(ckpt_dir, step, device, rank=rank, world_size=world_size)
        except CheckpointError as e:
            error = e
        ok = torch.tensor([0 if ckpt is None else 1], device=device)  # on the GPU for NCCL
        if distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item():
            return ckpt
        if requested != "latest":
            if error is not None:
                raise error
            raise CheckpointError(f"checkpoint step {step} in {ckpt_dir} is incomplete on another process")
        if error is not None:
            print(f"warning: rank {rank}: not resuming from step {step}: {error}; trying the previous complete step",
                  file=sys.stderr, flush=True)
    return None


def read_optimizer_states(ckpt_dir: Path, step: int, device: torch.device | str, rank: int = 0,
                          world_size: int = 1) -> list[dict] | None:
    """The optimizer state dicts of a saved step for warm-starting rank `rank` of `world_size` (its own shard, or
    every rank's when that run had another number of processes; MuonAdamW.load_state_dicts re-shards them). None when
    the checkpoint holds no optimizer state."""
    path = step_dir(ckpt_dir, step)
    if not any(name.startswith("rank") for name in read_marker(path)["files"]):
        return None
    return [state["optimizer"] for state in read_rank_states(path, world_size, rank, device)]


def build_model(config: GPTConfig, device: torch.device | str, state: dict | None = None) -> GPT:
    """A GPT built on the meta device, materialised on `device`, with `state`'s weights or freshly initialised."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # also fills the non-persistent rotary buffers
    if state is not None:
        model.load_state_dict(state, strict=True, assign=False)
    return model


def find_model_tag(phase: str) -> str:
    """The default model: the deepest (n_layer of its newest meta.json: d20 over d12), the most recent among equals."""
    root = checkpoint_root(phase)
    tags = [p for p in root.iterdir() if p.is_dir() and list_steps(p)] if root.is_dir() else []
    if not tags:
        raise UserError(f"no {phase} checkpoints in {root}: create one with `{MAKER[phase]}`")

    def key(p: Path):
        try:
            depth = json.loads((step_dir(p, last_step(p)) / "meta.json").read_text())["model_config"]["n_layer"]
        except (OSError, ValueError, KeyError, TypeError):
            depth = -1  # unreadable: never the default over a readable one
        return depth, p.stat().st_mtime
    return max(tags, key=key).name


@dataclass
class Stage:
    """A loaded checkpoint of one phase: the model (on its device, train mode) and its meta."""
    model: GPT
    meta: CheckpointMeta
    ckpt_dir: Path

    @property
    def step(self) -> int:
        return self.meta.step


def load_stage(phase: str, model_tag: str | None = None, step: int | None = None,
               device: torch.device | str = "cpu") -> Stage:
    """The checkpoint a stage starts from or a front end serves: `step` of `model_tag` (defaults: the deepest tag,
    its newest complete step that loads). Reads safetensors and JSON only, so a downloaded checkpoint cannot run
    code."""
    model_tag = model_tag or find_model_tag(phase)
    ckpt_dir = checkpoint_dir(phase, model_tag)
    ckpt = load_checkpoint(ckpt_dir, step, device) if step is not None else load_latest(ckpt_dir, device)
    if ckpt is None:
        raise UserError(f"no complete {phase} checkpoint in {ckpt_dir}: create one with `{MAKER[phase]}`")
    meta = CheckpointMeta.from_dict(ckpt["meta"], phase)
    meta.model_tag, meta.step = model_tag, ckpt["step"]
    return Stage(build_model(meta.model_config, device, ckpt.pop("model")), meta, ckpt_dir)


def resume(ckpt_dir: Path, requested: str | int | None, model: GPT, device: torch.device | str, rank: int,
           world_size: int, restore: Callable[[list[dict]], None]) -> CheckpointMeta | None:
    """Continue a run from its own checkpoint: `requested` is a step, 'latest' or None (a fresh start). Loads the
    weights into `model`, hands this rank's training states to `restore` (optimizer, loaders, progress, RNG) and
    returns the checkpoint's meta; None when there is nothing to resume from. A checkpoint of another model shape
    is refused."""
    if requested is None:
        return None
    ckpt = load_for_resume(ckpt_dir, requested, device, rank, world_size)
    if ckpt is None:
        print0(f"no complete checkpoint in {ckpt_dir} to resume from: starting fresh")
        return None
    meta = CheckpointMeta.from_dict(ckpt["meta"])
    meta.step = ckpt["step"]
    if meta.model_config != model.config:
        raise UserError(f"checkpoint {ckpt_dir} step {meta.step} has a different model config: use another "
                        "--model-tag or the same flags")
    model.load_state_dict(ckpt["model"])
    restore(ckpt["rank_states"])
    return meta


def load_model(phase: str, device: torch.device | str = "cpu", model_tag: str | None = None,
               step: int | None = None) -> tuple[GPT, Tokenizer, CheckpointMeta]:
    """(model in eval mode, tokenizer, meta) of a saved checkpoint for inference (see load_stage), with the
    tokenizer checked against the model's vocabulary."""
    stage = load_stage(phase, model_tag, step, device)
    model = stage.model.eval()
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise UserError(f"the tokenizer in {get_base_dir() / 'tokenizer'} has {tokenizer.get_vocab_size()} tokens but "
                        f"the {phase} model {stage.meta.model_tag} was trained with {model.config.vocab_size}: "
                        "retrain one of them")
    return model, tokenizer, stage.meta


# Below this many scaling parameters (transformer matrices + LM head) a model is one of the tiny ones a CPU trains in
# minutes: front ends say what to expect of it (the speedrun's d20 has about 400M).
SMALL_MODEL_PARAMS = 50_000_000


def describe_model(meta: CheckpointMeta) -> tuple[str, str | None]:
    """The line every front end opens with (tag, stage, step, size, context), and for a tiny model a second line on
    what to expect of it (None for larger ones)."""
    config = meta.model_config
    params = config.num_scaling_params()
    name = (f"{meta.model_tag} {meta.phase} step {meta.step} ({config.n_layer} layers, {params / 1e6:.1f}M "
            f"parameters, context {config.sequence_len} tokens)")
    if params >= SMALL_MODEL_PARAMS:
        return name, None
    return name, ("a tiny model: expect fluent-looking sentences, not facts, arithmetic or code that can be trusted "
                  "(the 8-GPU speedrun's d20 is the smallest that chats usefully)")


def _has_steps(phase: str, model_tag: str | None) -> bool:
    root = checkpoint_root(phase)
    tags = [checkpoint_dir(phase, model_tag)] if model_tag else (list(root.iterdir()) if root.is_dir() else [])
    return any(list_steps(tag) for tag in tags)


def load_chat_model(source: str | None, device: torch.device | str, model_tag: str | None = None,
                    step: int | None = None, dry_run: bool = False):
    """(model, tokenizer, meta) of the requested phase, or of the most trained one available: rl, then sft, then
    base (with none, base's error names the first command to run). A dry run without a model only warns and gets
    None."""
    error, phases = None, [source] if source else ["rl", "sft", "base"]
    for phase in phases:
        try:
            return load_model(phase, device, model_tag, step)
        except UserError as e:
            error = e
    if not any(_has_steps(phase, model_tag) for phase in phases):  # nothing at all: say where we looked
        base = get_base_dir()
        looked = ", ".join(f"{PHASE_DIRS[phase]}/" for phase in phases)
        error = UserError(f"no {' or '.join(phases)} checkpoint{f' tagged {model_tag}' if model_tag else ''} under "
                          f"{base} (looked in {looked}; set NANOCHAT_BASE_DIR to the folder your runs wrote to, or "
                          f"train one: `{MAKER[phases[-1]]}`, or `bash runs/cpu.sh` for the whole pipeline)")
    if not dry_run:
        raise error
    print0(f"warning (dry run): {error}")
    return None
