"""Continuous batching for the server: many independent requests share one model and one KV cache.

Each request gets a cache slot; a finished request frees its slot for a waiting one while the others keep decoding.
One thread runs the loop (`BatchScheduler`); callers submit `Request`s and read their events. Decoding goes through
the engine's static decode steps (nanochat/decode.py): the active slots are kept in the lowest rows, so a step runs
on the smallest batch-size bucket that holds them, and joining or leaving never recaptures a step.

Prefix reuse: a request's prompt, once prefilled, and its whole sequence, once finished, are kept in a
`PrefixCache` (nanochat/kv_cache.py); a later request that starts with the same tokens (the next turn of the
conversation, a shared system prompt, another sample of the prompt) gets them copied into its slot when its prefill
begins and prefills only the rest. Nothing of it runs per decoded token.
"""

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from nanochat.common import UserError
from nanochat.decode import DecodePolicy, rows_bucket
from nanochat.engine import Engine, SequenceState, run_tool
from nanochat.kv_cache import PrefixCache
from nanochat.sampling import sample_tokens, sampler_candidates


PREFIX_BLOCK = 16  # positions per block of the prefix cache: what a prefix is matched and kept in


class PromptTooLong(ValueError):
    """The conversation does not fit in the model's context."""


@dataclass
class Request:
    """One generation request. The scheduler puts ("token", id, mask) events, then ("done", reason) with reason
    "stop", "length", "cancelled", "shutdown" or "error: …", into `events` (anything with a thread-safe `put`)."""
    tokens: list[int]
    max_tokens: int
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float = 1.0
    seed: int = 0
    events: Any = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finish_reason: str | None = None
    wakeup: threading.Event | None = None  # the scheduler's, so a cancel is noticed at once

    def cancel(self) -> None:
        self.cancelled.set()
        if self.wakeup is not None:
            self.wakeup.set()

    def stream(self, timeout: float | None = None) -> Iterator[tuple[int, int]]:
        """(token, mask) as they are produced, until the request finishes (for a `queue.Queue` of events)."""
        while True:
            event = self.events.get(timeout=timeout)
            if event[0] == "done":
                self.finish_reason = event[1]
                return
            yield event[1], event[2]


@dataclass
class Slot:
    """A request being served in one row of the scheduler's KV cache."""
    request: Request
    state: SequenceState
    generator: torch.Generator  # the request's own RNG stream: its samples do not depend on its neighbours
    prefilled: int = 0  # prompt tokens already in the cache
    sequence: list[int] = field(default_factory=list)  # prompt + tokens taken; the cache holds its first `length`
    length: int = 0  # tokens in the cache
    pending: int | None = None  # the token to feed next, once the prompt is in
    tool: Future | None = None  # a running tool call; the slot sits out decode steps until it returns


