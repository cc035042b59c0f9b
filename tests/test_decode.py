"""Static decode steps (nanochat/decode.py) and the inference weights behind them: a compiled or captured step
decodes exactly what the eager step does, rows that sit out a step are left untouched, requests moving between
batch-size buckets keep their outputs, and the cast inference weights follow the model they were cast from."""

import contextlib
import copy
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from nanochat.common import UserError
from nanochat.decode import COMPILE_FROM_STEPS, Decoder, DecodePolicy, read_bucket, rows_bucket
from nanochat.engine import Engine
from nanochat.serving.scheduler import BatchScheduler, Request
from test_engine import encode, oracle

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer.get_vocab_size(), sequence_len=256).eval()


@pytest.fixture(scope="module")
def tool_model(model, tiny_tokenizer):
    """The tiny model with <|python_end|> and the token it would write first after `<|python_start|>2+3` swapped in
    its output layer, so that greedy decoding closes the call and the sandbox's output is forced in."""
    tok = tiny_tokenizer
    prompt = tool_prompt_of(tok)
    python_end = tok.encode_special("<|python_end|>")
    with torch.no_grad():
        first = int(model(torch.tensor([prompt]))[0, -1].argmax())
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        w = swapped.lm_head.weight
        w[[first, python_end]] = w[[python_end, first]]
    return swapped


def tool_prompt_of(tok):
    return tok.encode("Let me compute.", prepend="<|bos|>") + [tok.encode_special("<|python_start|>")] + tok.encode("2+3")


