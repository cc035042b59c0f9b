"""Decode steps with static shapes: one token for each row of a batch-size bucket, the model's forward and the
sampling together, no host reads inside; on CUDA each step is replayed from a captured CUDA graph.

A step reads its inputs from buffers that stay at fixed addresses (the rows' tokens, sampling settings and uniform
draws, and which rows take part), appends one token per taking-part row to the KV cache, samples the next token on
the device and leaves it both in `out` and in `tokens` (the next step's input, unless the host overrides a row with
a forced token). The caller copies `out` to the host once per step: the step's only device-to-host transfer.

A step is built once per key (rows, read_length, candidates): rows a batch-size bucket (a power of two),
read_length how far it reads the cache (with CUDA graphs a power of two ≥ 128), candidates how many top tokens the
sampler looks at (0 = greedy). Requests joining or leaving only change the buffers' contents, or the bucket when the batch crosses
a power of two; a key's step is reused for the decoder's whole life (never recaptured).

Why captured by hand (`torch.cuda.graph`) rather than `torch.compile(mode="reduce-overhead")`: the step mutates
the KV cache, which is an input to it, and CUDA-graph trees skip graphs whose inputs are mutated (falling back to
launching every kernel, silently), and hand back outputs that the next replay overwrites. A manual capture of the
(optionally Inductor-compiled) step records exactly the kernels that run eagerly and writes into buffers we own;
anything in it that would synchronise with the host makes the capture fail (the step then runs uncaptured, with a
warning; `Decoder.captured` says which steps are graphs, `capture_failures` which are not and why, and
`uncaptured_steps` how many steps ran without their graph).
"""

import ctypes
import functools
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanochat.common import UserError
from nanochat.gpt import SOFTCAP
from nanochat.kv_cache import KVCache, StaticRows
from nanochat.sampling import sample_tokens

MIN_READ_LENGTH = 128
MALLOC_MMAP_BELOW = 32 << 20  # bytes: glibc's largest setting (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
MALLOC_KEEP_FREE = 256 << 20  # bytes of free memory at the heap's top kept for reuse instead of handed back


@functools.cache  # once per process: the setting is process-wide
def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed blocks below 32 MiB instead of mapping fresh pages for each one and handing
    them back (up to 256 MiB of free memory kept). A CPU decode step makes a few hundred short-lived tensors, a few
    of them 1-4 MiB (the logits and their soft-cap at batch 8-32); by default glibc maps and unmaps those, so a
    batch-8 step took 350-1,100 page faults, and in bf16 16% longer on an Intel Xeon. Process-wide
    and permanent; False where the C library is not glibc (macOS, musl), which is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, MALLOC_KEEP_FREE))


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def rows_bucket(n: int, limit: int) -> int:
    """The batch-size bucket of n rows: the smallest power of two ≥ n, at most `limit` (the decoder's slots)."""
    return min(_pow2(n), limit)


def read_bucket(n: int, limit: int) -> int:
    """How far a step reads the cache so that it sees n positions: a power of two ≥ max(n, 128), at most `limit`."""
    return min(_pow2(max(n, MIN_READ_LENGTH)), limit)


POLICIES = {"eager": (False, False), "compile": (True, False), "graph": (False, True), "compile+graph": (True, True)}
# CPU: decode steps planned from which a compiled step pays for its compile. On a 2-core AMD EPYC a compiled d4 step
# saved 0.7 ms at batch 1 and 1.0 at batch 8 (+25% / +19% tokens/s), and compiling its shapes cost 50 s with an
# empty Inductor cache (14 s with a warm one): about 30,000 steps to break even
COMPILE_FROM_STEPS = 30_000


@dataclass(frozen=True)
class DecodePolicy:
    """How decode steps run: `compile` through torch.compile (Inductor), `graph` replayed as CUDA graphs."""
    compile: bool = False
    graph: bool = False

    @staticmethod
    def for_device(device: torch.device, planned_steps: int = 0) -> "DecodePolicy":
        """CUDA: compiled and captured (fused kernels, one graph launch per step). CPU: compiled for a job that
        plans at least COMPILE_FROM_STEPS decode steps (an evaluation, RL rollouts), which a compiled step runs
        faster; eager otherwise (a chat's first answer does not wait for the compiler).
        `NANOCHAT_DECODE=eager|compile|graph|compile+graph` overrides (graph only on CUDA)."""
        forced = os.environ.get("NANOCHAT_DECODE", "").strip().lower()
        if forced:
            if forced not in POLICIES or (POLICIES[forced][1] and device.type != "cuda"):
                raise UserError(f"NANOCHAT_DECODE={forced!r} is not one of {', '.join(POLICIES)} "
                                f"(graph modes need CUDA)")
            return DecodePolicy(*POLICIES[forced])
        if device.type == "cuda":
            return DecodePolicy(compile=True, graph=True)
        return DecodePolicy(compile=planned_steps >= COMPILE_FROM_STEPS)


