"""The memory model: what it counts from the real model and optimizer on the meta device, the budgets d20 must hold
on an 80 GB GPU, and the dry run that prints it."""

import os
import subprocess
import sys

import pytest
import torch

from nanochat import softcap_loss
from nanochat.gpt import GPT, GPTConfig
from nanochat.common import UserError
from nanochat.memory import (GiB, estimate_memory, estimate_memory_for_batches, pick_device_batch_size,
                             reference_saved_per_layer)
from nanochat.optim_math import neuron_stat_shape
from nanochat.recompute import mix_and_norm, relu_square_linear

TINY = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
D8 = GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=8, n_head=4, n_kv_head=4, n_embd=512)
D20 = GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280)


def test_static_memory_is_the_real_tensors_of_model_and_optimizer():
    est = estimate_memory(TINY, device_batch_size=2, world_size=1, device_type="cpu", dtype=torch.float32)
    with torch.device("meta"):
        model = GPT(TINY)
    n = model.num_params()["total"]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert est.parameters == 4 * n + buffers and est.gradients == 4 * n
    matrices = list(model.blocks.parameters())
    muon = sum(p.numel() + torch.Size(neuron_stat_shape(p)).numel() for p in matrices)
    adam = 2 * (n - sum(p.numel() for p in matrices))
    assert est.optimizer_state == 4 * (muon + adam)


def test_saved_activations_grow_with_the_device_batch():
    one, two = (estimate_memory(TINY, device_batch_size=b, device_type="cpu", dtype=torch.float32) for b in (2, 4))
    assert all(a > 0 for a in one.activations_per_layer) and one.loss > 0
    # weights cast for the matmuls are saved too and do not grow with the batch
    assert all(a < b <= 2 * a for a, b in zip(one.activations_per_layer, two.activations_per_layer))


def test_sharded_ranks_hold_a_world_share_of_the_optimizer_state():
    one = estimate_memory(TINY, device_batch_size=2, world_size=1, device_type="cpu", dtype=torch.float32)
    four = estimate_memory(TINY, device_batch_size=2, world_size=4, device_type="cpu", dtype=torch.float32)
    assert four.optimizer_state < one.optimizer_state / 2
    # communication buffers live inside step() only: a transient, never static memory
    assert four.static == four.parameters + four.gradients + four.optimizer_state and four.step_transient > 0
    assert four.parameters == one.parameters and four.gradients == one.gradients


def test_the_table_names_every_component():
    table = estimate_memory(TINY, device_batch_size=2, device_type="cpu", dtype=torch.float32).table()
    for name in ("parameters", "gradients", "optimizer state", "step transient", "activations saved per layer",
                 "loss", "backward peak"):
        assert name in table


def test_dry_run_prints_the_memory_table(base_dir, capsys):
    from scripts.base_train import main
    main(["--depth=2", "--head-dim=32", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=512",
          "--device-type=cpu", "--dry-run"])
    out = capsys.readouterr().out
    assert "memory per GPU" in out and "device batch 4 x 64 tokens" in out and "backward peak" in out


# --- the dtype policy (defect 4b): embedding tables in bf16 on CUDA, fp32 masters elsewhere ---------------------------

def test_cuda_bf16_policy_stores_the_embedding_tables_in_bf16_and_keeps_fp32_masters():
    with torch.device("meta"):
        model = GPT(TINY)
    model.apply_dtype_policy("cuda", torch.bfloat16)
    embeddings = [model.wte.weight, *model.value_embeds.parameters()]
    assert all(p.dtype == torch.bfloat16 for p in embeddings)
    ids = {id(p) for p in embeddings}
    assert all(p.dtype == torch.float32 for p in model.parameters() if id(p) not in ids)


