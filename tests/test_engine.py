"""The inference engine (nanochat/engine.py) and its continuous-batching scheduler (nanochat/serving/scheduler.py) against
an oracle of full forward passes: greedy and sampled decoding, tool calls, continuous batching, cancellation,
sampling rules (top-k, top-p, seeds) and UTF-8-safe streaming text."""

import copy
import queue
import sys

import pytest
import torch

from conftest import make_tiny_model
from nanochat import attention as attention_module
from nanochat import gpt
from nanochat.common import get_compute_dtype
from nanochat.engine import (Engine, TextStream, ToolStateMachine, run_tool, sample_tokens, sampling_params,
                             tool_program)
from nanochat.serving.scheduler import BatchScheduler, PromptTooLong, Request

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "A"]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer.get_vocab_size(), sequence_len=256).eval()


@pytest.fixture(scope="module")
def tool_prompt(tiny_tokenizer):
    """A prompt that ends inside a tool call: <|python_start|>2+3 (the model has to close it)."""
    tok = tiny_tokenizer
    return (tok.encode("Let me compute.", prepend="<|bos|>") + [tok.encode_special("<|python_start|>")]
            + tok.encode("2+3"))


def closing_the_call(model, tok, prompt):
    """The model with two rows of its output layer swapped, so that greedy decoding of `prompt` closes the call
    right away: <|python_end|> takes the place of the token the model would have written first."""
    python_end = tok.encode_special("<|python_end|>")
    with torch.no_grad():
        first = int(model(torch.tensor([prompt]))[0, -1].argmax())
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        w = swapped.lm_head.weight
        w[[first, python_end]] = w[[python_end, first]]
    return swapped


@pytest.fixture(scope="module")
def tool_model(model, tiny_tokenizer, tool_prompt):
    return closing_the_call(model, tiny_tokenizer, tool_prompt)


@pytest.fixture(scope="module")
def sharp_tool_model(model, tiny_tokenizer, tool_prompt):
    """`tool_model` made from the sharpened tiny model (see `sharpen`)."""
    return closing_the_call(sharpen(copy.deepcopy(model)), tiny_tokenizer, tool_prompt)


@pytest.fixture(scope="module")
def stopping_model(model, tiny_tokenizer):
    """The tiny model with a strong, context-dependent <|assistant_end|>, so samples stop at different steps."""
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.lm_head.weight[end] = torch.randn(m.lm_head.weight.size(1), generator=torch.Generator().manual_seed(3)) * 0.4
    return m


@torch.no_grad()
def oracle(model, tok, prompt, num_samples, max_tokens, temperature=0.0, top_k=None, seed=0, use_tools=True):
    """What the engine must produce, computed the slow way: a full forward pass over each whole sequence per token,
    an independent tool state machine, and the engine's RNG protocol (one uniform per sample per step)."""
    s = tok.encode_special
    stops = {s("<|assistant_end|>"), tok.get_bos_token_id()}
    generator = torch.Generator().manual_seed(seed)
    results = []
    uniforms = [torch.rand(num_samples, generator=generator) for _ in range(max_tokens)]
    for i in range(num_samples):
        ids, masks, forced = list(prompt), [0] * len(prompt), []
        starts = [j for j, t in enumerate(prompt) if t == s("<|python_start|>")]
        code = prompt[starts[-1] + 1:] if use_tools and starts and s("<|python_end|>") not in prompt[starts[-1]:] \
            else None
        for step in range(max_tokens):
            if forced:
                token, mask = forced.pop(0), 0
            else:
                logits = model(torch.tensor([ids]))[:, -1]
                token = int(sample_tokens(logits, torch.tensor([float(temperature)]), torch.tensor([top_k or 0]),
                                          torch.tensor([1.0]), uniforms[step][i:i + 1])[0])
                mask = 1
            ids.append(token)
            masks.append(mask)
            if mask == 0:
                continue
            if token in stops:
                break
            if not use_tools:
                continue
            if token == s("<|python_start|>"):
                code = []
            elif token == s("<|python_end|>") and code is not None:
                forced = [s("<|output_start|>"), *tok.encode(run_tool(tok.decode(code))), s("<|output_end|>")]
                code = None
            elif code is not None:
                code.append(token)
        results.append((ids, masks))
    return results


def encode(tok, text):
    return tok.encode(text, prepend="<|bos|>")


# ---------------------------------------------------------------------------------------------------------------------
# Engine.generate

