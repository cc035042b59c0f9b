"""Export a nanochat checkpoint as a Hugging Face transformers folder that loads with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and computes the same logits.

transformers' built-in `nanochat` model type follows an older version of the architecture (no value embeddings,
per-layer residual/x0 scalars, sliding windows or QK-norm scale, the opposite RoPE rotation, a norm epsilon of 1e-6),
so the export ships its own model code (nanochat/hf_export/hf_code/, standalone) through `auto_map`.
Needs the `hf` extra (transformers, tokenizers).
"""

import os
import shutil
from pathlib import Path

import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, ROPE_BASE, SMEAR_GATE_CHANNELS, SOFTCAP, VE_GATE_CHANNELS
from nanochat.hf_export.tokenizer import build_hf_fast_tokenizer

# The GPTConfig fields the exported model code implements; a checkpoint with any other field (a newer architecture)
# cannot be represented and is refused rather than exported with a silent difference.
KNOWN_CONFIG_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern",
                       "smear", "backout"}
FP32_TOLERANCE = 1e-4
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def check_representable(model_config: dict) -> None:
    unknown = sorted(set(model_config) - KNOWN_CONFIG_FIELDS)
    if unknown:
        raise UserError(f"cannot export to Hugging Face: the checkpoint's model config has {', '.join(unknown)}, "
                        "which nanochat/hf_export/hf_code/modeling_nanochat.py does not implement; extend it (and "
                        "KNOWN_CONFIG_FIELDS in nanochat/hf_export/export.py) first")


def hf_config_kwargs(model: GPT) -> dict:
    """The exported config, every per-layer choice written out (windows, value-embedding layers)."""
    c = model.config
    smear, backout = c.smear, c.backout
    return dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, max_position_embeddings=c.sequence_len,
                attention_windows=list(model.windows),
                value_embedding_layers=[i for i in range(c.n_layer) if c.has_value_embedding(i)],
                value_embedding_gate_channels=VE_GATE_CHANNELS, rope_theta=float(ROPE_BASE), qk_norm_scale=1.2,
                final_logit_softcapping=SOFTCAP, smear=smear, smear_gate_channels=SMEAR_GATE_CHANNELS,
                backout=backout, backout_layer=c.n_layer // 2, tie_word_embeddings=False)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under the exported names, the vocabulary padding rows dropped (no token id reaches them)."""
    V = model.config.vocab_size
    state = {}
    for name, tensor in model.state_dict().items():
        name = name.removeprefix("_orig_mod.")
        if name in ("cos", "sin"):
            continue
        if name.startswith(("wte.", "value_embeds.", "lm_head.")):
            tensor = tensor[:V]
        state[name if name.startswith("lm_head.") else f"model.{name}"] = tensor.detach().float().contiguous()
    return state


def load_hf_code():
    """The exported model classes, imported from hf_code/ as a package (so save_pretrained copies them)."""
    # optional: these and transformers come with the hf extra, which only the export needs
    from nanochat.hf_export.hf_code.configuration_nanochat import NanoChatGPTConfig
    from nanochat.hf_export.hf_code.modeling_nanochat import NanoChatGPTForCausalLM
    return NanoChatGPTConfig, NanoChatGPTForCausalLM


def build_hf_model(model: GPT):
    """An fp32 transformers model holding `model`'s weights; refuses any weight it would not use."""
    check_representable(vars(model.config))
    Config, ForCausalLM = load_hf_code()
    Config.register_for_auto_class()
    ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    with torch.device("meta"):
        hf = ForCausalLM(Config(**hf_config_kwargs(model)))
    hf.to_empty(device="cpu")
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False, assign=True)
    if missing or unexpected:
        raise UserError(f"cannot export to Hugging Face: weights {sorted(unexpected) or ''} have no place in the "
                        f"exported model and {sorted(missing) or ''} are missing; extend "
                        "nanochat/hf_export/hf_code first")
    return hf.float().eval()


@torch.no_grad()
def max_logit_difference(model: GPT, hf_model, prompts: list[list[int]]) -> float:
    """Largest |logit difference| between our model and the export over full forward passes of `prompts`."""
    worst = 0.0
    for ids in prompts:
        x = torch.tensor([ids])
        ours = model(x)
        theirs = hf_model(input_ids=x, use_cache=False).logits
        worst = max(worst, float((ours.float() - theirs.float()).abs().max()))
    return worst


def write_export(out_dir: Path, model: GPT, tokenizer, card: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write the folder atomically (built as OUT.tmp, then renamed over OUT): weights in `dtype`, config,
    generation config, tokenizer files with the chat template, the model code and the model card.
    `model` is on the CPU, in fp32: the export is checked against it before anything is written."""
    from transformers import GenerationConfig  # optional: the hf extra, only the export needs it
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
        raise UserError(f"{out_dir} exists and is not a Hugging Face export: choose an empty or new --out")
    hf = build_hf_model(model)
    check = max_logit_difference(model, hf, [tokenizer.encode("The capital of France is", prepend="<|bos|>")])
    if check > FP32_TOLERANCE:  # the oracle: never write an export that computes something else
        raise UserError(f"the exported model's logits differ from ours by {check:.2e} (> {FP32_TOLERANCE}): "
                        "nanochat/hf_export/hf_code/modeling_nanochat.py no longer matches nanochat/gpt.py")
    special = tokenizer.encode_special
    hf.generation_config = GenerationConfig(
        bos_token_id=tokenizer.get_bos_token_id(), pad_token_id=special("<|assistant_end|>"),
        eos_token_id=[special("<|assistant_end|>"), tokenizer.get_bos_token_id()],  # our engine's stop tokens
        do_sample=True, temperature=0.6, top_k=50, max_new_tokens=256)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.to(dtype).save_pretrained(tmp, safe_serialization=True)
    build_hf_fast_tokenizer(tokenizer, model.config.sequence_len).save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    for path in tmp.iterdir():  # fsync before the renames: a crash leaves the old export or the new one whole
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return {"dir": str(out_dir), "dtype": str(dtype).removeprefix("torch."), "files": sorted(os.listdir(out_dir)),
            "max_logit_diff_fp32": check}
