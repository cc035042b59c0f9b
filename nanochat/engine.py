"""Inference: KV-cached sampling with Python tool use.

`Engine.generate` prefills a prompt once and samples `num_samples` continuations from it, token by token (evaluation,
RL rollouts, the CLI). The server's many concurrent requests go through
`nanochat.serving.scheduler.BatchScheduler`, built on the same pieces: the engine's inference weights (cast once to
the inference dtype) and static decode steps (nanochat/decode.py), one device-to-host copy of the new tokens per step.

Tool use is a small state machine per sequence: after <|python_start|> the tokens up to <|python_end|> are run in
the sandbox and <|output_start|> + the output + <|output_end|> are forced into that sequence (mask 0: the tool, not
the model, wrote them; RL leaves them out of the loss).
"""

import ast
import copy
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from nanochat.common import get_compute_dtype
from nanochat.decode import Decoder, DecodePolicy, rows_bucket
from nanochat.sandbox.execution import execute_code
from nanochat.kv_cache import KVCache
from nanochat.sampling import sample_tokens, sampler_candidates, sampling_params  # noqa: F401 (re-exported)

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
    """The output the model sees for its call: stdout, or "Error: ..." for whatever went wrong. It never raises: the
    code is the model's, and a failure while preparing or running it (`ast` recursing too deep on `1+1+…+1` in this
    process, a sandbox that cannot start) must end that call, not the chat, eval or RL run around it."""
    try:
        result = execute_code(tool_program(code), timeout=timeout)
        text = result.stdout.strip() if result.success else f"Error: {result.error}"
    except Exception as e:
        text = f"Error: the tool call could not run: {type(e).__name__}: {e}"
    return text[:TOOL_OUTPUT_LIMIT]


# ---------------------------------------------------------------------------------------------------------------------
# Tool use

@dataclass
class SequenceState:
    """Where one sequence is: its tool-call progress and the tokens waiting to be forced in."""
    forced: deque = field(default_factory=deque)
    python: list | None = None  # tokens of an open <|python_start|> call
    tool_call: str | None = None  # code of a call that just closed and still has to run
    done: bool = False
    generated: int = 0


class ToolStateMachine:
    """Advances a SequenceState with each token. A closed call is left in `state.tool_call` for the caller to run
    (inline in `Engine`, on a thread pool in `BatchScheduler`); `finish_tool_call` queues its forced output."""

    def __init__(self, tokenizer, use_tools: bool = True, tool_timeout: float = 3.0):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stops = tokenizer.stop_tokens()
        self.use_tools, self.tool_timeout = use_tools, tool_timeout

    def initial_state(self, prompt: list[int]) -> SequenceState:
        """A prompt may end inside a tool call (<|python_start|> without its end): continue collecting it."""
        state = SequenceState()
        if not self.use_tools:
            return state
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
            state.tool_call = self.tokenizer.decode(state.python)
            state.python = None
        elif state.python is not None:
            state.python.append(token)

    def run_tool_call(self, state: SequenceState) -> None:
        """Run the pending call now and queue its output."""
        self.finish_tool_call(state, run_tool(state.tool_call, self.tool_timeout))

    def run_tool_calls(self, states: list[SequenceState]) -> None:
        """Run the pending calls of several sequences at once (each in its own sandbox process)."""
        pending = [s for s in states if s.tool_call is not None]
        if len(pending) == 1:
            self.run_tool_call(pending[0])
        elif pending:
            with ThreadPoolExecutor(max_workers=min(len(pending), 8)) as pool:
                list(pool.map(self.run_tool_call, pending))

    def finish_tool_call(self, state: SequenceState, output: str) -> None:
        state.forced.extend([self.output_start, *self.tokenizer.encode(output), self.output_end])
        state.tool_call = None


# ---------------------------------------------------------------------------------------------------------------------
# Inference weights