@pytest.mark.parametrize("num_samples", [1, 3])
def test_greedy_engine_equals_full_forward_passes(model, tiny_tokenizer, num_samples, monkeypatch):
    """Also when several samples read their prompt once (attention.shared_prefix_attention)."""
    shared = []
    original = attention_module.shared_prefix_attention
    monkeypatch.setattr(attention_module, "shared_prefix_attention", lambda *a: shared.append(a[3]) or original(*a))
    engine = Engine(model, tiny_tokenizer, use_tools=False)
    for text in PROMPTS:
        prompt = encode(tiny_tokenizer, text)
        results, masks = engine.generate_batch(prompt, num_samples, max_tokens=12, temperature=0.0)
        expected = oracle(model, tiny_tokenizer, prompt, 1, 12, use_tools=False)[0]
        assert results == [expected[0]] * num_samples
        assert masks == [expected[1]] * num_samples
        assert (len(prompt) in shared) == (num_samples > 1)


def test_greedy_engine_with_smear_and_backout_equals_full_forward_passes(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer.get_vocab_size(), sequence_len=256, n_layer=4, smear=True,
                            backout=True).eval()
    with torch.no_grad():
        model.smear_lambda.fill_(0.7)  # init is 0 (no smear): give it an effect to get wrong
        model.smear_gate.weight.normal_(0, 1.0)
    engine = Engine(model, tiny_tokenizer, use_tools=False)
    for text in PROMPTS[:2]:
        prompt = encode(tiny_tokenizer, text)
        results, _ = engine.generate_batch(prompt, 2, max_tokens=12, temperature=0.0)
        expected = oracle(model, tiny_tokenizer, prompt, 1, 12, use_tools=False)[0]
        assert results == [expected[0]] * 2


def test_generation_reads_weights_cast_once_and_never_autocasts(model, tiny_tokenizer):
    """bf16 autocast on a CPU re-casts every weight at every step (it halved decode speed): given dtype=bf16 the
    engine reads a bf16 copy made once."""
    engine = Engine(model, tiny_tokenizer, use_tools=False, dtype=torch.bfloat16)
    assert engine.model.lm_head.weight.dtype == torch.bfloat16 and engine.new_cache(1, 8).k.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32  # the caller's model is left as it was
    prompt = encode(tiny_tokenizer, PROMPTS[0])
    results, _ = engine.generate_batch(prompt, 1, max_tokens=12, temperature=0.0)
    assert len(prompt) < len(results[0]) <= len(prompt) + 12


