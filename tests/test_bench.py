"""The benchmarks still run against the library they measure: each, at a toy size, prints its JSON with the figures
it promises (no timing is asserted; bench/ measures, tests only check that it can)."""

import json


def figures(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_bench_train_reports_tokens_per_second_and_mfu(capsys):
    from bench.train import main
    main(["--depth", "1", "--dtype", "fp32", "--compile", "off", "--vocab-size", "512", "--seq-len", "64",
          "--batch", "2", "--steps", "1"])
    (result,) = figures(capsys)
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] and result["dtype"] == "fp32"


def test_bench_inference_reports_decode_speed_and_bandwidth(capsys):
    from bench.inference import main
    main(["--device", "cpu", "--depth", "1", "--vocab-size", "512", "--prompt-len", "16", "--tokens", "8",
          "--batches", "1", "2", "--cb-requests", "3", "--cb-slots", "2", "--parts", "decode", "cb"])
    (result,) = figures(capsys)
    for key in ("prefill_tok_s", "prefill_mfu", "decode_tok_s_batch1", "decode_tok_s_batch2",
                "decode_bandwidth_util_batch1", "continuous_batching_tok_s"):
        assert result[key] > 0, key


def test_bench_rl_reports_rollout_speed(capsys):
    from bench.rl import main
    main(["--depth", "1", "--vocab-size", "512", "--prompt-len", "16", "--samples", "2", "--tokens", "8"])
    (result,) = figures(capsys)
    assert result["depth"] == 1 and result["vocab_size"] == 512


def test_the_bandwidth_figure_counts_a_shared_prompt_once_where_the_step_reads_it_once():
    import torch
    from bench.inference import decode_bytes_per_step, make, reads_prompt_once
    from nanochat.decode import DecodePolicy
    model = make(1, 512, 64)
    c = model.config
    apart = decode_bytes_per_step(model, 4, 40, 4, 4)
    together = decode_bytes_per_step(model, 4, 40, 4, 4, shared=30)
    assert apart - together == (4 - 1) * 30 * 2 * c.n_kv_head * c.head_dim * c.n_layer * 4
    assert decode_bytes_per_step(model, 1, 40, 4, 4, shared=30) == decode_bytes_per_step(model, 1, 40, 4, 4)
    assert reads_prompt_once(torch.device("cpu"), DecodePolicy())
    assert reads_prompt_once(torch.device("cpu"), DecodePolicy(compile=True))
    assert not reads_prompt_once(torch.device("cuda"), DecodePolicy(compile=True, graph=True))


def test_bench_inference_exits_non_zero_when_a_timed_step_was_not_captured(capsys, monkeypatch):
    """A CUDA-graph run whose captures fail (simulated where a real failure is caught: tests/test_decode.py) still
    prints its figures, then says they are of uncaptured steps and exits 1."""
    import pytest
    from bench.inference import main
    from nanochat.decode import Decoder, DecodePolicy
    from nanochat.engine import Engine
    from test_decode import graph_decoder_whose_capture_fails

    def new_decoder(engine, slots, max_seq_len):
        decoder = Decoder(engine.model, slots, max_seq_len, engine.dtype, DecodePolicy())
        return graph_decoder_whose_capture_fails(decoder, monkeypatch)
    monkeypatch.setattr(Engine, "new_decoder", new_decoder)
    with pytest.raises(SystemExit) as exit_, pytest.warns(UserWarning, match="could not be captured"):
        main(["--device", "cpu", "--graph", "on", "--compile", "off", "--depth", "1", "--vocab-size", "512",
              "--prompt-len", "16", "--tokens", "8", "--batches", "1", "--parts", "decode"])
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    (result,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert result["decode_uncaptured_steps_batch1"] == 7  # every timed step: 8 tokens, the first from the prefill
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ran without their CUDA graph" in errors[0] and "operation not permitted" in errors[0]