def cast_for_inference(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model itself when its parameters are already `dtype`, else a copy with every floating parameter cast
    once (buffers such as the rotary tables stay fp32; the model casts them where it uses them)."""
    if all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        return model
    inference = copy.deepcopy(model).eval()
    for p in inference.parameters():
        p.grad = None
        p.requires_grad_(False)
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return inference


# ---------------------------------------------------------------------------------------------------------------------
# One prompt, many samples

class Engine:
    """Sampling from one model for one prompt at a time (evaluation, RL rollouts, the CLI); the server's many
    concurrent requests go through `nanochat.serving.scheduler.BatchScheduler` instead.

    The engine runs on the model's device. Its weights and KV cache are in `dtype`, the caller's compute dtype
    (`compute.dtype` from `compute_init`; when not given, the same default, `common.get_compute_dtype`): a copy
    of the weights cast once when the model is in another dtype (RL trains the fp32 model between rollouts, and
    the copy follows it, see `_refresh_weights`). Cast once rather than under autocast at every step, bf16 decodes
    faster on CPUs too; nothing runs under autocast. The KV cache, the decode buffers and their
    CUDA graphs live as long as the engine and grow when a call needs more samples or a longer context.
    """

    def __init__(self, model, tokenizer, use_tools: bool = True, dtype: torch.dtype | None = None,
                 policy: DecodePolicy | None = None):
        self.source, self.tokenizer = model, tokenizer
        device = next(model.parameters()).device
        self.dtype = dtype or get_compute_dtype(device.type)
        self.model = cast_for_inference(model, self.dtype)
        self._versions = self._source_versions()
        self.policy = policy or DecodePolicy.for_device(device)
        self.tools = ToolStateMachine(tokenizer, use_tools)
        self.decoder: Decoder | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        """Longest sequence the model can be run on (its rotary tables have headroom past the training context)."""
        return self.model.cos.size(1)

    def _source_versions(self) -> list[int]:
        return [p._version for p in self.source.parameters()]

    def _refresh_weights(self) -> None:
        """Copy the caller's parameters into the cast copy again when any changed in place since (an optimizer
        step bumps their version counters); in place, so captured CUDA graphs keep reading the right memory."""
        if self.model is self.source:
            return
        versions = self._source_versions()
        if versions != self._versions:
            with torch.no_grad():
                for dst, src in zip(self.model.parameters(), self.source.parameters()):
                    dst.copy_(src)
            self._versions = versions

    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        c = self.model.config
        return KVCache(batch_size, c.n_layer, c.n_kv_head, c.head_dim, max_seq_len, self.device, self.dtype)

    def new_decoder(self, slots: int, max_seq_len: int) -> Decoder:
        return Decoder(self.model, slots, max_seq_len, self.dtype, self.policy)

    def _decoder_for(self, rows: int, length: int) -> Decoder:
        """The engine's decoder, replaced by a larger one when this call needs more rows or positions."""
        d = self.decoder
        if d is None or d.slots < rows or d.max_seq_len < length:
            slots = max(rows, d.slots if d else 0)
            seq = max(length, min(self.model.config.sequence_len, self.max_context), d.max_seq_len if d else 0)
            self.decoder = None  # free the old cache and graphs first
            self.decoder = self.new_decoder(slots, seq)
        return self.decoder

    def forward_last(self, tokens: torch.Tensor, cache: KVCache, slots: list[int]) -> torch.Tensor:
        """tokens (B, T) appended to cache rows `slots` → next-token logits (B, V), fp32 (the prefill)."""
        return self.model(tokens, kv_cache=cache, slots=slots, last_only=True)[:, -1].float()

    @torch.no_grad()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42, top_p: float = 1.0,
                 cancel: Callable[[], bool] | None = None) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, token_masks) per step: one token per sample, mask 1 = sampled, 0 = forced.

        The prompt is prefilled once and its cache copied to every sample; then each step is one static decode
        step over the samples' bucket of rows. A sample that finished (stop token) sits out the steps (and the
        live samples move down into a smaller bucket once they fit one): until the others finish its column entry
        repeats its last token with mask 0.
        """
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        max_tokens = max_tokens if max_tokens is not None else self.model.config.sequence_len
        max_tokens = max(0, min(max_tokens, self.max_context - len(tokens)))
        if max_tokens == 0:
            return
        self._refresh_weights()
        device, n, start = self.device, num_samples, len(tokens)
        decoder = self._decoder_for(n, start + max_tokens)
        cache = decoder.cache
        cache.reset()
        generator = torch.Generator(device=device).manual_seed(seed)
        logits = self.forward_last(torch.tensor([tokens], device=device), cache, [0])  # (1, V)
        cache.copy_slot(0, list(range(1, n)), length=start)  # prefill once, sample many
        candidates = sampler_candidates([(temperature, top_k)], self.model.config.vocab_size)
        rows = rows_bucket(n, decoder.slots)
        decoder.set_sampling([(temperature, top_k, top_p)] * rows)
        uniform = torch.rand(n, generator=generator, device=device)  # one draw per sample per step, always
        sampled = sample_tokens(logits.expand(n, -1), decoder.temperature[:n], decoder.top_k[:n], decoder.top_p[:n],
                                uniform, candidates).tolist()  # indexed by row; row i holds sample i until moved
        states = [self.tools.initial_state(tokens) for _ in range(n)]
        row_of = list(range(n))  # each sample's cache row
        perm = None  # sample of each row, on the device, once samples have moved (None: row r holds sample r)
        live = list(range(n))  # samples still generating
        column = [tokens[-1]] * n
        for step in range(max_tokens):
            masks = [0] * n
            for i in live:
                token, mask = self.tools.next_token(states[i], sampled[row_of[i]])
                self.tools.advance(states[i], token, mask)
                column[i], masks[i] = token, mask
            yield list(column), masks
            live = [i for i in live if not states[i].done]
            if not live or step == max_tokens - 1 or (cancel is not None and cancel()):
                return
            self.tools.run_tool_calls([states[i] for i in live])
            held = start + step  # tokens each live sample's row holds; this step appends one more
            if rows_bucket(len(live), decoder.slots) < rows:  # move the live samples down into a smaller bucket
                rows = rows_bucket(len(live), decoder.slots)
                for j, i in enumerate(live):
                    if row_of[i] != j:
                        cache.copy_slot(row_of[i], [j], length=held)
                        row_of[i] = j
                perm = torch.tensor(live + [0] * (rows - len(live)), device=device)
            decoder.feed({row_of[i]: column[i] for i in live})
            live_rows = {row_of[i] for i in live}
            decoder.set_active([r in live_rows for r in range(decoder.slots)])
            uniform = torch.rand(n, generator=generator, device=device)
            if perm is None:
                decoder.uniform[:n].copy_(uniform)
            else:
                decoder.uniform[:rows].copy_(uniform[perm])
            read, aligned = decoder.read_for({held})  # every live sample holds `held` tokens
            sampled = decoder.step(rows, read, candidates, aligned, shared=start).tolist()  # the prompt: one copy
            decoder.sampled(sampled)

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
# Streaming text

class TextStream:
    """Token ids in, text deltas out; a delta never ends in a partial UTF-8 character.

    Tokens are held back while their text ends in U+FFFD (a character whose remaining bytes have not arrived yet, or
    bytes that are not UTF-8 at all). Text that ends in a whole character decodes the same on its own as inside
    the full reply, so only the held tokens are decoded and the deltas add up to `decode(all tokens)`.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.held = tokenizer, []

    def push(self, token: int) -> str:
        self.held.append(token)
        text = self.tokenizer.decode(self.held)
        if text.endswith("\ufffd"):
            return ""
        self.held = []
        return text

    def flush(self) -> str:
        """Whatever is still held (at the end of a stream)."""
        text = self.tokenizer.decode(self.held) if self.held else ""
        self.held = []
        return text
