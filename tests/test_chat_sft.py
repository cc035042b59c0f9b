"""SFT: only the assistant's tokens are supervised; a tiny run lowers that loss; resume continues exactly."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_model
from nanochat.checkpoint import build_model, checkpoint_dir, load_checkpoint
from nanochat.gpt import GPTConfig
from nanochat.scaling import finetune_rates, sft_lr_multiplier, sft_muon_momentum, sft_schedule
from nanochat.sft_data import SFTLoader, sft_mixture

TOOL_CONVERSATION = {"messages": [
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Computing "}, {"type": "python", "text": "6*7"},
                                      {"type": "python_output", "text": "42"}, {"type": "text", "text": "so 42."}]}]}


class OneConversation:
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return TOOL_CONVERSATION


def test_only_assistant_tokens_and_tool_calls_are_targets(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask = tok.render_conversation(TOOL_CONVERSATION)
    x, y = next(iter(SFTLoader(OneConversation(), tok, batch_size=1, seq_len=len(ids) * 2 - 1)))
    row = y[0].tolist()
    supervised = [t for t in row if t >= 0]
    expected = [ids[i] for i in range(1, len(ids)) if mask[i] == 1]
    assert supervised[:len(expected)] == expected  # two copies packed in the row, each supervised the same way
    decoded = tok.decode([t for t in supervised[:len(expected)]])
    assert "Computing" in decoded and "6*7" in decoded and "42" not in decoded.replace("so 42.", "")
    assert tok.encode_special("<|output_start|>") not in supervised
    assert tok.encode("What is 6*7?")[0] not in supervised[:2]


def test_padding_never_contributes_to_the_loss(tiny_tokenizer):
    loader = SFTLoader(OneConversation(), tiny_tokenizer, batch_size=2, seq_len=200)
    x, y = next(iter(loader))
    n = len(tiny_tokenizer.render_conversation(TOOL_CONVERSATION)[0])
    per_row = 200 // n  # whole conversations only, then padding
    assert (y[:, per_row * n:] == -1).all()


class Numbered:
    """n distinct one-turn conversations of different lengths."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": f"question {i}"},
                             {"role": "assistant", "content": "yes " * (1 + i % 7)}]}


def test_lr_schedule_runs_on_epoch_progress_flat_then_linear_to_zero():
    values = [sft_lr_multiplier(p / 100) for p in range(101)]
    assert values[:51] == [1.0] * 51
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == 0.0
    assert sft_lr_multiplier(0.05, warmup_ratio=0.1) == pytest.approx(0.5)
    assert sft_lr_multiplier(0.9, warmdown_ratio=0.2, final_lr_frac=0.1) == pytest.approx(0.55)


def test_muon_momentum_warms_from_0_85_to_0_95_over_300_steps():
    assert sft_muon_momentum(0) == 0.85
    assert sft_muon_momentum(150) == pytest.approx(0.90)
    assert sft_muon_momentum(300) == sft_muon_momentum(5000) == pytest.approx(0.95)


def test_apply_schedule_sets_every_group_from_its_initial_rate():
    model = make_tiny_model(300)
    optimizer = model.setup_optimizer(weight_decay=0.1)
    optimizer.apply_schedule(**sft_schedule(0.9, 150, 0.0, 0.5, 0.0))
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * 0.2)
        if group["kind"] == "muon":
            assert group["momentum"] == pytest.approx(0.90) and group["weight_decay"] == 0.1


def test_learning_rates_are_the_base_runs_flags_or_defaults_times_the_fraction():
    base_args = {"embedding_lr": None, "unembedding_lr": None, "matrix_lr": 0.03, "scalar_lr": None}
    lrs = finetune_rates(base_args, {"scalar_lr": 1.0}, 0.8)
    assert lrs == pytest.approx({"embedding_lr": 0.24, "unembedding_lr": 0.0064, "matrix_lr": 0.024,
                                 "scalar_lr": 0.8})  # the LM head inherits the base run's 0.008, as the reference


def test_warm_start_takes_the_base_moments_but_keeps_this_runs_rates():
    base = make_tiny_model(V := 300)
    base_opt = base.setup_optimizer(weight_decay=0.1)
    base(torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))).backward()
    base_opt.step()
    sft = make_tiny_model(V)
    sft_opt = sft.setup_optimizer(embedding_lr=0.24, matrix_lr=0.016, weight_decay=0.0)
    wanted = [(g["lr"], g["weight_decay"]) for g in sft_opt.param_groups]
    sft_opt.warm_start([base_opt.state_dict()])
    assert [(g["lr"], g["weight_decay"]) for g in sft_opt.param_groups] == wanted
    muon = next(p for p in sft.blocks.parameters())
    base_muon = next(p for p in base.blocks.parameters())
    assert torch.equal(sft_opt.state[muon]["momentum_buffer"], base_opt.state[base_muon]["momentum_buffer"])
    assert torch.equal(sft_opt.state[sft.wte.weight]["exp_avg_sq"], base_opt.state[base.wte.weight]["exp_avg_sq"])


