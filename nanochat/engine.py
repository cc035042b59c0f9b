"""Inference: KV-cached sampling with Python tool use, for one prompt (many samples) or many requests at once.

`Engine.generate` prefills a prompt once and samples `num_samples` continuations from it, token by token.
`BatchScheduler` serves many independent requests with continuous batching: each request has a cache slot; a
finished request frees its slot for a waiting one while the others keep decoding.

Tool use is a small state machine per sequence: after <|python_start|> the tokens up to <|python_end|> are run in
the sandbox and <|output_start|> + the output + <|output_end|> are forced into that sequence (mask 0: the tool, not
the model, wrote them; RL leaves them out of the loss).
"""

import ast
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from nanochat.execution import execute_code
from nanochat.kv_cache import KVCache

TOOL_OUTPUT_LIMIT = 200  # characters of tool output written back into the context


def tool_program(code: str) -> str:
    """Make a calculator-style snippet print its value: `12*3` runs as `print(12*3)` (integral floats as ints)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.unparse(tree.body[-1])
        head = ast.unparse(ast.Module(body=tree.body[:-1], type_ignores=[]))
        return (f"{head}\n__value = ({last})\n"
                "print(int(__value) if isinstance(__value, float) and __value.is_integer() else __value)")
    return code


def run_tool(code: str, timeout: float = 3.0) -> str:
    result = execute_code(tool_program(code), timeout=timeout)
    text = result.stdout.strip() if result.success else f"Error: {result.error}"
    return text[:TOOL_OUTPUT_LIMIT]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) → token ids (B,); each row is its own draw. temperature 0 = greedy; top_k None or 0 = all;
    top_p < 1 keeps the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if top_k:
        k = min(top_k, logits.size(-1))
        values, indices = torch.topk(logits, k, dim=-1)
        probs = torch.softmax(values, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)
        return indices.gather(-1, choice).squeeze(-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class SequenceState:
    """Where one sequence is: its tokens, tool-call progress and tokens waiting to be forced in."""
    forced: deque = field(default_factory=deque)
    python: list | None = None  # tokens of an open <|python_start|> call
    done: bool = False
    generated: int = 0


class ToolStateMachine:
    """Advances a SequenceState with each token; runs tool calls and queues their forced output tokens."""

    def __init__(self, tokenizer, use_tools: bool = True, tool_timeout: float = 3.0):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stops = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.use_tools, self.tool_timeout = use_tools, tool_timeout

    def initial_state(self, prompt: list[int]) -> SequenceState:
        """A prompt may end inside a tool call (<|python_start|> without its end): continue collecting it."""
        state = SequenceState()
        for i in range(len(prompt) - 1, -1, -1):
            if prompt[i] == self.python_end:
                break
            if prompt[i] == self.python_start:
                state.python = list(prompt[i + 1:])
                break
        return state

    def next_token(self, state: SequenceState, sampled: int) -> tuple[int, int]:
        """(token, mask): a forced token (mask 0) when one is queued, else the sampled one (mask 1)."""
        if state.forced:
            return state.forced.popleft(), 0
        return sampled, 1

    def advance(self, state: SequenceState, token: int, mask: int) -> None:
        state.generated += 1
        if mask == 0:
            return
        if token in self.stops:
            state.done = True
        elif not self.use_tools:
            return
        elif token == self.python_start:
            state.python = []
        elif token == self.python_end and state.python is not None:
            output = run_tool(self.tokenizer.decode(state.python), self.tool_timeout)
            state.forced.extend([self.output_start, *self.tokenizer.encode(output), self.output_end])
            state.python = None
        elif state.python is not None:
            state.python.append(token)


class Engine:
    def __init__(self, model, tokenizer, autocast: Callable = nullcontext, use_tools: bool = True):
        self.model, self.tokenizer, self.autocast = model, tokenizer, autocast
        self.tools = ToolStateMachine(tokenizer, use_tools)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        c = self.model.config
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        return KVCache(batch_size, c.n_layer, c.n_kv_head, c.head_dim, max_seq_len, self.device, dtype)

    @torch.no_grad()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                 cancel: Callable[[], bool] | None = None) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, token_masks) per step: one token per sample (mask 0 = forced tool output)."""
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        limit = self.model.cos.size(1)
        max_tokens = max_tokens if max_tokens is not None else self.model.config.sequence_len
        max_tokens = max(0, min(max_tokens, limit - len(tokens)))
        if max_tokens == 0:
            return
        cache = self.new_cache(num_samples, len(tokens) + max_tokens)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with self.autocast():
            logits = self.model(torch.tensor([tokens], device=self.device), kv_cache=cache, slots=[0])[:, -1]
        cache.copy_slot(0, list(range(1, num_samples)))  # prefill once, sample many
        logits = logits.expand(num_samples, -1)
        states = [self.tools.initial_state(tokens) for _ in range(num_samples)]
        for _ in range(max_tokens):
            sampled = sample_next(logits.float(), temperature, top_k, generator).tolist()
            column, masks = [], []
            for state, s in zip(states, sampled):
                token, mask = self.tools.next_token(state, s)
                if not state.done:
                    self.tools.advance(state, token, mask)
                column.append(token)
                masks.append(mask)
            yield column, masks
            if all(s.done for s in states) or (cancel is not None and cancel()):
                return
            with self.autocast():
                logits = self.model(torch.tensor(column, device=self.device)[:, None], kv_cache=cache)[:, -1]

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]],
                                                                                        list[list[int]]]:
        """All samples to completion: (prompt + tokens up to and including the stop token, masks)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        finished = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if finished[i]:
                    continue
                results[i].append(token)
                masks[i].append(mask)
                if mask == 1 and token in self.tools.stops:
                    finished[i] = True
            if all(finished):
                break
        return results, masks


# ---------------------------------------------------------------------------------------------------------------------
# Continuous batching for the server

class TextStream:
    """Turns a growing token list into text deltas that never split a UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.emitted = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        delta, self.emitted = text[self.emitted:], len(text)
        return delta


