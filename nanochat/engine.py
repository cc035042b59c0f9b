"""Inference: KV-cached sampling with Python tool use.

`Engine.generate` prefills a prompt once and samples `num_samples` continuations from it, token by token (evaluation,
RL rollouts, the CLI). The server's many concurrent requests go through `nanochat.scheduler.BatchScheduler`, built on
the same pieces.

Tool use is a small state machine per sequence: after <|python_start|> the tokens up to <|python_end|> are run in
the sandbox and <|output_start|> + the output + <|output_end|> are forced into that sequence (mask 0: the tool, not
the model, wrote them; RL leaves them out of the loss).
"""

import ast
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from nanochat.common import get_compute_dtype
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


# ---------------------------------------------------------------------------------------------------------------------
# Sampling

def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor) -> torch.Tensor:
    """One token per row, each row with its own settings and its own uniform draw; no Python loop over rows.

    logits (B, V); temperature (B,) (0 = greedy); top_k (B,) long (0 = no top-k); top_p (B,) (1 = off);
    uniform (B,) in [0, 1). Sampling is by inverse CDF over the candidate tokens in id order (the first token whose
    cumulative probability exceeds the row's draw), so a row's token depends only on its own logits, settings and
    draw, not on which rows it is batched with. When every row has a top-k, only the best k_max candidates are
    looked at (much cheaper than the whole vocabulary).
    """
    greedy = logits.argmax(dim=-1)  # (B,)
    sampling = temperature > 0
    if not bool(sampling.any()):
        return greedy
    V = logits.size(-1)
    x = logits.float() / torch.where(sampling, temperature, torch.ones_like(temperature))[:, None]  # (B, V)
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    k = torch.where(sampling, k, torch.ones_like(k))  # greedy rows need no candidates
    k_max = int(k.max())
    if k_max < V:
        values, ids = torch.topk(x, k_max, dim=-1)  # (B, K), best first
        values = values.masked_fill(torch.arange(k_max, device=x.device)[None, :] >= k[:, None], float("-inf"))
    else:
        values, ids = x, None  # the whole vocabulary, in id order
        limited = k < V
        if bool(limited.any()):  # rows with a top-k next to rows without: drop what is below their k-th best
            kth = torch.topk(x[limited], int(k[limited].max()), dim=-1).values.gather(-1, k[limited][:, None] - 1)
            values = values.clone()
            values[limited] = values[limited].masked_fill(values[limited] < kth, float("-inf"))
    if bool((top_p[sampling] < 1).any()):  # nucleus: keep the best tokens until their mass reaches top_p
        ranked = values if ids is not None else values.sort(dim=-1, descending=True).values
        p = torch.softmax(ranked, dim=-1)
        keep = (p.cumsum(dim=-1) - p) < top_p[:, None]
        keep[:, 0] = True  # the most likely token always stays
        cutoff = torch.where(keep, ranked, torch.full_like(ranked, float("inf"))).min(dim=-1, keepdim=True).values
        values = values.masked_fill(values < cutoff, float("-inf"))
    if ids is not None:  # candidates back in id order, as in the whole-vocabulary case
        order = ids.argsort(dim=-1)
        ids, values = ids.gather(-1, order), values.gather(-1, order)
    cdf = torch.softmax(values, dim=-1).cumsum(dim=-1)  # (B, K)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]  # in [0, total)
    choice = (cdf <= target).sum(dim=-1).clamp(max=cdf.size(-1) - 1)  # first cdf > target: never a p = 0 token
    token = choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(sampling, token, greedy)


def sampling_params(rows: int, temperature: float, top_k: int | None, top_p: float,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(temperature, top_k, top_p) tensors of `rows` rows sharing one setting; top_k None or 0 = no top-k."""
    return (torch.full((rows,), float(temperature), device=device),
            torch.full((rows,), int(top_k or 0), dtype=torch.long, device=device),
            torch.full((rows,), float(top_p), device=device))


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
        self.stops = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
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
# One prompt, many samples

class Engine:
    """Sampling from one model for one prompt at a time (evaluation, RL rollouts, the CLI); the server's many
    concurrent requests go through `nanochat.scheduler.BatchScheduler` instead."""

    def __init__(self, model, tokenizer, autocast: Callable = nullcontext, use_tools: bool = True):
        self.model, self.tokenizer = model, tokenizer
        # On a CPU, autocast casts every weight again at every call: for a d4 model bf16 autocast halved decode
        # speed and slowed prefill (bench/inference.py), so generation runs in the weights' own dtype there.
        self.autocast = nullcontext if self.device.type == "cpu" else autocast
        self.tools = ToolStateMachine(tokenizer, use_tools)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        """Longest sequence the model can be run on (its rotary tables have headroom past the training context)."""
        return self.model.cos.size(1)

    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        """A cache in the dtype attention runs in: the compute dtype on GPUs (bf16 on modern ones), the weights'
        dtype on CPUs (see __init__)."""
        c = self.model.config
        device = self.device
        dtype = next(self.model.parameters()).dtype if device.type == "cpu" else get_compute_dtype(device.type)
        return KVCache(batch_size, c.n_layer, c.n_kv_head, c.head_dim, max_seq_len, device, dtype)

    def forward_last(self, tokens: torch.Tensor, cache: KVCache, slots: list[int]) -> torch.Tensor:
        """tokens (B, T) appended to cache rows `slots` → next-token logits (B, V), fp32."""
        with self.autocast():
            return self.model(tokens, kv_cache=cache, slots=slots, last_only=True)[:, -1].float()

    @torch.no_grad()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42, top_p: float = 1.0,
                 cancel: Callable[[], bool] | None = None) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, token_masks) per step: one token per sample, mask 1 = sampled, 0 = forced.

        The prompt is prefilled once and its cache copied to every sample. A sample that finished (stop token)
        is no longer computed: until the others finish its column entry repeats its last token with mask 0.
        """
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        max_tokens = max_tokens if max_tokens is not None else self.model.config.sequence_len
        max_tokens = max(0, min(max_tokens, self.max_context - len(tokens)))
        if max_tokens == 0:
            return
        device = self.device
        cache = self.new_cache(num_samples, len(tokens) + max_tokens)
        generator = torch.Generator(device=device).manual_seed(seed)
        logits = self.forward_last(torch.tensor([tokens], device=device), cache, [0])  # (1, V)
        cache.copy_slot(0, list(range(1, num_samples)))  # prefill once, sample many
        logits = logits.expand(num_samples, -1)
        params = sampling_params(num_samples, temperature, top_k, top_p, device)
        states = [self.tools.initial_state(tokens) for _ in range(num_samples)]
        live = list(range(num_samples))  # samples still generating, in cache-slot order
        column = [tokens[-1]] * num_samples
        for step in range(max_tokens):
            uniform = torch.rand(num_samples, generator=generator, device=device)  # one draw per sample, always
            row_params = params
            if len(live) < num_samples:
                rows = torch.tensor(live, device=device)
                row_params, uniform = tuple(p[rows] for p in params), uniform[rows]
            sampled = sample_tokens(logits, *row_params, uniform).tolist()
            masks = [0] * num_samples
            for row, s in zip(live, sampled):
                token, mask = self.tools.next_token(states[row], s)
                self.tools.advance(states[row], token, mask)
                column[row], masks[row] = token, mask
            yield list(column), masks
            live = [row for row in live if not states[row].done]
            if not live or step == max_tokens - 1 or (cancel is not None and cancel()):
                return
            self.tools.run_tool_calls([states[row] for row in live])
            logits = self.forward_last(torch.tensor([column[r] for r in live], device=device)[:, None], cache, live)

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