def test_buckets_are_powers_of_two_within_their_limits():
    assert [rows_bucket(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert rows_bucket(5, 6) == 6
    assert [read_bucket(n, 2048) for n in (1, 128, 129, 700)] == [128, 128, 256, 1024]
    assert read_bucket(700, 600) == 600


def test_cpu_steps_eager_or_compiled_read_rows_of_one_length_without_a_mask(model):
    """Exact reads on CPUs (a compiled step marks the read length dynamic once it changes), so rows of one length
    take the unmasked form; only CUDA's compiled and captured steps read in buckets and always mask."""
    for policy in (DecodePolicy(), DecodePolicy(compile=True)):
        decoder = Decoder(model, slots=2, max_seq_len=64, dtype=torch.float32, policy=policy)
        assert decoder.read_for({20}) == (21, True) and decoder.read_for({20, 7}) == (21, False)


def test_a_compiled_cpu_step_runs_its_products_in_their_measured_forms(model, tiny_tokenizer, monkeypatch):
    """Inductor leaves the products to `few_rows` (an opaque operator), which times them as the eager step does;
    the samples of one prompt (rows of one length, the prompt read once) decode as they do eagerly."""
    from nanochat import few_rows
    monkeypatch.setattr(few_rows, "_CHOICE", {})
    monkeypatch.setattr(few_rows, "_TRIALS", {})
    prompt = encode(tiny_tokenizer, "Hello there, how are you")
    eager = Engine(model, tiny_tokenizer, dtype=torch.float32, policy=DecodePolicy())
    expected = eager.generate_batch(prompt, 3, max_tokens=12, temperature=0.0)
    monkeypatch.setattr(few_rows, "_CHOICE", {})
    monkeypatch.setattr(few_rows, "_TRIALS", {})
    compiled = Engine(model, tiny_tokenizer, dtype=torch.float32, policy=DecodePolicy(compile=True))
    assert compiled.generate_batch(prompt, 3, max_tokens=12, temperature=0.0) == expected
    c = model.config
    keys = {key[:3] for key in (*few_rows._CHOICE, *few_rows._TRIALS)}
    qkv = (c.n_head + 2 * c.n_kv_head) * c.head_dim
    assert {(3, qkv, c.n_embd), (3, 4 * c.n_embd, c.n_embd), (3, c.padded_vocab_size, c.n_embd)} <= keys


def test_compiled_greedy_decoding_equals_eager_token_for_token_with_a_tool_call(tool_model, tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = tool_prompt_of(tok)
    eager = Engine(tool_model, tok, policy=DecodePolicy())
    compiled = Engine(tool_model, tok, policy=DecodePolicy(compile=True))
    expected = eager.generate_batch(prompt, 1, max_tokens=16, temperature=0.0)
    assert compiled.generate_batch(prompt, 1, max_tokens=16, temperature=0.0) == expected
    tokens, masks = expected[0][0][len(prompt):], expected[1][0][len(prompt):]
    assert tokens[:2] == [tok.encode_special("<|python_end|>"), tok.encode_special("<|output_start|>")]
    assert 0 in masks and masks[-1] == 1  # the tool's output was forced in, and the model carried on after it
    assert (expected[0][0], expected[1][0]) == oracle(tool_model, tok, prompt, 1, 16)[0]


def test_sampling_with_a_fixed_seed_is_reproducible_across_engines(model, tiny_tokenizer):
    prompt = encode(tiny_tokenizer, "Hello there")
    run = lambda engine, seed: engine.generate_batch(prompt, 3, max_tokens=10, temperature=0.9, top_k=40,  # noqa
                                                     top_p=0.9, seed=seed)
    first, second = Engine(model, tiny_tokenizer, use_tools=False), Engine(model, tiny_tokenizer, use_tools=False)
    assert run(first, 5) == run(second, 5) == run(first, 5)
    assert run(first, 5) != run(first, 6)


@torch.no_grad()
def test_rows_that_sit_out_a_step_are_left_as_they_were(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer.get_vocab_size(), sequence_len=256, smear=True).eval()
    decoder = Decoder(model, slots=4, max_seq_len=64, dtype=torch.float32, policy=DecodePolicy())
    cache = decoder.cache
    for slot, length in enumerate([5, 9, 3, 7]):
        model(torch.randint(0, 200, (1, length)), kv_cache=cache, slots=[slot])
    k, v, pos, emb = cache.k.clone(), cache.v.clone(), cache.pos.clone(), cache.prev_embedding.clone()
    decoder.set_sampling([(0.0, 0, 1.0)] * 4)
    decoder.feed({0: 11, 1: 12, 2: 13, 3: 14})
    decoder.set_active([True, False, True, False])
    decoder.step(4, 16, 0)
    assert cache.pos.tolist() == [6, 9, 4, 7]
    assert torch.equal(cache.prev_embedding[[1, 3]], emb[[1, 3]])  # smear's last embeddings too
    assert not torch.equal(cache.prev_embedding[[0, 2]], emb[[0, 2]])
    for slot in (1, 3):  # untouched (they wrote only to the spare position past max_seq_len, never read)
        assert torch.equal(cache.k[:, slot, :, :64], k[:, slot, :, :64])
        assert torch.equal(cache.v[:, slot, :, :64], v[:, slot, :, :64])
    for slot, length in ((0, 5), (2, 3)):  # history kept, one new position written
        assert torch.equal(cache.k[:, slot, :, :length], k[:, slot, :, :length])
        assert not torch.equal(cache.k[:, slot, :, length], k[:, slot, :, length])


def test_an_aligned_step_computes_what_the_masked_step_does(tiny_tokenizer):
    """Rows of one length read exactly their history: the unmasked step (aligned) samples the same tokens and
    writes the same cache as the masked one, also for a layer whose window is shorter than the history, and so
    does one that reads the prompt the rows share once (shared)."""
    model = make_tiny_model(tiny_tokenizer.get_vocab_size(), sequence_len=256, window_pattern="SL").eval()
    results = []
    for aligned, shared in ((False, 0), (True, 0), (True, 40)):
        decoder = Decoder(model, slots=2, max_seq_len=64, dtype=torch.float32, policy=DecodePolicy())
        torch.manual_seed(0)
        prompt = torch.randint(0, 200, (1, 40))
        model(prompt, kv_cache=decoder.cache, slots=[0])
        decoder.cache.copy_slot(0, [1], length=40)
        decoder.set_sampling([(0.0, 0, 1.0)] * 2)
        decoder.set_active([True, True])
        tokens = []
        for step in range(6):
            decoder.feed({0: 11 + step, 1: 30 + step})
            ids = decoder.step(2, decoder.read_length(41 + step), 0, aligned=aligned, shared=shared).tolist()
            decoder.sampled(ids)
            tokens.append(ids)
        results.append((tokens, decoder.cache.k[:, :, :, :46].clone()))
    for tokens, keys in results[1:]:
        assert tokens == results[0][0]
        assert torch.allclose(keys, results[0][1], atol=1e-6)


def test_samples_keep_their_outputs_when_they_move_to_a_smaller_bucket(tiny_tokenizer):
    """Samples that stop early leave the bucket; the live ones move down to rows of a smaller bucket mid-stream,
    and each one's tokens still equal its own full-forward oracle."""
    tok = tiny_tokenizer
    m = make_tiny_model(tok.get_vocab_size(), sequence_len=256).eval()
    end = tok.encode_special("<|assistant_end|>")
    with torch.no_grad():
        m.lm_head.weight[end] = torch.randn(m.lm_head.weight.size(1), generator=torch.Generator().manual_seed(3)) * 0.4
    prompt = encode(tok, "Hello there")
    engine = Engine(m, tok, use_tools=False)
    results, masks = engine.generate_batch(prompt, 5, max_tokens=20, temperature=1.0, top_k=50, seed=11)
    expected = oracle(m, tok, prompt, 5, 20, temperature=1.0, top_k=50, seed=11, use_tools=False)
    assert list(zip(results, masks)) == expected
    assert len({rows for rows, _, _ in engine.decoder.built_steps}) > 1  # the premise: the bucket did change


def test_requests_moving_between_buckets_give_the_same_outputs_as_alone(model, tiny_tokenizer):
    """Requests join and leave a 4-slot scheduler, so its decode batch grows 1 → 2 → 4 and shrinks again; each
    request's tokens equal the same request run alone in a fresh scheduler."""
    tok = tiny_tokenizer
    settings = [dict(temperature=0.0), dict(temperature=1.0, top_k=50, seed=1), dict(temperature=0.8, seed=2),
                dict(temperature=1.0, top_k=5, top_p=0.8, seed=3)]
    prompts = [encode(tok, t) for t in ("The capital of France is", "def add(a, b):", "Once upon a time", "A")]
    lengths = [24, 6, 18, 10]

    def run(scheduler, indices, staggered):
        requests = {}
        for i in indices:
            requests[i] = scheduler.submit(Request(tokens=prompts[i], max_tokens=lengths[i], **settings[i]))
            if staggered:  # wait for its first token, so the next one joins mid-generation
                requests[i] = (requests[i], [next(requests[i].stream(timeout=60))])
        return {i: (r[1] + list(r[0].stream(timeout=120)) if staggered else list(r.stream(timeout=120)))
                for i, r in requests.items()}

    together = BatchScheduler(model, tok, slots=4, use_tools=False)
    try:
        outputs = run(together, range(4), staggered=True)
        buckets = {rows for rows, _, _ in together.decoder.built_steps}
    finally:
        together.shutdown()
    assert {1, 2, 4} <= buckets  # the premise: the batch crossed buckets
    for i in range(4):
        alone = BatchScheduler(model, tok, slots=4, use_tools=False)
        try:
            assert outputs[i] == run(alone, [i], staggered=False)[i], f"request {i}"
        finally:
            alone.shutdown()


def test_cast_inference_weights_follow_the_model_they_were_cast_from(tiny_tokenizer):
    """RL trains the fp32 model between rollouts: the engine's bf16 copy sees every in-place update."""
    source = make_tiny_model(tiny_tokenizer.get_vocab_size(), sequence_len=256)
    engine = Engine(source, tiny_tokenizer, use_tools=False, dtype=torch.bfloat16)
    assert engine.model is not source and engine.model.lm_head.weight.dtype == torch.bfloat16
    assert engine.decoder is None and source.lm_head.weight.dtype == torch.float32
    prompt = encode(tiny_tokenizer, "Hello")
    engine.generate_batch(prompt, 1, max_tokens=3, temperature=0.0)
    assert engine.decoder.cache.k.dtype == torch.bfloat16
    with torch.no_grad():
        source.lm_head.weight.mul_(-1.0)  # an optimizer step, in place
    engine.generate_batch(prompt, 1, max_tokens=3, temperature=0.0)
    assert torch.equal(engine.model.lm_head.weight, source.lm_head.weight.to(torch.bfloat16))


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
@torch.no_grad()
def test_a_captured_step_equals_the_eager_step(tiny_tokenizer, compiled):
    """On a GPU: the same prefilled caches and inputs through an eager and a captured (CUDA-graph) step give the
    same tokens and the same caches, step after step, with rows sitting out and the bucket changing."""
    model = make_tiny_model(tiny_tokenizer.get_vocab_size(), sequence_len=256).cuda().eval()
    decoders = [Decoder(model, 4, 256, torch.float32, DecodePolicy()),
                Decoder(model, 4, 256, torch.float32, DecodePolicy(compile=compiled, graph=True))]
    prompts = [torch.randint(0, 200, (1, n), generator=torch.Generator().manual_seed(n)).cuda() for n in (5, 17, 9, 3)]
    for d in decoders:
        for slot, p in enumerate(prompts):
            model(p, kv_cache=d.cache, slots=[slot])
        d.set_sampling([(0.0, 0, 1.0), (1.0, 50, 1.0), (0.7, 0, 0.9), (1.0, 5, 1.0)])
    schedule = [(4, [True, True, True, True]), (4, [True, False, True, True]), (2, [True, True]),
                (4, [True, True, False, True]), (1, [True])]
    generator = torch.Generator().manual_seed(0)
    for rows, active in schedule * 3:
        uniform = torch.rand(rows, generator=generator)
        outs = []
        for d in decoders:
            d.set_active(active + [False] * (4 - rows))
            d.uniform[:rows].copy_(uniform)
            outs.append(d.step(rows, 128, sampler_key(d, rows)).tolist())
            d.sampled(outs[-1])
        assert outs[0] == outs[1]
        assert torch.equal(decoders[0].cache.pos, decoders[1].cache.pos)
        held = slice(0, 256)  # every position but the spare one, which rows sitting out scribble on
        assert torch.allclose(decoders[0].cache.k[:, :, :, held], decoders[1].cache.k[:, :, :, held], atol=1e-5)
        assert torch.allclose(decoders[0].cache.v[:, :, :, held], decoders[1].cache.v[:, :, :, held], atol=1e-5)
    assert len(decoders[1].built_steps) == 3  # one capture per key, replayed after that
    assert decoders[1].captured == set(decoders[1].built_steps)  # every step really is a graph


def sampler_key(decoder, rows):
    from nanochat.sampling import sampler_candidates
    settings = list(zip(decoder.temperature[:rows].tolist(), decoder.top_k[:rows].tolist()))
    return sampler_candidates(settings, decoder.vocab_size)


@needs_cuda
def test_graph_engine_decodes_what_the_eager_engine_does_on_a_gpu(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer.get_vocab_size(), sequence_len=256).cuda().eval()
    prompt = encode(tiny_tokenizer, "Once upon a time")
    eager = Engine(model, tiny_tokenizer, use_tools=False, dtype=torch.float32, policy=DecodePolicy())
    graphed = Engine(model, tiny_tokenizer, use_tools=False, dtype=torch.float32,
                     policy=DecodePolicy(compile=True, graph=True))
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=50, seed=4)):
        assert graphed.generate_batch(prompt, 3, max_tokens=20, **kwargs) == \
            eager.generate_batch(prompt, 3, max_tokens=20, **kwargs)
    assert graphed.decoder.captured and graphed.decoder.captured == set(graphed.decoder.built_steps)


def test_the_decode_policy_can_be_forced_and_a_bad_one_is_named(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DECODE", "compile")
    assert DecodePolicy.for_device(torch.device("cpu")) == DecodePolicy(compile=True)
    monkeypatch.delenv("NANOCHAT_DECODE")
    # a long job (an evaluation, RL rollouts) compiles its CPU steps: the compile pays for itself
    assert DecodePolicy.for_device(torch.device("cpu"), COMPILE_FROM_STEPS) == DecodePolicy(compile=True)
    assert DecodePolicy.for_device(torch.device("cpu"), COMPILE_FROM_STEPS - 1) == DecodePolicy()
    monkeypatch.setenv("NANOCHAT_DECODE", "eager")
    assert DecodePolicy.for_device(torch.device("cpu"), COMPILE_FROM_STEPS) == DecodePolicy()
    monkeypatch.setenv("NANOCHAT_DECODE", "graph")
    with pytest.raises(UserError, match="NANOCHAT_DECODE='graph'.*need CUDA"):
        DecodePolicy.for_device(torch.device("cpu"))
    monkeypatch.delenv("NANOCHAT_DECODE")
    assert DecodePolicy.for_device(torch.device("cpu")) == DecodePolicy()


FAULTS_SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "engine":
    from bench.inference import Vocab, make
    from nanochat.engine import Engine
    Engine(make(1, 512, 64), Vocab(512)).generate_batch([1, 2, 3], 1, max_tokens=2)
big = torch.ones(8 << 20, dtype=torch.uint8)
del big  # mapped and unmapped: glibc's own thresholds rise to 8 MiB (mapping) and 16 MiB (handing back)
for round in range(6):
    if round == 1:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(24)]  # 24 MiB of short-lived tensors
    del held
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 5)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_a_cpu_engine_keeps_freed_memory_for_its_next_tensors():
    """Short-lived tensors of a few MiB, as a decode step's logits, reuse freed memory instead of faulting in
    fresh pages each time (a fresh process, without the engine, as the control)."""
    def faults_per_round(mode):
        run = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        return float(run.stdout.split()[-1])

    assert faults_per_round("plain") > 200  # glibc's defaults hand the 24 MiB back and fault it in again
    assert faults_per_round("engine") < 20


