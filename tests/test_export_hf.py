"""The Hugging Face export against our own model as the oracle: a tiny checkpoint with a short attention window is
exported through `python -m scripts.export_hf` and reloaded with transformers' Auto classes; its logits, greedy
generations, tokenizer and chat template must be ours."""

import json
import os
import re

import pytest
import torch

from conftest import FIXTURE_TEXT, make_tiny_model, mirror_texts, tiny_meta

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TAG = "d2"
CONVERSATION = {"messages": [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 17 * 23?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute that."},
        {"type": "python", "text": "17 * 23"},
        {"type": "python_output", "text": "391"},
        {"type": "text", "text": "17 * 23 = 391."}]},
    {"role": "user", "content": "And 391 / 17?\nShow the steps."},
]}


def save_tiny_checkpoint(base_dir, tokenizer, **model_config_extra):
    from nanochat.checkpoint import MARKER, checkpoint_dir, save_checkpoint
    # 3 layers, so backout takes the middle one; smear's lambda starts at 0 and is raised so that it matters
    model = make_tiny_model(tokenizer.get_vocab_size(), sequence_len=256, window_pattern="SL", n_layer=3,
                            smear=True, backout=True).eval()
    with torch.no_grad():
        model.smear_lambda.fill_(0.5)
    path = save_checkpoint(checkpoint_dir("sft", TAG), 5, model, tiny_meta(model, "sft", model_tag=TAG))
    if model_config_extra:  # a checkpoint of an architecture this code does not know: its meta.json has more fields
        meta = json.loads((path / "meta.json").read_text())
        meta["model_config"].update(model_config_extra)
        (path / "meta.json").write_text(json.dumps(meta))
        marker = json.loads((path / MARKER).read_text())
        marker["files"]["meta.json"] = (path / "meta.json").stat().st_size
        (path / MARKER).write_text(json.dumps(marker))
    return model