def test_without_a_dtype_the_engine_takes_the_compute_dtype_policy(model, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    assert Engine(model, tiny_tokenizer).dtype == get_compute_dtype("cpu") == torch.bfloat16


@pytest.mark.parametrize("num_samples", [1, 2])
def test_greedy_engine_with_a_tool_call_equals_full_forward_passes(tool_model, tiny_tokenizer, tool_prompt,
                                                                   num_samples):
    tok = tiny_tokenizer
    engine = Engine(tool_model, tok)
    results, masks = engine.generate_batch(tool_prompt, num_samples, max_tokens=14, temperature=0.0)
    expected = oracle(tool_model, tok, tool_prompt, 1, 14)[0]
    assert results == [expected[0]] * num_samples and masks == [expected[1]] * num_samples
    new, new_masks = results[0][len(tool_prompt):], masks[0][len(tool_prompt):]
    assert new[:2] == [tok.encode_special("<|python_end|>"), tok.encode_special("<|output_start|>")]
    end = new.index(tok.encode_special("<|output_end|>"))
    assert tok.decode(new[2:end]) == "5"  # the sandbox ran 2+3
    assert new_masks[0] == 1 and new_masks[1:end + 1] == [0] * end  # forced tokens are masked out
    assert len(new) > end + 1  # and the model carried on after the tool's output


def test_a_call_that_breaks_the_tool_becomes_its_error_output(tiny_tokenizer):
    """`1+1+…+1` with 600 terms makes `ast` recurse past Python's default limit in this process while the call is
    prepared: the call's output says so and generation carries on (it used to raise RecursionError). The default
    limit is set for the test: torch.compile raises it for the rest of a process that compiled anything."""
    tok = tiny_tokenizer
    prompt = encode(tok, "Sum:") + [tok.encode_special("<|python_start|>")] + tok.encode("+".join(["1"] * 600))
    model = closing_the_call(make_tiny_model(tok.get_vocab_size(), sequence_len=512).eval(), tok, prompt)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # CPython's default
    try:
        results, masks = Engine(model, tok).generate_batch(prompt, max_tokens=100, temperature=0.0)
    finally:
        sys.setrecursionlimit(limit)
    new, output_start = results[0][len(prompt):], tok.encode_special("<|output_start|>")
    assert new[:2] == [tok.encode_special("<|python_end|>"), output_start]
    end = new.index(tok.encode_special("<|output_end|>"))
    assert tok.decode(new[2:end]).startswith("Error: the tool call could not run: RecursionError")
    assert len(new) > end + 1  # the model carried on after the error


def test_prompts_without_a_tool_call_are_unaffected_by_tools(tool_model, tiny_tokenizer):
    engine = Engine(tool_model, tiny_tokenizer)
    for text in PROMPTS[:2]:
        prompt = encode(tiny_tokenizer, text)
        results, masks = engine.generate_batch(prompt, 2, max_tokens=10, temperature=0.0)
        assert (results[0], masks[0]) == oracle(tool_model, tiny_tokenizer, prompt, 1, 10)[0]


def test_sampled_samples_equal_the_oracle_even_when_some_stop_early(stopping_model, tiny_tokenizer):
    """Finished samples leave the batch; the others must be unaffected (same tokens as full forward passes)."""
    prompt = encode(tiny_tokenizer, "Hello there")
    engine = Engine(stopping_model, tiny_tokenizer, use_tools=False)
    results, masks = engine.generate_batch(prompt, 5, max_tokens=20, temperature=1.0, top_k=50, seed=11)
    expected = oracle(stopping_model, tiny_tokenizer, prompt, 5, 20, temperature=1.0, top_k=50, seed=11,
                      use_tools=False)
    assert list(zip(results, masks)) == expected
    lengths = {len(r) for r in results}
    assert min(lengths) < len(prompt) + 20 and len(lengths) > 1  # the premise: samples did stop at different steps


def test_finished_samples_are_padded_with_mask_zero(stopping_model, tiny_tokenizer):
    prompt = encode(tiny_tokenizer, "Hello there")
    engine = Engine(stopping_model, tiny_tokenizer, use_tools=False)
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    columns = list(engine.generate(prompt, 5, max_tokens=20, temperature=1.0, top_k=50, seed=11))
    for row in range(5):
        tokens = [c[0][row] for c in columns]
        masks = [c[1][row] for c in columns]
        if end in tokens:
            stop = tokens.index(end)
            assert set(tokens[stop:]) == {end} and set(masks[stop + 1:]) <= {0}


def test_top_k_zero_and_none_mean_no_top_k(model, tiny_tokenizer):
    """Regression: the reference crashed on top_k=0."""
    logits = torch.randn(4, 50)
    for k in (0, None):
        assert sample_tokens(logits, *sampling_params(4, 1.0, k, 1.0, logits.device), torch.rand(4)).shape == (4,)
    engine = Engine(model, tiny_tokenizer, use_tools=False)
    prompt = encode(tiny_tokenizer, "Hello")
    a = engine.generate_batch(prompt, 2, max_tokens=5, temperature=1.0, top_k=0, seed=3)
    b = engine.generate_batch(prompt, 2, max_tokens=5, temperature=1.0, top_k=None, seed=3)
    assert a == b and all(len(r) > len(prompt) for r in a[0])


def test_samples_do_not_all_share_the_first_token(model, tiny_tokenizer):
    """Regression: the reference sampled the first token once and gave it to every sample."""
    engine = Engine(model, tiny_tokenizer, use_tools=False)
    prompt = encode(tiny_tokenizer, "Hello")
    results, _ = engine.generate_batch(prompt, 8, max_tokens=3, temperature=1.0, top_k=None, seed=1)
    assert len({r[len(prompt)] for r in results}) > 1


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer, use_tools=False)
    prompt = encode(tiny_tokenizer, "Hello")
    run = lambda seed: engine.generate_batch(prompt, 2, max_tokens=8, temperature=1.0, top_k=20, seed=seed)  # noqa
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_cancel_stops_generation(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer, use_tools=False)
    steps = []
    for column, _ in engine.generate(encode(tiny_tokenizer, "Hi"), 2, max_tokens=50, temperature=1.0,
                                     cancel=lambda: len(steps) >= 3):
        steps.append(column)
    assert len(steps) == 3