def graph_decoder_whose_capture_fails(decoder: Decoder, monkeypatch) -> Decoder:
    """A CPU decoder turned into a CUDA-graph one whose every capture fails where a real one raises (inside
    `_graph_of`, caught by `_capture`): what a GPU with a step that synchronises with the host gets."""
    decoder.policy = DecodePolicy(graph=True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())

    def capture_fails(key):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
    monkeypatch.setattr(decoder, "_graph_of", capture_fails)
    return decoder


def test_a_failed_capture_is_recorded_and_every_step_it_leaves_uncaptured_is_counted(model, monkeypatch):
    eager = Decoder(model, 2, 256, torch.float32, DecodePolicy())
    decoder = graph_decoder_whose_capture_fails(Decoder(model, 2, 256, torch.float32, DecodePolicy()), monkeypatch)
    outs = []
    for d in (eager, decoder):
        d.set_sampling([(0.0, 0, 1.0)] * 2)
        d.set_active([True, False])
        d.feed({0: 5})
        with pytest.warns(UserWarning, match="could not be captured") if d is decoder else contextlib.nullcontext():
            outs.append([d.step(1, 128, 0).tolist() for _ in range(3)])
    assert outs[0] == outs[1]  # uncaptured steps are right, only slower
    assert decoder.captured == set()
    assert decoder.capture_failures == {(1, 128, 0): "CUDA error: operation not permitted when stream is capturing"}
    assert decoder.uncaptured_steps == 3 and eager.uncaptured_steps == 0


def test_the_start_up_capture_check_names_the_failure(model, monkeypatch):
    assert Decoder(model, 2, 256, torch.float32, DecodePolicy()).check_capture() is None  # nothing to capture
    decoder = graph_decoder_whose_capture_fails(Decoder(model, 2, 256, torch.float32, DecodePolicy()), monkeypatch)
    with pytest.warns(UserWarning):
        assert "operation not permitted" in decoder.check_capture()
    assert decoder.uncaptured_steps == 0  # a check, not a step


def test_the_server_says_once_at_start_that_its_decode_steps_are_not_captured(model, tiny_tokenizer, monkeypatch,
                                                                                capsys):
    from scripts.chat_web import say_uncaptured_decoding
    worker = BatchScheduler(model, tiny_tokenizer, slots=2, dtype=torch.float32, policy=DecodePolicy())
    try:
        say_uncaptured_decoding([worker])
        assert capsys.readouterr().out == ""  # nothing to capture, nothing said
        graph_decoder_whose_capture_fails(worker.decoder, monkeypatch)
        say_uncaptured_decoding([worker])
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 1 and "run without CUDA graphs" in lines[0] and "operation not permitted" in lines[0]
    finally:
        worker.shutdown()
