"""Export a checkpoint to a Hugging Face transformers folder: weights, config, generation config, tokenizer.json with
the chat template, the model code (loaded with trust_remote_code=True) and a model card from the report.

    python -m scripts.export_hf --source sft --out hf/d20-sft              # latest SFT checkpoint of the deepest tag
    python -m scripts.export_hf --source base --model-tag d4 --step 300 --out hf/d4 --dtype fp32

Needs the `hf` extra: pip install -e '.[hf]'.
"""

import argparse
import json

import torch

from nanochat.checkpoint import checkpoint_dir, find_model_tag, last_step, load_model, step_dir
from nanochat.common import UserError, autodetect_device_type, get_compute_dtype, run_cli
from nanochat.hf_export.export import DTYPES, check_representable, write_export
from nanochat.hf_export.model_card import model_card
from nanochat.report import get_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Export a nanochat checkpoint to Hugging Face transformers.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", choices=["base", "sft", "rl"], required=True, help="which training phase's model")
    p.add_argument("--model-tag", default=None, help="checkpoint folder (default: the deepest tag)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--out", required=True, help="folder to write (replaced whole if it holds an earlier export)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="weight dtype (default: the compute dtype, bf16 on modern GPUs, fp32 on most CPUs)")
    p.add_argument("--dry-run", action="store_true", help="check the checkpoint can be exported, then exit")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:  # optional: the hf extra; checked first, so that its absence is one clear line
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise UserError(f"the export needs transformers and tokenizers ({e.name} is missing): "
                        "pip install -e '.[hf]'") from None
    model_tag = args.model_tag or find_model_tag(args.source)
    step = args.step if args.step is not None else last_step(checkpoint_dir(args.source, model_tag))
    meta_path = step_dir(checkpoint_dir(args.source, model_tag), step if step is not None else 0) / "meta.json"
    if meta_path.exists():  # refuse an architecture the export cannot hold before building the model
        check_representable(json.loads(meta_path.read_text())["model_config"])
    model, tokenizer, meta = load_model(args.source, "cpu", model_tag, step)
    if args.dry_run:
        print(f"export_hf dry run: {args.source} model {model_tag} step {meta.step} can be exported to {args.out}")
        return
    dtype = DTYPES[args.dtype] if args.dtype else get_compute_dtype(autodetect_device_type())
    if dtype not in DTYPES.values():
        raise UserError(f"the compute dtype here is {dtype}, which the export does not write: pass --dtype bf16|fp32")
    card = model_card(model, get_report(model_tag).sections(), args.source, model_tag, meta.step)
    with torch.no_grad():
        result = write_export(args.out, model, tokenizer, card, dtype)
    print(json.dumps({"source": args.source, "model_tag": model_tag, "step": meta.step, **result}, indent=2))


if __name__ == "__main__":
    run_cli(main)