@dataclass
class Request:
    tokens: list[int]
    max_tokens: int
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float = 1.0
    seed: int = 0
    events: queue.Queue = field(default_factory=queue.Queue)  # ("token", id, mask) … then ("done", reason)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def stream(self, timeout: float | None = None) -> Iterator[tuple[int, int]]:
        """(token, mask) as they are produced, until the request finishes."""
        while True:
            event = self.events.get(timeout=timeout)
            if event[0] == "done":
                self.finish_reason = event[1]
                return
            yield event[1], event[2]


class BatchScheduler:
    """Owns the model and a KV cache of `slots` rows; requests join when a slot is free and leave when finished."""

    def __init__(self, model, tokenizer, slots: int = 8, max_seq_len: int | None = None,
                 autocast: Callable = nullcontext, use_tools: bool = True):
        self.engine = Engine(model, tokenizer, autocast, use_tools)
        self.max_seq_len = max_seq_len or model.config.sequence_len
        self.cache = self.engine.new_cache(slots, self.max_seq_len)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: dict[int, tuple[Request, SequenceState, torch.Generator]] = {}
        self.free = list(range(slots))
        self.logits: dict[int, torch.Tensor] = {}
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "tokens": 0, "errors": 0}
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="batch-scheduler")
        self.thread.start()

    def submit(self, request: Request) -> Request:
        budget = self.max_seq_len - len(request.tokens)
        if budget < 1:
            raise ValueError(f"the conversation is {len(request.tokens)} tokens, over the model's context of "
                             f"{self.max_seq_len}: start a new conversation")
        request.max_tokens = min(request.max_tokens, budget)
        with self.lock:
            self.stats["requests"] += 1
        self.waiting.put(request)
        self.wakeup.set()
        return request

    def status(self) -> dict:
        with self.lock:
            return dict(self.stats, active=len(self.active), waiting=self.waiting.qsize(), free_slots=len(self.free),
                        slots=self.cache.batch_size)

    def shutdown(self) -> None:
        self.stopping = True
        self.wakeup.set()
        self.thread.join(timeout=10)

    # --- the loop (one thread) -----------------------------------------------------------------------------------------

    def _finish(self, slot: int, reason: str) -> None:
        request, _, _ = self.active.pop(slot)
        self.logits.pop(slot, None)
        self.cache.reset([slot])
        self.free.append(slot)
        with self.lock:
            self.stats["cancelled" if reason == "cancelled" else "completed"] += 1
        request.events.put(("done", reason))

    @torch.no_grad()
    def _admit(self) -> None:
        engine = self.engine
        while self.free and not self.waiting.empty():
            request = self.waiting.get()
            if request.cancelled.is_set():
                request.events.put(("done", "cancelled"))
                continue
            slot = self.free.pop()
            self.cache.reset([slot])
            generator = torch.Generator(device=engine.device).manual_seed(request.seed)
            self.active[slot] = (request, engine.tools.initial_state(request.tokens), generator)
            with engine.autocast():
                x = torch.tensor([request.tokens], device=engine.device)
                self.logits[slot] = engine.model(x, kv_cache=self.cache, slots=[slot])[0, -1].float()

    @torch.no_grad()
    def _step(self) -> None:
        engine, tools = self.engine, self.engine.tools
        slots, column = [], []
        for slot, (request, state, generator) in list(self.active.items()):
            if request.cancelled.is_set():
                self._finish(slot, "cancelled")
                continue
            sampled = int(sample_next(self.logits[slot][None], request.temperature, request.top_k, generator,
                                      request.top_p)[0])
            token, mask = tools.next_token(state, sampled)
            tools.advance(state, token, mask)
            request.events.put(("token", token, mask))
            with self.lock:
                self.stats["tokens"] += 1
            if state.done:
                self._finish(slot, "stop")
            elif state.generated >= request.max_tokens:
                self._finish(slot, "length")
            else:
                slots.append(slot)
                column.append(token)
        if slots:
            with engine.autocast():
                x = torch.tensor(column, device=engine.device)[:, None]
                logits = engine.model(x, kv_cache=self.cache, slots=slots)[:, -1].float()
            for i, slot in enumerate(slots):
                self.logits[slot] = logits[i]

    def _loop(self) -> None:
        while not self.stopping:
            if not self.active and self.waiting.empty():
                self.wakeup.wait(timeout=0.5)
                self.wakeup.clear()
                continue
            try:
                self._admit()
                self._step()
            except Exception as e:  # never let one bad request kill the server: fail the active ones, go on
                with self.lock:
                    self.stats["errors"] += 1
                for slot in list(self.active):
                    request = self.active[slot][0]
                    request.events.put(("done", f"error: {type(e).__name__}: {e}"))
                    self.active.pop(slot)
                    self.logits.pop(slot, None)
                    self.cache.reset([slot])
                    self.free.append(slot)