@pytest.mark.parametrize("device_type, dtype", [("cpu", torch.bfloat16), ("cuda", torch.float32)])
def test_other_policies_keep_every_parameter_an_fp32_master(device_type, dtype):
    with torch.device("meta"):
        model = GPT(TINY)
    model.apply_dtype_policy(device_type, dtype)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_embedding_tables_train_a_step_on_one_process(monkeypatch):
    monkeypatch.setattr(softcap_loss._run_chunk, "failed", True)  # eager chunks: no compile in this test
    torch.manual_seed(0)
    model = GPT(TINY)
    model.init_weights()
    model.apply_dtype_policy("cuda", torch.bfloat16)  # the CUDA policy, simulated on the CPU
    before = model.wte.weight.detach().clone()
    optimizer = model.setup_optimizer()
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.sequence_len))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert model.wte.weight.grad.dtype == torch.bfloat16
    optimizer.step()
    assert model.wte.weight.dtype == torch.bfloat16 and not torch.equal(model.wte.weight, before)
    assert torch.isfinite(model.wte.weight).all()


TWO_RANK_STEP = """
import torch, torch.distributed as dist
from nanochat.gpt import GPT, GPTConfig
dist.init_process_group("gloo")
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
model.init_weights()
model.apply_dtype_policy("cuda", torch.bfloat16)  # the CUDA policy, simulated on the CPU
optimizer = model.setup_optimizer()
idx = torch.randint(0, 128, (2, 32))
before = model.wte.weight.detach().clone()
with torch.autocast("cpu", dtype=torch.bfloat16):
    model(idx, idx).backward()
optimizer.step()
assert model.wte.weight.dtype == torch.bfloat16 and not torch.equal(model.wte.weight, before)
# the moments of the bf16 table's slice follow its dtype, those of fp32 parameters stay fp32
assert optimizer.state[model.wte.weight]["exp_avg"].dtype == torch.bfloat16
assert optimizer.state[model.lm_head.weight]["exp_avg"].dtype == torch.float32
dist.destroy_process_group()
"""