def record_report():
    from nanochat.report import get_report
    report = get_report()
    report.log("Tokenizer training", [{"vocab_size": 1024, "dataset": "mirror sample", "train_chars": 1_000_000}])
    report.log("Base model training", [{"model_tag": TAG, "tokens": 5120, "steps": 10, "dataset": "mirror sample",
                                        "val_bpb": 2.5}])
    report.log("Base model evaluation", [{"model_tag": TAG, "CORE over 21/22 tasks": 0.012,
                                          "HellaSwag (centered)": 0.02, "ARC-Easy (centered)": -0.01,
                                          "CORE missing tasks": "squad"}])
    report.log("Chat SFT", [{"model_tag": TAG, "steps": 5, "conversations": 100}])
    report.log("Chat evaluation sft", [{"model_tag": TAG, "max_problems": 4},
                                       {"ARC-Easy": 0.25, "GSM8K": 0.0, "ChatCORE (partial)": 0.01}])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """(our model, our tokenizer, the fp32 export's folder) with NANOCHAT_BASE_DIR pointing at the checkpoint."""
    from scripts.export_hf import main
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(root / "base"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        tiny_tokenizer.save(root / "base" / "tokenizer")
        model = save_tiny_checkpoint(root / "base", tiny_tokenizer)
        record_report()
        main(["--source", "sft", "--out", str(root / "hf"), "--dtype", "fp32"])
        yield model, tiny_tokenizer, root / "hf"


@pytest.fixture(scope="module")
def hf_model(exported):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(exported[2], trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(exported[2], trust_remote_code=True)


def test_the_folder_loads_through_auto_map_with_our_config(exported, hf_model):
    model, tok, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("NanoChatGPTForCausalLM")
    assert config["attention_windows"] == [129, 257, 257] and config["value_embedding_layers"] == [0, 2]
    assert config["smear"] and config["backout"] and config["backout_layer"] == 1
    assert {"model.safetensors", "generation_config.json", "tokenizer.json", "modeling_nanochat.py",
            "configuration_nanochat.py", "README.md"} <= set(os.listdir(out))
    code = (out / "modeling_nanochat.py").read_text() + (out / "configuration_nanochat.py").read_text()
    assert not re.search(r"^\s*(from|import) nanochat", code, re.M), "the model code must stand alone"
    generation = json.loads((out / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    assert next(hf_model.parameters()).dtype == torch.float32


@torch.no_grad()
def test_logits_equal_ours_in_fp32_including_past_the_short_window(exported, hf_model):
    model, tok, _ = exported
    g = torch.Generator().manual_seed(0)
    prompts = [tok.encode("The capital of France is", prepend="<|bos|>"), tok.encode(FIXTURE_TEXT, prepend="<|bos|>"),
               torch.randint(0, tok.get_vocab_size(), (200,), generator=g).tolist()]  # 200 > window 128
    assert len(prompts[2]) > model.windows[0]
    for ids in prompts:
        x = torch.tensor([ids])
        diff = (model(x) - hf_model(input_ids=x).logits).abs().max().item()
        assert diff <= 1e-4, f"{len(ids)}-token prompt: logits differ by {diff}"


@torch.no_grad()
def test_greedy_generate_equals_our_engine(exported, hf_model):
    from nanochat.engine import Engine
    model, tok, _ = exported
    g = torch.Generator().manual_seed(2)
    prompt = [tok.get_bos_token_id()] + torch.randint(0, 1000, (120,), generator=g).tolist()  # decodes past 128
    ours = [column[0] for column, _ in Engine(model, tok, use_tools=False).generate(prompt, max_tokens=32,
                                                                                     temperature=0.0)]
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    assert out[0, len(prompt):].tolist() == ours
    assert len(ours) == 32, "the tiny model stopped early: pick a prompt that generates 32 tokens"


def test_tokenizer_encodes_mirror_text_and_every_special_token_as_ours(exported, hf_tokenizer):
    _, tok, _ = exported
    texts = mirror_texts(300_000) + [FIXTURE_TEXT]
    mismatched = [t[:80] for t in texts if hf_tokenizer(t, add_special_tokens=False)["input_ids"] != tok.encode(t)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts encode differently, e.g. {mismatched[0]!r}"
    n_tokens = sum(len(ids) for ids in tok.encode(texts))
    print(f"tokenizer agreement: {len(texts)} texts, {n_tokens} tokens, 0 differences")
    for name in tok.get_special_tokens():
        assert hf_tokenizer(name, add_special_tokens=False)["input_ids"] == [tok.encode_special(name)]
    ids = tok.encode(FIXTURE_TEXT)
    assert hf_tokenizer.decode(ids) == tok.decode(ids)


def test_chat_template_renders_as_render_for_completion(exported, hf_tokenizer):
    _, tok, _ = exported
    ids = hf_tokenizer.apply_chat_template(CONVERSATION["messages"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    assert ids == tok.render_for_completion(CONVERSATION)
    with pytest.raises(Exception, match="alternate"):
        hf_tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_model_card_comes_from_the_report(exported):
    card = (exported[2] / "README.md").read_text()
    assert "license: mit" in card
    assert "| CORE over 21/22 tasks | - | 0.0120 |" in card and "Missing from CORE: squad" in card  # chance, BASE
    assert "| HellaSwag | 0.0200 |" in card and "| ARC-Easy | 0.2500 |" in card
    assert "| ChatCORE (partial) | 0.0100 |" in card
    assert "5,120 tokens seen" in card and "mirror sample" in card
    assert "3 layers, width 64" in card and "129, 257, 257" in card and "smear and backout on" in card


def test_the_model_cards_snippet_runs_as_written(exported, capsys):
    """The card's code block, run with DIR set to the export: it loads with remote code trusted for the model and
    the tokenizer alike (a tokenizer with code of its own would not load otherwise), and prints a reply."""
    card = (exported[2] / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet.count("trust_remote_code=True") == 2, snippet
    exec(compile(snippet, "model card snippet", "exec"), {"DIR": str(exported[2])})
    assert capsys.readouterr().out.strip()


def test_bf16_export_writes_bf16_weights(exported, tmp_path, monkeypatch):
    from safetensors import safe_open
    from scripts.export_hf import main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(exported[2].parent / "base"))
    main(["--source", "sft", "--out", str(tmp_path / "bf16"), "--dtype", "bf16"])
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_a_model_the_export_cannot_represent_fails_with_one_line(base_dir, tiny_tokenizer, tmp_path, capsys):
    from nanochat.common import run_cli
    from scripts.export_hf import main
    tiny_tokenizer.save(base_dir / "tokenizer")
    save_tiny_checkpoint(base_dir, tiny_tokenizer, mtp_heads=2)  # a field from an architecture the export lacks
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(["--source", "sft", "--out", str(tmp_path / "out")]))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "\n" not in err
    assert err.startswith("error: cannot export to Hugging Face") and "mtp_heads" in err
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_smear_and_backout_decode_with_the_cache_as_a_full_forward():
    """The flags the recipe may turn on: with them, token-by-token decoding through transformers' Cache (which
    carries the previous token's embedding for smear) must equal one full forward pass, and both must matter."""
    from transformers import DynamicCache
    from nanochat.hf_export.export import load_hf_code
    Config, ForCausalLM = load_hf_code()
    config = Config(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=64, attention_windows=[16, 16, 64],
                    value_embedding_layers=[0, 2], smear=True, backout=True)
    torch.manual_seed(0)
    model = ForCausalLM(config).eval()
    model.model.smear_lambda.fill_(0.7)
    ids = torch.randint(0, 300, (2, 40))
    full = model(input_ids=ids, use_cache=False).logits
    cache = DynamicCache()
    steps = [model(input_ids=ids[:, :24], past_key_values=cache, use_cache=True).logits]
    for t in range(24, 40):
        steps.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    for flag in ("smear", "backout"):
        plain = ForCausalLM(Config(**{**config.to_dict(), flag: False})).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        assert (plain(input_ids=ids, use_cache=False).logits - full).abs().max() > 1e-3, f"{flag} changes nothing"


@torch.no_grad()
def test_left_padded_batches_generate_as_single_prompts(hf_model, hf_tokenizer):
    hf_tokenizer.padding_side = "left"
    conversations = [[{"role": "user", "content": "Why is the sky blue?"}], [{"role": "user", "content": "Hi"}]]
    batch = hf_tokenizer.apply_chat_template(conversations, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True, padding=True)
    together = hf_model.generate(**batch, max_new_tokens=12, do_sample=False)[:, batch["input_ids"].shape[1]:]
    for row, conversation in enumerate(conversations):
        one = hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        alone = hf_model.generate(**one, max_new_tokens=12, do_sample=False)[0, one["input_ids"].shape[1]:]
        assert together[row, :len(alone)].tolist() == alone.tolist()
