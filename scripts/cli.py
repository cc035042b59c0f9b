"""`nanochat COMMAND [ARGS]`: one console command for every stage, the same as `python -m scripts.COMMAND [ARGS]`
(which stays the documented form, and the one torchrun runs).

    nanochat base_train --depth=12      ==  python -m scripts.base_train --depth=12
    nanochat dataset -n 8               ==  python -m nanochat.dataset -n 8
"""

import importlib
import sys

from nanochat.common import run_cli

COMMANDS = {
    "dataset": ("nanochat.dataset", "download pretraining shards"),
    "preflight": ("scripts.preflight", "check this machine before a run: GPUs, kernels, speed, time and cost"),
    "tok_train": ("scripts.tok_train", "train the tokenizer"),
    "tok_eval": ("scripts.tok_eval", "evaluate the tokenizer's compression"),
    "base_train": ("scripts.base_train", "pretrain a base model"),
    "base_eval": ("scripts.base_eval", "bits per byte, CORE and samples of a base model"),
    "chat_sft": ("scripts.chat_sft", "supervised fine-tuning"),
    "chat_rl": ("scripts.chat_rl", "reinforcement learning on GSM8K"),
    "chat_eval": ("scripts.chat_eval", "evaluate a chat model"),
    "chat_cli": ("scripts.chat_cli", "chat in the terminal"),
    "chat_web": ("scripts.chat_web", "web UI and OpenAI-compatible API"),
    "export_hf": ("scripts.export_hf", "export to Hugging Face transformers"),
    "report": ("nanochat.report", "generate or reset the report card"),
}


def usage() -> str:
    rows = [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: nanochat COMMAND [ARGS]   (nanochat COMMAND --help for its options)\n\n" + "\n".join(rows)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    name = sys.argv[1].replace("-", "_")
    if name not in COMMANDS:
        print(f"error: unknown command {sys.argv[1]!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"nanochat {name}", *sys.argv[2:]]  # each stage parses sys.argv itself
    run_cli(module.main)


if __name__ == "__main__":
    main()