class Decoder:
    """A KV cache of `slots` rows with the fixed buffers and the steps that decode them.

    Callers fill `tokens`, `uniform`, the sampling settings and `active` for rows 0..rows-1 (through the setters,
    which copy only what changed), then call `step`, which returns the sampled ids (rows,) on the device.
    """

    def __init__(self, model, slots: int, max_seq_len: int, dtype: torch.dtype, policy: DecodePolicy):
        c = model.config
        device = next(model.parameters()).device
        if policy.graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, not {device.type}")
        self.model, self.policy, self.slots = model, policy, slots
        if device.type == "cpu":
            keep_freed_memory()
        self.cache = KVCache(slots, c.n_layer, c.n_kv_head, c.head_dim, max_seq_len, device, dtype)
        if c.smear:  # allocated here, a normal tensor, not lazily inside an inference-mode step (see step)
            self.cache.previous_embeddings(slice(0, slots), c.n_embd, dtype)
        self.vocab_size = c.vocab_size
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.out = torch.zeros(slots, dtype=torch.long, device=device)
        self.uniform = torch.zeros(slots, device=device)
        self.temperature = torch.zeros(slots, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self._host: dict[str, list] = {"tokens": [0] * slots}  # what the buffers hold, as last set from the host
        # every key built so far; on CUDA its graph's replay, else None (eager and compiled steps run directly)
        self._steps: dict[tuple[int, int, int], Callable[[], None] | None] = {}
        self._run = torch.compile(self._step, dynamic=None) if policy.compile else self._step
        # eager steps and compiled CPU ones read the cache exactly as far as the rows need, and take the unmasked
        # and shared-prompt forms (a compiled step marks the read length and the shared count dynamic once they
        # change); CUDA's compiled steps read in buckets, with the mask (see read_length)
        self.exact = not policy.graph and (not policy.compile or device.type == "cpu")
        self._pool = None  # one CUDA graph memory pool for every bucket (steps never run concurrently)
        self.captured: set[tuple[int, int, int]] = set()  # keys whose step replays a CUDA graph
        # with CUDA graphs: the keys whose capture failed (and why), and how many steps ran uncaptured because of it,
        # for the callers that must not time or serve them silently (bench.inference, the server)
        self.capture_failures: dict[tuple[int, int, int], str] = {}
        self.uncaptured_steps = 0

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    def read_length(self, n: int) -> int:
        """How far a step reads the cache to see n positions: a bucket for CUDA graphs (one capture per key), n
        rounded up to 16 for CUDA's compiled steps (fewer shapes to compile), exactly n for eager ones and CPU
        compiled ones (a CPU step's attention costs what it reads, and an exact read of rows of one length needs no
        mask: `step`'s aligned)."""
        if self.policy.graph:
            return read_bucket(n, self.max_seq_len)
        return n if self.exact else min(-(-n // 16) * 16, self.max_seq_len)

    def read_for(self, lengths: set[int]) -> tuple[int, bool]:
        """(read_length, aligned) of a step whose taking-part rows hold these lengths: aligned when they all hold
        one length and the read is exactly that plus the new token, so attention needs no mask (see `step`)."""
        read = self.read_length(max(lengths) + 1)
        # CUDA's steps never take the unmasked form: it would be a second graph of each step for a few steps
        return read, self.exact and len(lengths) == 1 and read == max(lengths) + 1

    @property
    def built_steps(self) -> list[tuple[int, int, int]]:
        """The (rows, read_length, candidates) keys whose steps were built (captured, on CUDA) so far."""
        return list(self._steps)

    # --- inputs -------------------------------------------------------------------------------------------------------

    def _set(self, name: str, values: list) -> None:
        if self._host.get(name) != values:
            buffer = getattr(self, name)
            buffer[:len(values)].copy_(torch.tensor(values, dtype=buffer.dtype), non_blocking=True)
            self._host[name] = list(values)

    def set_sampling(self, settings: list[tuple[float, int | None, float]]) -> None:
        """(temperature, top_k, top_p) of rows 0..len-1; top_k None or 0 = no top-k."""
        self._set("temperature", [float(t) for t, _, _ in settings])
        self._set("top_k", [int(k or 0) for _, k, _ in settings])
        self._set("top_p", [float(p) for _, _, p in settings])

    def set_active(self, active: list[bool]) -> None:
        self._set("active", list(active))

    def feed(self, tokens: dict[int, int]) -> None:
        """Input tokens of the given rows. A step leaves its sampled ids there, so this copies to the device only
        when a row's token differs (a forced tool token, a row that moved, a first token sampled after prefill)."""
        held = self._host["tokens"]
        if any(held[row] != token for row, token in tokens.items()):
            new = list(held)
            for row, token in tokens.items():
                new[row] = token
            self._set("tokens", new)

    def sampled(self, ids: list[int]) -> None:
        """Record that the last step left `ids` in tokens[:len(ids)], keeping the host's view of the buffer right."""
        self._host["tokens"][:len(ids)] = ids

    # --- steps --------------------------------------------------------------------------------------------------------

    def _step(self, rows: int, read_length: int, candidates: int, aligned: bool = False, shared: int = 0) -> None:
        view = StaticRows(self.cache, rows, read_length, self.active[:rows], aligned, shared)
        # (rows, V) fp32, before the soft-cap: the sampler caps only the candidates it looks at
        logits = self.model(self.tokens[:rows, None], kv_cache=view, last_only=True, capped=False)[:, -1]
        ids = sample_tokens(logits, self.temperature[:rows], self.top_k[:rows], self.top_p[:rows],
                            self.uniform[:rows], candidates, softcap=SOFTCAP)
        self.out[:rows].copy_(ids)
        self.tokens[:rows].copy_(ids)

    def _capture(self, key: tuple[int, int, int]) -> Callable[[], None]:
        """The step of `key` as a CUDA graph's replay; a step that cannot be captured runs uncaptured (correct, only
        slower), with a warning, and is recorded in `capture_failures`."""
        try:
            replay = self._graph_of(key)
        except RuntimeError as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            self.capture_failures[key] = reason
            warnings.warn(f"decode step {key} could not be captured as a CUDA graph, it runs uncaptured: {reason}")
            return lambda: self._run(*key)
        self.captured.add(key)
        return replay

    def _graph_of(self, key: tuple[int, int, int]) -> Callable[[], None]:
        """Warm the step up on a side stream with every row sitting out (so the cache is left as it was: rows that
        sit out write only to its spare position), then capture it into a CUDA graph; returns its replay."""
        saved = {name: getattr(self, name).clone() for name in ("tokens", "out", "active")}
        self.active.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # the first runs compile (with policy.compile) and pick kernels
                self._run(*key)
        torch.cuda.current_stream().wait_stream(stream)
        for name, value in saved.items():
            getattr(self, name).copy_(value)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (another GPU's scheduler) may keep using CUDA while this one captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._run(*key)
        self._pool = graph.pool()
        return graph.replay

    def _graph_step(self, key: tuple[int, int, int]) -> Callable[[], None]:
        """The replay of `key`'s step, captured on first use on the cache's device (the server runs one scheduler
        thread per GPU, whose current device is otherwise cuda:0)."""
        with torch.cuda.device(self.cache.k.device):
            run = self._steps.get(key)
            if run is None:
                run = self._steps[key] = self._capture(key)
        return run

    @torch.inference_mode()
    def check_capture(self) -> str | None:
        """Capture the one-row greedy step now (what a server does at start): None when it is a CUDA graph or the
        policy captures nothing, else why the capture failed, so the caller can say so once, up front."""
        if not self.policy.graph:
            return None
        key = (1, self.read_length(1), 0)
        self._graph_step(key)
        return self.capture_failures.get(key)

    @torch.inference_mode()  # not just no_grad: no view or version-counter bookkeeping (+15% at batch 1 on a CPU)
    def step(self, rows: int, read_length: int, candidates: int, aligned: bool = False,
             shared: int = 0) -> torch.Tensor:
        """One token for each active row of 0..rows-1 (rows a bucket, read_length ≥ every active row's length + 1;
        see rows_bucket, read_bucket, sampler_candidates) → the sampled ids (rows,), on the device.

        `aligned`: the caller knows every active row holds exactly read_length - 1 tokens, so attention runs
        without a mask (StaticRows). Eager and compiled steps only: a captured graph always masks, so that rows of
        any lengths replay the same graph. `shared` (with aligned; eager and compiled CPU steps, `exact`):
        positions 0..shared-1 hold the same keys and values in every row (the samples of one prompt), so attention
        reads them once."""
        if not 0 < read_length <= self.cache.max_seq_len:
            raise ValueError(f"read_length {read_length} is outside 1..{self.cache.max_seq_len}")
        key = (rows, read_length, candidates)
        if not self.policy.graph:
            self._steps.setdefault(key, None)
            self._run(*key, aligned, shared if self.exact else 0)
            return self.out[:rows]
        # CUDA graphs are captured and replayed on the current device's streams: make that the cache's device
        run = self._graph_step(key)
        if key not in self.captured:
            self.uncaptured_steps += 1
        with torch.cuda.device(self.cache.k.device):
            run()
        return self.out[:rows]