class BatchScheduler:
    """Owns the model and a KV cache of `slots` rows; requests join when a slot is free and leave when finished.

    One thread runs the loop: admit waiting requests into free slots, prefill at most `prefill_chunk` prompt
    tokens (so a long prompt never stalls the others for long), then one decode step for every ready slot
    together. Tool calls run on a small thread pool while their slot waits; everyone else keeps decoding.
    The model's device and `dtype` (the caller's compute dtype, `compute.dtype`) are used as `Engine` uses them.
    `prefix_cache`: memory kept for reusable prefixes, as a fraction of the slots' KV cache (0: no reuse).
    """

    def __init__(self, model, tokenizer, slots: int = 8, max_seq_len: int | None = None,
                 use_tools: bool = True, prefill_chunk: int = 512,
                 dtype: torch.dtype | None = None, policy: DecodePolicy | None = None, prefix_cache: float = 0.5):
        self.engine = Engine(model, tokenizer, use_tools, dtype, policy)
        self.tools = self.engine.tools
        self.max_seq_len = min(max_seq_len or model.config.sequence_len, self.engine.max_context)
        self.vocab_size = model.config.vocab_size
        self.decoder = self.engine.new_decoder(slots, self.max_seq_len)
        self.cache = self.decoder.cache
        blocks = int(prefix_cache * slots * self.max_seq_len) // PREFIX_BLOCK
        if prefix_cache < 0 or (prefix_cache > 0 and blocks < 1):
            raise UserError(f"--prefix-cache {prefix_cache} must be 0 (off) or at least one block of {PREFIX_BLOCK} "
                            f"positions ({PREFIX_BLOCK / (slots * self.max_seq_len):.4f} with these slots)")
        self.prefixes = PrefixCache(self.cache, blocks, PREFIX_BLOCK) if blocks else None
        self.prefill_chunk = prefill_chunk
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: dict[int, Slot] = {}
        self.free = list(range(slots))
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "tokens": 0, "tool_calls": 0}
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.stopping = False
        self.tool_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tool")
        self.thread = threading.Thread(target=self._loop, daemon=True, name="batch-scheduler")
        self.thread.start()

    def submit(self, request: Request) -> Request:
        """Queue a request; raises PromptTooLong when it leaves no room to generate."""
        if not request.tokens or not all(0 <= t < self.vocab_size for t in request.tokens):
            raise ValueError("a request needs at least one prompt token, all within the vocabulary")
        budget = self.max_seq_len - len(request.tokens)
        if budget < 1:
            raise PromptTooLong(f"the conversation is {len(request.tokens)} tokens, over the model's context of "
                                f"{self.max_seq_len}: start a new conversation")
        request.max_tokens = max(1, min(request.max_tokens, budget))
        request.wakeup = self.wakeup
        with self.lock:
            self.stats["requests"] += 1
        self.waiting.put(request)
        self.wakeup.set()
        return request

    def status(self) -> dict:
        with self.lock:
            stats = dict(self.stats)
            active = list(self.active.values())
        prefixes = self.prefixes.stats() if self.prefixes is not None else None
        return dict(stats, active=len(active), waiting=self.waiting.qsize(), slots=self.cache.batch_size,
                    free_slots=self.cache.batch_size - len(active),
                    prefilling=sum(s.prefilled < len(s.request.tokens) for s in active), in_tool=sum(s.tool is not None for s in active),
                    prefix_cache=prefixes)

    def shutdown(self) -> None:
        self.stopping = True
        self.wakeup.set()
        self.thread.join(timeout=30)
        self.tool_pool.shutdown(wait=False, cancel_futures=True)

    # --- the loop (one thread) ---------------------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def _finish(self, slot: int, reason: str) -> None:
        if self.prefixes is not None and not reason.startswith("error"):  # an error may leave the row half-written
            s = self.active[slot]
            self.prefixes.store(s.sequence[:s.length], slot)
        with self.lock:
            request = self.active.pop(slot).request
            self.free.append(slot)
        self.cache.reset([slot])
        self._count("cancelled" if reason == "cancelled" else "errors" if reason.startswith("error") else "completed")
        request.events.put(("done", reason))

    def _admit(self) -> None:
        while self.free and not self.waiting.empty():
            request = self.waiting.get()
            if request.cancelled.is_set():
                self._count("cancelled")
                request.events.put(("done", "cancelled"))
                continue
            # CPU generator: one tiny draw per row per step, no device launch; any int works as a seed
            generator = torch.Generator().manual_seed(request.seed % 2 ** 63)
            with self.lock:
                slot = min(self.free)
                self.free.remove(slot)
                self.active[slot] = Slot(request, self.tools.initial_state(request.tokens), generator,
                                         sequence=list(request.tokens))
            self.cache.reset([slot])

    def _compact(self) -> None:
        """Move the highest active slots down into freed ones, so that the active requests are the lowest rows of
        the cache and a decode step runs on the smallest batch-size bucket that holds them."""
        while self.active and self.free and min(self.free) < max(self.active):
            low, high = min(self.free), max(self.active)
            self.cache.copy_slot(high, [low], length=self.active[high].length)
            with self.lock:
                self.active[low] = self.active.pop(high)
                self.free.remove(low)
                self.free.append(high)
            self.cache.reset([high])

    def _poll(self) -> None:
        """Drop cancelled requests; hand finished tool calls back to their sequences."""
        for slot, s in list(self.active.items()):
            if s.request.cancelled.is_set():
                self._finish(slot, "cancelled")
            elif s.tool is not None and s.tool.done():
                try:
                    output = s.tool.result()
                except Exception as e:  # the sandbox itself failed: tell the model, as a tool error would
                    output = f"Error: {type(e).__name__}"
                self.tools.finish_tool_call(s.state, output)
                s.tool = None

    def _take(self, slot: int, s: Slot, sampled: int) -> None:
        """The slot's next token (the sampled one, or a forced one): stream it, then finish or feed it next."""
        token, mask = self.tools.next_token(s.state, sampled)
        self.tools.advance(s.state, token, mask)
        s.sequence.append(token)
        s.request.events.put(("token", token, mask))
        self._count("tokens")
        if s.state.done:
            self._finish(slot, "stop")
        elif s.state.generated >= s.request.max_tokens:
            self._finish(slot, "length")
        else:
            if s.state.tool_call is not None:
                self._count("tool_calls")
                s.tool = self.tool_pool.submit(run_tool, s.state.tool_call, self.tools.tool_timeout)
                s.tool.add_done_callback(lambda _: self.wakeup.set())
            s.pending = token

    def _sample_first(self, slot: int, s: Slot, logits: torch.Tensor) -> None:
        """The first token of a request, from its prompt's last logits (V,), with the request's first draw."""
        r, device = s.request, self.engine.device
        candidates = sampler_candidates([(r.temperature, r.top_k)], self.vocab_size)
        token = sample_tokens(logits[None], torch.tensor([float(r.temperature)], device=device),
                              torch.tensor([int(r.top_k or 0)], device=device),
                              torch.tensor([float(r.top_p)], device=device),
                              torch.rand(1, generator=s.generator).to(device), candidates)
        self._take(slot, s, int(token[0]))

    def _reuse(self, slot: int, tokens: list[int]) -> int:
        """Copy the longest kept prefix of the prompt into the slot; how many of its tokens that covers."""
        n = self.prefixes.load(tokens, slot)
        if n and self.cache.prev_embedding is not None:
            # a model with smear adds the previous token's embedding to the next one: the embedding of the last
            # token copied in, as GPT._forward computes it (normalised, in the compute dtype)
            last = torch.tensor([[tokens[n - 1]]], device=self.engine.device)
            self.cache.remember_embeddings(slice(slot, slot + 1), self.engine.model.embed(last, self.engine.dtype)[0])
        return n

    @torch.no_grad()
    def _prefill(self) -> bool:
        """Feed up to `prefill_chunk` prompt tokens of newly admitted requests into their cache rows; a request
        whose prompt is all in samples its first token."""
        budget = self.prefill_chunk
        for slot, s in list(self.active.items()):
            tokens = s.request.tokens
            if s.prefilled == len(tokens):
                continue
            if budget <= 0:
                break
            try:
                if s.prefilled == 0 and self.prefixes is not None:
                    s.prefilled = s.length = self._reuse(slot, tokens)
                end = min(len(tokens), s.prefilled + budget)
                x = torch.tensor([tokens[s.prefilled:end]], device=self.engine.device)
                logits = self.engine.forward_last(x, self.cache, [slot])[0]
            except Exception as e:  # fail this request only
                self._finish(slot, f"error: {type(e).__name__}: {e}")
                continue
            budget -= end - s.prefilled
            s.prefilled = s.length = end
            if end == len(tokens):
                self._sample_first(slot, s, logits)
                # kept now, not only when the request ends, so that another sample of the prompt reuses it (a
                # request that already ended was kept whole by _finish)
                if self.prefixes is not None and slot in self.active:
                    self.prefixes.store(tokens, slot)
        return budget < self.prefill_chunk

    @torch.no_grad()
    def _decode(self) -> bool:
        """One static decode step for every ready slot (its prompt in, no tool call running), then stream."""
        ready = sorted(((slot, s) for slot, s in self.active.items() if s.pending is not None and s.tool is None),
                       key=lambda item: item[0])
        if not ready:
            return False
        decoder = self.decoder
        rows = rows_bucket(ready[-1][0] + 1, decoder.slots)
        settings = [(0.0, 0, 1.0)] * rows  # rows of free slots: greedy, never read
        for slot, s in self.active.items():
            if slot < rows:
                settings[slot] = (s.request.temperature, s.request.top_k, s.request.top_p)
        decoder.set_sampling(settings)
        decoder.feed({slot: s.pending for slot, s in ready})
        ready_slots = {slot for slot, _ in ready}
        decoder.set_active([slot in ready_slots for slot in range(decoder.slots)])
        uniform = [0.0] * rows
        for slot, s in ready:  # each request's own RNG stream: one draw per token it generates
            uniform[slot] = float(torch.rand(1, generator=s.generator))
        decoder.uniform[:rows].copy_(torch.tensor(uniform))
        candidates = sampler_candidates([(s.request.temperature, s.request.top_k) for _, s in ready],
                                        self.vocab_size)
        read_length, aligned = decoder.read_for({s.length for _, s in ready})
        try:
            ids = decoder.step(rows, read_length, candidates, aligned).tolist()
        except Exception as e:  # cannot tell whose fault: fail the requests of this step, keep serving
            for slot, _ in ready:
                self._finish(slot, f"error: {type(e).__name__}: {e}")
            return True
        decoder.sampled(ids)
        for slot, s in ready:
            s.length += 1
            s.pending = None
            self._take(slot, s, ids[slot])
        return True

    def _loop(self) -> None:
        while not self.stopping:
            self.wakeup.clear()  # before looking for work, so a submit/cancel/tool result in between is not lost
            try:
                self._poll()
                self._compact()
                self._admit()
                busy = self._prefill()
                busy = self._decode() or busy
            except Exception as e:  # a bug of ours: fail what is in flight, keep the server up
                for slot in list(self.active):
                    self._finish(slot, f"error: {type(e).__name__}: {e}")
                busy = False
            if not busy:
                self.wakeup.wait(timeout=0.5)
        for slot in list(self.active):
            self._finish(slot, "shutdown")
        while not self.waiting.empty():
            self.waiting.get().events.put(("done", "shutdown"))