def test_bf16_embedding_tables_train_a_step_on_two_processes(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(TWO_RANK_STEP)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_cuda_policy_halves_the_embedding_tables_in_the_memory_model():
    cpu = estimate_memory(TINY, device_batch_size=2, device_type="cpu", dtype=torch.bfloat16)
    cuda = estimate_memory(TINY, device_batch_size=2, device_type="cuda", dtype=torch.bfloat16)
    counts = TINY.param_counts()
    tables = counts["wte"] + counts["value_embeds"]
    assert cpu.parameters - cuda.parameters == 2 * tables and cpu.gradients - cuda.gradients == 2 * tables


# --- activations (defect 4c): the loss in chunks on every device, two cheap tensors recomputed in backward ------------

def test_the_loss_keeps_no_logits_of_the_whole_batch_off_the_cpu():
    B = 16
    est = estimate_memory(TINY, device_batch_size=B, device_type="cuda", dtype=torch.bfloat16)  # traced on meta
    logits = B * TINY.sequence_len * TINY.vocab_size * 4  # fp32
    assert est.loss < logits / 2
    assert all(TINY.vocab_size not in shape or shape == (TINY.vocab_size, TINY.n_embd)
               for shape, _ in est.saved_shapes["loss"])


def test_a_layer_keeps_one_tensor_of_the_mlp_width_and_not_the_mixed_residual():
    B, T, C = 2, TINY.sequence_len, TINY.n_embd
    est = estimate_memory(TINY, device_batch_size=B, device_type="cuda", dtype=torch.bfloat16)
    layer = [shape for shape, _ in est.saved_shapes[0]]
    assert sum(torch.Size(s).numel() == B * T * 4 * C for s in layer) == 1  # the pre-activation, not its ReLU²
    # (B, T, C) tensors: block input (for the mix), normed input, residual after attention, its norm; attention's
    # q, k, v, output and rotary outputs are (B, T, H, D)
    assert sum(s == (B, T, C) or s == (B * T, C) for s in layer) == 4


def test_mix_and_norm_equals_the_plain_ops_in_value_and_gradient():
    torch.manual_seed(0)
    x, x0 = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    a, b = torch.tensor(1.1, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    gh, gn = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)

    def grads(fn):
        inputs = [t.clone().requires_grad_() for t in (x, x0, a, b)]
        h, n = fn(*inputs)
        torch.autograd.backward([h, n], [gh, gn])
        return [h.detach(), n.detach()] + [t.grad for t in inputs]

    def plain(x, x0, a, b):
        h = a * x + b * x0
        return h, torch.nn.functional.rms_norm(h, (16,))

    for got, want in zip(grads(mix_and_norm), grads(plain)):
        torch.testing.assert_close(got, want)


def test_relu_square_linear_equals_the_plain_ops_in_value_and_gradient():
    torch.manual_seed(0)
    u, w = torch.randn(3, 4, 32, dtype=torch.float64), torch.randn(8, 32, dtype=torch.float64)
    g = torch.randn(3, 4, 8, dtype=torch.float64)

    def grads(fn):
        inputs = [t.clone().requires_grad_() for t in (u, w)]
        y = fn(*inputs)
        y.backward(g)
        return [y.detach()] + [t.grad for t in inputs]

    plain = lambda u, w: torch.nn.functional.linear(torch.relu(u).square(), w)  # noqa: E731
    for got, want in zip(grads(relu_square_linear), grads(plain)):
        torch.testing.assert_close(got, want)


# --- budgets: d20 at the speedrun's device batch 32 x 2048 in bf16 fits an 80 GB GPU by construction -----------------

@pytest.fixture(scope="module")
def d20():
    return {world: estimate_memory(D20, device_batch_size=32, world_size=world, device_type="cuda",
                                   dtype=torch.bfloat16) for world in (1, 8)}


def test_d20_static_memory_on_one_gpu_is_at_most_9_gib(d20):
    assert d20[1].static <= 9 * GiB, d20[1].table()


def test_d20_static_memory_per_rank_on_8_gpus_is_at_most_6_gib(d20):
    assert d20[8].static <= 6 * GiB, d20[8].table()


def test_d20_keeps_no_more_per_layer_than_the_reference_design(d20):
    # the reference design's layer, counted from first principles (nanochat.memory.reference_saved_per_layer);
    # the same trace run on the reference code's eager graph gives 3.09 GiB a layer
    budget = reference_saved_per_layer(D20, 32)
    assert max(d20[1].activations_per_layer) <= budget, d20[1].table()


def test_d20_estimated_backward_peak_leaves_headroom_on_an_80_gb_gpu(d20):
    assert d20[1].backward_peak <= 64 * GiB, d20[1].table()


# --- --device-batch-size=auto -----------------------------------------------------------------------------------------

def test_auto_batch_on_an_80_gb_gpu_is_the_speedruns_32_at_d20():
    free = int(79.2 * GiB)
    for world in (1, 8):
        batch, reason = pick_device_batch_size(D20, 2 ** 19, world, "cuda", torch.bfloat16, free)
        assert batch == 32 and "device batch auto: 32" in reason and "79.2 GiB free" in reason


def test_auto_batch_on_a_smaller_gpu_is_the_largest_power_of_two_that_fits():
    free = 4 * GiB
    batch, reason = pick_device_batch_size(D8, 2 ** 16, 1, "cuda", torch.bfloat16, free)
    assert batch in (1, 2, 4, 8, 16) and f"{2 * batch} would need" in reason
    # the two-point extrapolation agrees with traces at the chosen batch and the next one up
    fits, too_big = estimate_memory_for_batches(D8, [batch, 2 * batch], 1, "cuda", torch.bfloat16)
    assert fits.peak <= 0.9 * free < too_big.peak


def test_auto_batch_says_when_not_even_one_sequence_fits():
    with pytest.raises(UserError, match="depth 8 does not fit.*--depth"):
        pick_device_batch_size(D8, 2 ** 16, 1, "cuda", torch.bfloat16, GiB // 2)


def test_auto_batch_divides_the_total_batch():
    batch, _ = pick_device_batch_size(D8, 3 * 2048 * 8, 1, "cuda", torch.bfloat16, 80 * GiB)
    assert batch == 8  # 24 sequences: 8 divides them, 16 does not


def test_auto_batch_without_a_gpu_takes_the_default_and_says_so(base_dir, capsys):
    from scripts.base_train import main
    main(["--depth=2", "--head-dim=32", "--max-seq-len=64", "--device-batch-size=auto", "--total-batch-size=1024",
          "--device-type=cpu", "--dry-run"])
    out = capsys.readouterr().out
    assert "device batch auto: 16 on cpu" in out and "device batch 16 x 64 tokens" in out


def test_device_batch_size_must_be_a_number_or_auto(capsys):
    from scripts.base_train import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--device-batch-size=big"])
    assert "neither a number of sequences nor auto" in capsys.readouterr().err
