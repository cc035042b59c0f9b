"""Fidelity of the Hugging Face export (not speed): the largest logit difference between our model and its export,
in fp32 and in bf16, and how many mirror texts and tokens the exported tokenizer encodes as ours. Prints JSON.

    NANOCHAT_MIRROR=../shared/mirror python -m bench.export_hf [--vocab-size 8192] [--chars 5000000]
"""

import argparse
import json
import os
import tempfile
from dataclasses import asdict

import torch


def mirror_texts(max_chars: int) -> list[str]:
    """Documents of the mirror's pretraining sample (NANOCHAT_MIRROR), in shard order."""
    import pyarrow.parquet as pq
    from pathlib import Path
    folder = Path(os.environ.get("NANOCHAT_MIRROR", "")) / "hf/datasets/nanochat-mirror/docs-dictionary-sample"
    shards = sorted(folder.glob("shard_*.parquet"))
    if not shards:
        raise SystemExit(f"no pretraining shards in {folder}: set NANOCHAT_MIRROR to the offline mirror")
    texts, total = [], 0
    for shard in shards:
        for text in pq.read_table(shard, columns=["text"]).column("text").to_pylist():
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                return texts
    return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--chars", type=int, default=5_000_000, help="characters of mirror text to compare on")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from nanochat.checkpoint import build_model
    from nanochat.gpt import GPTConfig
    from nanochat.hf_export.export import write_export
    from nanochat.tokenizer import Tokenizer
    texts = mirror_texts(args.chars)
    tokenizer = Tokenizer.train_from_iterator(iter(texts[: len(texts) // 2]), args.vocab_size)
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=512, vocab_size=args.vocab_size, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                       window_pattern="SSL")
    model = build_model(config, "cpu").eval()
    with torch.no_grad():  # zero-initialised projections would hide most of the network from the comparison
        for name, w in model.named_parameters():
            if name.endswith("c_proj.weight"):
                w.normal_(0, 0.02)
    prompts = [tokenizer.encode(t, prepend="<|bos|>")[:n] for t, n in zip(texts, (8, 100, 512))]
    result = {"cpu": _cpu_name(), "model": asdict(config), "windows": model.windows}
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            out = os.path.join(d, str(dtype))
            write_export(out, model, tokenizer, "card", dtype)
            hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
            ours = model.to(dtype)
            diff = max(float((ours(torch.tensor([ids])) - hf(input_ids=torch.tensor([ids])).logits).abs().max())
                       for ids in prompts)
            result[f"max_logit_diff_{str(dtype).removeprefix('torch.')}"] = diff
            model.float()
        hf_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
        sample = texts[len(texts) // 2:]
        ours = tokenizer.encode(sample)
        theirs = hf_tok(sample, add_special_tokens=False)["input_ids"]
        result["tokenizer"] = {"vocab_size": args.vocab_size, "texts": len(sample),
                               "tokens": sum(len(x) for x in ours),
                               "texts_differing": sum(a != b for a, b in zip(ours, theirs))}
    print(json.dumps(result))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
