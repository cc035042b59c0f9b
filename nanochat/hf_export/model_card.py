"""The model card (README.md) of a Hugging Face export, written from the model's config and its report sections."""

from nanochat.gpt import GPT
from nanochat.report import summary_table

LICENSE = "mit"
# Report sections that describe each source model and the stages before it.
SOURCE_STAGES = {
    "base": ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model evaluation"],
    "sft": ["Chat SFT", "Chat evaluation sft"],
    "rl": ["Chat RL", "Chat evaluation rl"],
}


def _stages_up_to(source: str) -> set[str]:
    order = ["base", "sft", "rl"]
    return {s for phase in order[:order.index(source) + 1] for s in SOURCE_STAGES[phase]}


def _section(sections: list[dict], name: str) -> dict:
    """All key/value items a section recorded, merged (empty when the stage has not reported)."""
    merged: dict = {}
    for s in sections:
        if s["section"] == name:
            for item in s["data"]:
                if isinstance(item, dict):
                    merged.update(item)
    return merged


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def architecture_lines(model: GPT) -> list[str]:
    c, n = model.config, model.num_params()
    windows = ", ".join(str(w) for w in model.windows)
    extras = [name for name in ("smear", "backout") if getattr(c, name)]
    return [
        f"- {c.n_layer} layers, width {c.n_embd}, {c.n_head} query heads and {c.n_kv_head} key/value heads of "
        f"dimension {c.head_dim}; context {c.sequence_len} tokens; vocabulary {c.vocab_size:,} tokens",
        f"- Parameters: {n['total']:,} in all ({n['transformer_matrices']:,} in the transformer blocks, "
        f"{n['wte']:,} token embedding, {n['value_embeds']:,} value embeddings, {n['lm_head']:,} LM head; "
        "the embedding and head tables include padding rows the export drops)",
        f"- Attention windows per layer (pattern {c.window_pattern!r}): {windows}",
        "- RoPE (base 100,000), QK-norm scaled by 1.2, grouped-query attention, value embeddings (ResFormer) on "
        "alternating layers through a per-head gate, learned per-layer residual and x0 scalars, ReLU² MLP, "
        "parameter-free RMSNorm, untied embeddings, no biases, logits soft-capped at 15 by tanh"
        + (f"; {' and '.join(extras)} on" if extras else ""),
    ]


def eval_lines(sections: list[dict]) -> list[str]:
    lines = []
    table = summary_table(sections)
    if table:
        lines += ["Summary (one column per stage; CORE names how many of its 22 tasks were available):", "", *table,
                  ""]
    base_eval = _section(sections, "Base model evaluation")
    core_tasks = {k.removesuffix(" (centered)"): v for k, v in base_eval.items() if k.endswith(" (centered)")}
    if core_tasks:
        lines += ["CORE tasks (centered accuracy):", "", "| Task | Centered accuracy |", "|---|---|",
                  *[f"| {k} | {_fmt(v)} |" for k, v in core_tasks.items()], ""]
        if base_eval.get("CORE missing tasks"):
            lines += [f"Missing from CORE: {base_eval['CORE missing tasks']}.", ""]
    for phase in ("sft", "rl"):
        chat = _section(sections, f"Chat evaluation {phase}")
        tasks = {k: v for k, v in chat.items() if isinstance(v, float) and not k.startswith("ChatCORE")}
        if tasks:
            where = f" (at most {chat['max_problems']} problems per task)" if chat.get("max_problems") else ""
            lines += [f"Chat evaluation after {phase.upper()}{where}:", "", "| Task | Accuracy |", "|---|---|",
                      *[f"| {k} | {_fmt(v)} |" for k, v in tasks.items()]]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in chat.items() if k.startswith("ChatCORE")] + [""]
    return lines or ["No evaluation was recorded in the report for this model.", ""]


def training_lines(sections: list[dict], source: str) -> list[str]:
    tok, base = _section(sections, "Tokenizer training"), _section(sections, "Base model training")
    sft, rl = _section(sections, "Chat SFT"), _section(sections, "Chat RL")
    lines = []
    if tok:
        lines.append(f"- Tokenizer: byte-level BPE, {_fmt(tok.get('vocab_size', '?'))} tokens, trained on "
                     f"{_fmt(tok.get('train_chars', '?'))} characters of {tok.get('dataset', 'unrecorded data')}")
    if base:
        lines.append(f"- Pretraining: {_fmt(base.get('tokens', '?'))} tokens seen in {_fmt(base.get('steps', '?'))} "
                     f"steps on {base.get('dataset', 'unrecorded data')}; final validation bits per byte "
                     f"{_fmt(base.get('val_bpb', '?'))}")
    if source in ("sft", "rl") and sft:
        lines.append(f"- Supervised fine-tuning: {_fmt(sft.get('steps', '?'))} steps on "
                     f"{_fmt(sft.get('conversations', '?'))} conversations ({sft.get('data', 'task mixture')})")
    if source == "rl" and rl:
        lines.append(f"- Reinforcement learning: {_fmt(rl.get('steps', '?'))} GRPO steps on GSM8K")
    return lines or ["- The report holds no training record for this model."]


def model_card(model: GPT, sections: list[dict], source: str, model_tag: str, step: int) -> str:
    sections = [s for s in sections if s["section"] in _stages_up_to(source)]
    kind = {"base": "base (pretrained) model", "sft": "chat model (supervised fine-tuning)",
            "rl": "chat model (SFT, then RL on GSM8K)"}[source]
    lines = [
        "---", f"license: {LICENSE}", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [nanochat]", "---", "",
        f"# nanochat {model_tag} ({source}, step {step})", "",
        f"A {kind} trained from scratch with [nanochat](https://github.com/karpathy/nanochat)'s pipeline, exported "
        "to Hugging Face transformers. The model code ships with these weights; load it with "
        "`trust_remote_code=True`:", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Why is the sky blue?'}],",
        "                              add_generation_prompt=True, return_tensors='pt', return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=64, do_sample=False)",
        "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```", "",
        "## Architecture", "", *architecture_lines(model), "",
        "## Training", "", *training_lines(sections, source), "",
        "## Evaluation", "", *eval_lines(sections),
        "## Limitations", "",
        "- A small model trained on a small budget: it is often wrong, makes up facts and should not be relied on.",
        "- English text only; no safety tuning beyond the supervised conversations.",
        "- Chat format: the template renders nanochat's conversations (a system message merges into the first "
        "user turn; assistant tool calls are content parts of type `python` and `python_output`). Text that "
        "spells a special token such as `<|user_end|>` inside a message is read as that token by the tokenizer, "
        "whereas nanochat encodes it as plain text.",
        "- The python tool is not run by `generate()`: nanochat's engine executes tool calls in a sandbox.",
        "- Not convertible to GGUF/llama.cpp: its tokenizer handling cannot express this split pattern.", "",
        "## License", "", "MIT, as nanochat's code. The training data keep their own licenses.", "",
    ]
    return "\n".join(lines)