def test_one_epoch_loader_packs_every_conversation_exactly_once(tiny_tokenizer):
    task = Numbered(37)
    loader = SFTLoader(task, tiny_tokenizer, batch_size=2, seq_len=64, buffer_size=8, epochs=1)
    it = iter(loader)
    rows = []
    while not loader.finished:
        x, _ = next(it)
        rows += x.tolist()
    bos = tiny_tokenizer.get_bos_token_id()
    text = tiny_tokenizer.decode([t for row in rows for t in row if t != bos])
    assert loader.consumed == 37 and loader.progress == 1.0
    assert all(text.count(f"question {i}<") == 1 for i in range(37))


def test_empty_turns_in_a_row_are_trained_on_not_fatal(tiny_tokenizer):
    class Empty(OneConversation):
        def __getitem__(self, i):
            return {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}

    _, y = next(iter(SFTLoader(Empty(), tiny_tokenizer, batch_size=1, seq_len=16)))
    assert (y == tiny_tokenizer.encode_special("<|assistant_end|>")).sum() == 3  # three packed, each supervised


@pytest.fixture
def sft_env(mirror, tiny_checkpoint, base_dir):
    return dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_MIRROR=str(mirror), OMP_NUM_THREADS="1")


SFT = ["--device-batch-size=4", "--max-seq-len=128", "--eval-every=-1", "--eval-steps=2", "--init-lr-frac=30",
       "--spelling-size=200", "--simple-spelling-size=200"]


def run_sft(env, *args):
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_sft", *SFT, *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def supervised_loss(model, batches):
    with torch.no_grad():
        return sum(model(x, y).item() for x, y in batches) / len(batches)


def test_tiny_sft_lowers_the_loss_on_its_training_conversations(sft_env, base_dir, tiny_tokenizer, monkeypatch):
    proc = run_sft(sft_env, "--num-iterations=12", "--unembedding-lr=0.004")  # × 30 stays stable on the tiny model
    first = [line for line in proc.stdout.splitlines() if not line.startswith("attention:")][0]  # after the kernel's
    assert "offline: SmolTalk → HH-RLHF" in first
    monkeypatch.setenv("NANOCHAT_MIRROR", sft_env["NANOCHAT_MIRROR"])
    mixture, _ = sft_mixture([], 200, 200)
    loader = iter(SFTLoader(mixture, tiny_tokenizer, 4, 128))
    batches = [next(loader) for _ in range(12)]
    base = load_checkpoint(checkpoint_dir("base", "d2"), 1)
    sft = load_checkpoint(checkpoint_dir("sft", "d2"), 12)
    before = supervised_loss(build_model(GPTConfig(**base["meta"]["model_config"]), "cpu", base["model"]), batches)
    after = supervised_loss(build_model(GPTConfig(**sft["meta"]["model_config"]), "cpu", sft["model"]), batches)
    assert after < before - 0.3
    assert (base_dir / "report" / "d2" / "chat-sft.json").exists()


def test_sft_without_num_iterations_stops_after_one_counted_epoch(sft_env, base_dir, monkeypatch, capsys):
    import scripts.chat_sft as chat_sft
    from tasks.common import TaskMixture
    for key in ("NANOCHAT_BASE_DIR", "NANOCHAT_MIRROR"):
        monkeypatch.setenv(key, sft_env[key])
    monkeypatch.setattr(chat_sft, "sft_mixture", lambda *args: (TaskMixture([Numbered(30)]), []))
    chat_sft.main(["--eval-every=-1", "--eval-steps=1"])  # the base run's batch: 4 rows of 128 tokens
    out = capsys.readouterr().out
    assert "SFT done after" in out and "30 conversations packed of 30" in out
    steps = int(out.split("SFT done after ")[1].split()[0])
    assert checkpoint_dir("sft", "d2").joinpath(f"step_{steps:06d}").exists()
    assert sum(line.startswith("step ") for line in out.splitlines()) == steps


def test_sft_resume_continues_exactly(sft_env, base_dir):
    run_sft(sft_env, "--num-iterations=4", "--save-every=2")
    full = load_checkpoint(checkpoint_dir("sft", "d2"), 4)["model"]
    shutil.rmtree(checkpoint_dir("sft", "d2") / "step_000004")
    proc = run_sft(sft_env, "--num-iterations=4", "--save-every=2", "--resume-from-step=latest")
    assert "resumed SFT from step 2" in proc.stdout
    resumed = load_checkpoint(checkpoint_dir("sft", "d2"), 4)["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_compiled_sft_compiles_once_whatever_the_packing(sft_env, base_dir, monkeypatch):
    """Rows of packed conversations are padded to one (B, T): a 5-step compiled run builds as many graphs as a
    1-step run (dynamo's eager backend counts the graphs; what inductor would make of them does not matter here)."""
    import torch._dynamo
    from scripts import chat_sft
    for key in ("NANOCHAT_MIRROR", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, sft_env[key])
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counting_backend, **kw))
    counts = []
    for steps in (1, 5):
        torch._dynamo.reset()
        graphs.clear()
        chat_sft.main(SFT + [f"--num-iterations={steps}", "--compile=on", "--eval-steps=1"])
        counts.append(len(graphs))
    assert counts[0] >= 1 and counts[1] == counts[0], counts