def test_generation_stops_at_the_context(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer, use_tools=False)
    prompt = [tiny_tokenizer.get_bos_token_id()] + [5] * (engine.max_context - 4)
    assert len(list(engine.generate(prompt, 1, max_tokens=100, temperature=1.0))) <= 3


# ---------------------------------------------------------------------------------------------------------------------
# Sampling rules (deterministic: a grid of uniforms stands in for random draws)

def grid(n: int) -> torch.Tensor:
    return (torch.arange(n) + 0.5) / n


def test_inverse_cdf_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(1000, -1)
    ones = torch.ones(1000)
    tokens = sample_tokens(logits, ones, torch.zeros(1000, dtype=torch.long), ones, grid(1000))
    assert torch.bincount(tokens, minlength=4).tolist() == [500, 300, 150, 50]


def test_top_k_and_top_p_limit_the_candidates():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(1000, -1)
    ones = torch.ones(1000)
    top2 = sample_tokens(logits, ones, torch.full((1000,), 2), ones, grid(1000))
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample_tokens(logits, ones, torch.zeros(1000, dtype=torch.long), torch.full((1000,), 0.7), grid(1000))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 < 0.7, so the token that crosses 0.7 stays in
    assert set(sample_tokens(logits, ones, torch.zeros(1000, dtype=torch.long), torch.zeros(1000),
                             grid(1000)).tolist()) == {0}  # top_p = 0: only the most likely token


def test_each_row_uses_its_own_settings():
    logits = torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 0.5], [2.0, 1.0, 0.0]])
    tokens = sample_tokens(logits, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 1, 0]), torch.ones(3),
                           torch.tensor([0.99, 0.99, 0.999]))
    assert tokens.tolist() == [1, 1, 2]  # greedy; top-1; the last token of the CDF


def test_a_rows_token_does_not_depend_on_its_neighbours():
    torch.manual_seed(0)
    logits, uniform = torch.randn(6, 100), torch.rand(6)
    t, k, p = torch.tensor([1.0, 0.0, 0.7, 1.3, 1.0, 2.0]), torch.tensor([0, 5, 50, 0, 1, 10]), torch.tensor(
        [1.0, 1.0, 0.9, 0.5, 1.0, 1.0])
    together = sample_tokens(logits, t, k, p, uniform)
    alone = [int(sample_tokens(logits[i:i + 1], t[i:i + 1], k[i:i + 1], p[i:i + 1], uniform[i:i + 1])[0])
             for i in range(6)]
    assert together.tolist() == alone


@pytest.mark.parametrize("candidates", [0, 64, 1000])  # greedy only; the best 64; the whole vocabulary
def test_logits_capped_by_the_sampler_give_the_tokens_of_logits_capped_before_it(candidates):
    """A decode step hands the sampler its logits before the soft-cap, which is applied to the candidates only."""
    torch.manual_seed(0)
    raw, uniform = 20 * torch.randn(8, 1000), torch.rand(8)
    raw[0, 3], raw[0, 7] = 400.0, 500.0  # both cap to exactly 15.0: the first best is 3, not the larger 7
    t = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.7, 1.3, 1.0, 2.0]) * (candidates > 0)
    k = torch.tensor([0, 5, 50, 64, 10, 1, 64, 20]) if candidates < 1000 else torch.zeros(8, dtype=torch.long)
    p = torch.tensor([1.0, 1.0, 0.9, 1.0, 0.5, 1.0, 1.0, 1.0])
    capped = sample_tokens(gpt.SOFTCAP * torch.tanh(raw / gpt.SOFTCAP), t, k, p, uniform, candidates)
    assert sample_tokens(raw, t, k, p, uniform, candidates, softcap=gpt.SOFTCAP).tolist() == capped.tolist()
    assert capped[0] == 3


# ---------------------------------------------------------------------------------------------------------------------
# Tools

def test_tool_state_machine_forces_the_output_of_a_closed_call(tiny_tokenizer):
    tok = tiny_tokenizer
    machine = ToolStateMachine(tok)
    state = machine.initial_state(encode(tok, "x") + [tok.encode_special("<|python_start|>")] + tok.encode("6*7"))
    machine.advance(state, tok.encode_special("<|python_end|>"), 1)
    assert state.tool_call == "6*7"
    machine.run_tool_call(state)
    forced = list(state.forced)
    assert forced[0] == tok.encode_special("<|output_start|>") and forced[-1] == tok.encode_special("<|output_end|>")
    assert tok.decode(forced[1:-1]) == "42" and state.tool_call is None


def test_tool_program_prints_expression_values():
    assert "print" in tool_program("48/2") and tool_program("x = 1") == "x = 1"
    assert run_tool("48/2") == "24" and run_tool("1/0").startswith("Error")


# ---------------------------------------------------------------------------------------------------------------------
# Streaming text

def test_text_stream_never_splits_a_utf8_character(tiny_tokenizer):
    text = "naïve 🙂 東京 ok 🚀"
    tokens = tiny_tokenizer.encode(text)
    assert any("\ufffd" in tiny_tokenizer.decode([t]) for t in tokens)  # the premise: some tokens are partial bytes
    stream = TextStream(tiny_tokenizer)
    deltas = [stream.push(t) for t in tokens]
    assert "".join(deltas) + stream.flush() == text
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_holds_invalid_bytes_until_text_resumes(tiny_tokenizer):
    tok = tiny_tokenizer
    lone = next(t for t in range(256) if tok.decode([t]) == "\ufffd")  # a lone byte that is not UTF-8
    tokens = [lone] * 3 + tok.encode("ok") + [lone]
    stream = TextStream(tok)
    deltas = [stream.push(t) for t in tokens]
    assert deltas[:3] == ["", "", ""] and deltas[-1] == ""
    assert "".join(deltas) + stream.flush() == tok.decode(tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Continuous batching (nanochat/serving/scheduler.py)

@pytest.fixture
def scheduler_factory():
    made = []

    def make(*args, **kwargs):
        made.append(BatchScheduler(*args, **kwargs))
        return made[-1]
    yield make
    for s in made:
        s.shutdown()


def collect(request, timeout=120):
    tokens, masks = [], []
    for t, m in request.stream(timeout=timeout):
        tokens.append(t)
        masks.append(m)
    return tokens, masks


def test_staggered_requests_give_the_same_outputs_as_solo_runs(model, tiny_tokenizer, scheduler_factory):
    """Requests join while others are mid-generation, with different lengths and sampling settings; each one's
    tokens equal its own oracle (full forward passes, its own RNG stream)."""
    tok = tiny_tokenizer
    scheduler = scheduler_factory(model, tok, slots=2, use_tools=False, prefill_chunk=5)  # prompts span chunks
    settings = [dict(temperature=0.0), dict(temperature=1.0, top_k=50, seed=1), dict(temperature=0.7, top_k=0, seed=2),
                dict(temperature=1.0, top_k=5, seed=3), dict(temperature=0.0)]
    prompts = [encode(tok, t) for t in PROMPTS + ["Zebra crossing"]]
    requests, outputs = [], {}
    for i, (prompt, kw) in enumerate(zip(prompts, settings)):
        requests.append(scheduler.submit(Request(tokens=prompt, max_tokens=8 + 3 * i, **kw)))
        if i >= 1:  # wait for a token of the previous request, so this one arrives mid-generation
            outputs[i - 1] = [next(requests[i - 1].stream(timeout=60))]
    for i, r in enumerate(requests):
        outputs[i] = outputs.get(i, []) + list(r.stream(timeout=120))
    for i, (prompt, kw) in enumerate(zip(prompts, settings)):
        ids, masks = oracle(model, tok, prompt, 1, 8 + 3 * i, temperature=kw["temperature"], top_k=kw.get("top_k"),
                            seed=kw.get("seed", 0), use_tools=False)[0]
        assert [t for t, _ in outputs[i]] == ids[len(prompt):], f"request {i}"
    status = scheduler.status()
    assert status["completed"] == 5 and status["active"] == 0 and status["free_slots"] == 2


def test_a_freed_slot_is_reused_by_a_waiting_request(model, tiny_tokenizer, scheduler_factory):
    scheduler = scheduler_factory(model, tiny_tokenizer, slots=1, use_tools=False)
    prompt = encode(tiny_tokenizer, "Hello")
    requests = [scheduler.submit(Request(tokens=prompt, max_tokens=4, temperature=0.0)) for _ in range(3)]
    outputs = [collect(r)[0] for r in requests]
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 4
    assert all(r.finish_reason == "length" for r in requests)
    assert scheduler.status()["completed"] == 3 and scheduler.status()["free_slots"] == 1


def test_a_tool_call_inside_the_scheduler_matches_the_oracle(tool_model, tiny_tokenizer, tool_prompt,
                                                             scheduler_factory):
    tok = tiny_tokenizer
    scheduler = scheduler_factory(tool_model, tok, slots=2)
    other = encode(tok, "Once upon a time")
    with_tool = scheduler.submit(Request(tokens=tool_prompt, max_tokens=14, temperature=0.0))
    without = scheduler.submit(Request(tokens=other, max_tokens=14, temperature=0.0))
    expected = oracle(tool_model, tok, tool_prompt, 1, 14)[0]
    assert collect(with_tool) == (expected[0][len(tool_prompt):], expected[1][len(tool_prompt):])
    assert collect(without)[0] == oracle(tool_model, tok, other, 1, 14)[0][0][len(other):]
    assert scheduler.status()["tool_calls"] >= 1


def test_cancelling_frees_the_slot_and_skips_waiting_requests(model, tiny_tokenizer, scheduler_factory):
    scheduler = scheduler_factory(model, tiny_tokenizer, slots=1, use_tools=False)
    prompt = encode(tiny_tokenizer, "Hello")
    running = scheduler.submit(Request(tokens=prompt, max_tokens=200, temperature=1.0))
    waiting = scheduler.submit(Request(tokens=prompt, max_tokens=200, temperature=1.0))
    assert next(running.stream(timeout=60))
    waiting.cancel()
    running.cancel()
    assert collect(running) and running.finish_reason == "cancelled"
    assert collect(waiting) == ([], []) and waiting.finish_reason == "cancelled"
    short = scheduler.submit(Request(tokens=prompt, max_tokens=3, temperature=0.0))
    assert len(collect(short)[0]) == 3
    status = scheduler.status()
    assert status["cancelled"] == 2 and status["completed"] == 1 and status["free_slots"] == 1


def test_an_error_in_one_request_fails_only_that_request(model, tiny_tokenizer, scheduler_factory):
    scheduler = scheduler_factory(model, tiny_tokenizer, slots=2, use_tools=False)
    forward = scheduler.engine.forward_last
    poison = 7

    def flaky(x, cache, slots):
        if x.size(1) > 1 and int(x[0, 1]) == poison:
            raise RuntimeError("boom")
        return forward(x, cache, slots)
    scheduler.engine.forward_last = flaky
    good = scheduler.submit(Request(tokens=encode(tiny_tokenizer, "Hello"), max_tokens=6, temperature=0.0))
    bad = scheduler.submit(Request(tokens=[tiny_tokenizer.get_bos_token_id(), poison, 8], max_tokens=6))
    assert collect(bad) == ([], []) and bad.finish_reason == "error: RuntimeError: boom"
    assert len(collect(good)[0]) == 6 and good.finish_reason == "length"
    after = scheduler.submit(Request(tokens=encode(tiny_tokenizer, "Again"), max_tokens=2, temperature=0.0))
    assert len(collect(after)[0]) == 2


def test_prompt_longer_than_the_context_is_refused(model, tiny_tokenizer, scheduler_factory):
    scheduler = scheduler_factory(model, tiny_tokenizer, slots=1)
    with pytest.raises(PromptTooLong, match="new conversation"):
        scheduler.submit(Request(tokens=[1] * 300, max_tokens=5))
    with pytest.raises(ValueError, match="vocabulary"):
        scheduler.submit(Request(tokens=[10 ** 6], max_tokens=5))


def test_shutdown_ends_every_open_request(model, tiny_tokenizer):
    scheduler = BatchScheduler(model, tiny_tokenizer, slots=1, use_tools=False)
    prompt = encode(tiny_tokenizer, "Hello")
    requests = [scheduler.submit(Request(tokens=prompt, max_tokens=10_000, temperature=1.0, events=queue.Queue()))
                for _ in range(2)]
    next(requests[0].stream(timeout=60))
    scheduler.shutdown()
    for r in requests:
        collect(r, timeout=30)
        assert r.finish_reason in ("shutdown", "length")
    assert not scheduler.thread.is_alive()


# ---------------------------------------------------------------------------------------------------------------------
# Prefix reuse in the scheduler (PrefixCache, nanochat/kv_cache.py)

def sharpen(model):
    """The tiny model with larger output projections and LM head (in place), so that a reply depends on the whole
    history: a wrong key, value or embedding anywhere in a reused prefix changes the greedy tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
        model.lm_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


@pytest.fixture(scope="module")
def sharp_model(model):
    return sharpen(copy.deepcopy(model))


USER_TURNS = ["Tell me about the weather in Paris in the spring, please.", "And what about the autumn there?",
              "Which month is the best one to visit, all things considered?", "Thanks! Anything else?"]


def next_turn(tok, history: list[int], reply: list[int], user: str) -> list[int]:
    """The conversation so far, the assistant's reply closed, a new user message and the assistant's turn opened."""
    s = tok.encode_special
    return (history + reply + [s("<|assistant_end|>"), s("<|user_start|>")] + tok.encode(user)
            + [s("<|user_end|>"), s("<|assistant_start|>")])


def converse(scheduler, tok, *conversations: list, max_tokens: int = 10):
    """Run conversations side by side, turn by turn: each round submits the next turn of every conversation at
    once (they share the slots, so a slot holds another conversation between two turns of one). Each turn's prompt
    holds every earlier turn and reply as generated; a conversation's first turn is a user message or a whole
    prompt (token ids). → per conversation, [(prompt, reply tokens, reply masks)]."""
    s = tok.encode_special
    results = [[] for _ in conversations]
    for turn in range(max(len(c) for c in conversations)):
        requests = {}
        for i, user_turns in enumerate(conversations):
            if turn >= len(user_turns):
                continue
            if turn > 0:
                history, reply, _ = results[i][-1]
                prompt = next_turn(tok, history, reply, user_turns[turn])
            elif isinstance(user_turns[0], list):
                prompt = user_turns[0]
            else:
                prompt = ([tok.get_bos_token_id(), s("<|user_start|>")] + tok.encode(user_turns[0])
                          + [s("<|user_end|>"), s("<|assistant_start|>")])
            requests[i] = (prompt, scheduler.submit(Request(tokens=prompt, max_tokens=max_tokens, temperature=0.0)))
        for i, (prompt, request) in requests.items():
            results[i].append((prompt, *collect(request)))
    return results


def replies(results):
    return [[(reply, masks) for _, reply, masks in conversation] for conversation in results]


OTHER_TURNS = ["Write a short poem about the sea and the sky, with waves, birds, boats and the wind, please.",
               "Now make it rhyme, and give it a title about the evening light over the harbour.",
               "Lovely. One more verse?", "Make it about the moon."]


def test_multi_turn_conversations_reuse_earlier_turns_and_decode_the_same(sharp_model, tiny_tokenizer,
                                                                          scheduler_factory):
    """Three conversations batched together on two slots: every turn after the first reuses its conversation so
    far (its prompt and its reply, decoded tokens included), whichever slot held it, and prefills only the new
    message, in chunks; the replies equal those of a scheduler without reuse."""
    tok, model = tiny_tokenizer, sharp_model
    plain = scheduler_factory(model, tok, slots=2, use_tools=False, prefill_chunk=7, prefix_cache=0)
    reusing = scheduler_factory(model, tok, slots=2, use_tools=False, prefill_chunk=7, prefix_cache=2.0)
    conversations = (USER_TURNS, OTHER_TURNS, USER_TURNS[1:])
    got = converse(reusing, tok, *conversations)
    assert replies(got) == replies(converse(plain, tok, *conversations))
    assert plain.status()["prefix_cache"] is None
    stats = reusing.status()["prefix_cache"]
    turns = sum(len(c) for c in conversations)
    assert stats["lookups"] == turns and stats["hits"] == turns - len(conversations)
    assert stats["evicted_blocks"] == 0  # room for all: every block stays reusable
    # each later turn reuses every whole block of the previous turn's prompt and the reply decoded after it
    # (all but the reply's last token, which was never fed back)
    held = [len(prompt) + len(reply) - 1 for c in got for prompt, reply, _ in c[:-1]]
    assert stats["reused_tokens"] == sum(n // 16 * 16 for n in held)
    prompts = sum(len(prompt) for c in got for prompt, _, _ in c)
    assert 0 < stats["hit_rate"] == round(stats["reused_tokens"] / prompts, 4)


def test_prefix_reuse_restores_the_embedding_that_smear_reads(tiny_tokenizer, scheduler_factory):
    """With smear each token adds its predecessor's embedding: the prefill after a reused prefix must see the
    embedding of the prefix's last token, not of whatever the slot held last."""
    model = sharpen(make_tiny_model(tiny_tokenizer.get_vocab_size(), sequence_len=256, n_layer=4, smear=True,
                                    backout=True).eval())
    with torch.no_grad():
        model.smear_lambda.fill_(2.0)  # init is 0 (no smear): give it an effect to get wrong
        model.smear_gate.weight.normal_(0, 1.0)
    tok = tiny_tokenizer
    plain = scheduler_factory(model, tok, slots=1, use_tools=False, prefix_cache=0)
    reusing = scheduler_factory(model, tok, slots=1, use_tools=False)
    conversations = (USER_TURNS[:3], OTHER_TURNS[:3])
    assert replies(converse(reusing, tok, *conversations)) == replies(converse(plain, tok, *conversations))
    assert reusing.status()["prefix_cache"]["hits"] == 4


def test_a_tool_call_mid_conversation_is_reused_with_its_forced_output(sharp_tool_model, tiny_tokenizer,
                                                                      tool_prompt, scheduler_factory):
    """Turn 1 runs a tool call whose output is forced into the sequence; turn 2 reuses the whole of turn 1, the
    forced tokens included, and replies as a scheduler without reuse does (turn 1 as full forward passes do)."""
    tok, tool_model = tiny_tokenizer, sharp_tool_model
    plain = scheduler_factory(tool_model, tok, slots=1, prefix_cache=0)
    reusing = scheduler_factory(tool_model, tok, slots=1)
    conversations = ([tool_prompt, "What was that number again?"], OTHER_TURNS[:2])
    got, other = converse(reusing, tok, *conversations, max_tokens=24)
    assert replies([got, other]) == replies(converse(plain, tok, *conversations, max_tokens=24))
    _, first_reply, first_masks = got[0]
    assert 0 in first_masks, "turn 1 should have forced a tool output"
    reference = oracle(tool_model, tok, tool_prompt, 1, 24)[0]
    assert (first_reply, first_masks) == (reference[0][len(tool_prompt):], reference[1][len(tool_prompt):])
    stats = reusing.status()
    last_forced = len(tool_prompt) + max(i for i, m in enumerate(first_masks) if m == 0)
    reused_by_turn_2 = (len(tool_prompt) + len(first_reply) - 1) // 16 * 16
    assert reused_by_turn_2 > last_forced, "the test should reuse the forced tool output too"
    reused_by_the_other = (len(other[0][0]) + len(other[0][1]) - 1) // 16 * 16
    assert stats["prefix_cache"]["reused_tokens"] == reused_by_turn_2 + reused_by_the_other
    assert stats["tool_calls"] >= 1


def test_an_evicted_prefix_is_prefilled_again_and_decodes_the_same(sharp_model, tiny_tokenizer,
                                                                   scheduler_factory):
    """A cache of 4 blocks (64 positions): a longer second conversation evicts the first one's blocks (least
    recently used first); the first conversation, started again (beside a third one in the same slot), finds
    nothing of itself, prefills it all and replies as without reuse, and its next turn reuses its first again."""
    tok, model = tiny_tokenizer, sharp_model
    one, other = USER_TURNS[:2], OTHER_TURNS[:2]
    plain = scheduler_factory(model, tok, slots=1, use_tools=False, prefix_cache=0)
    small = scheduler_factory(model, tok, slots=1, use_tools=False, prefix_cache=64 / 256)
    assert small.prefixes.blocks == 4
    third = OTHER_TURNS[2:]
    expected = [*converse(plain, tok, one), *converse(plain, tok, other), *converse(plain, tok, one, third)]
    got = [*converse(small, tok, one), *converse(small, tok, other)]
    before = small.status()["prefix_cache"]
    got += converse(small, tok, one, third)
    after = small.status()["prefix_cache"]
    assert replies(got) == replies(expected)
    assert before["evicted_blocks"] > 0 and after["used_blocks"] == 4
    assert after["hits"] - before["hits"] == 2  # the second turns only: the first conversation was evicted


def test_the_samples_of_one_prompt_prefill_it_once(sharp_model, tiny_tokenizer, scheduler_factory):
    """Three requests for one prompt admitted together: the first prefills it, the others copy it in."""
    tok, model = tiny_tokenizer, sharp_model
    prompt = encode(tok, "The samples of one prompt share its keys and values: " * 3)
    scheduler = scheduler_factory(model, tok, slots=3, use_tools=False, prefill_chunk=16)
    requests = [scheduler.submit(Request(tokens=prompt, max_tokens=6, temperature=0.0)) for _ in range(3)]
    outputs = [collect(r)[0] for r in requests]
    assert outputs == [oracle(model, tok, prompt, 1, 6, use_tools=False)[0][0][len(prompt):]] * 3
    stats = scheduler.status()["prefix_cache"]
    assert stats["hits"] == 2 and stats["reused_tokens"] == 2 * ((len(prompt) - 1) // 16 * 16)
