"""Chat with a trained model in the terminal.

    python -m scripts.chat_cli                       # interactive; 'clear' starts over, 'quit' exits
    python -m scripts.chat_cli -p "Why is the sky blue?"
    python -m scripts.chat_cli -i base -p "The capital of France is"   # a base model continues the text
"""

import argparse
import sys

from nanochat.checkpoint import load_chat_model
from nanochat.common import UserError, compute_init, print0, run_cli
from nanochat.engine import Engine
from nanochat.sandbox.execution import allow_unsafe_python_tool, python_tool_banner
from nanochat.terminal import Printer, make_prompt


def reply(engine: Engine, prompt: list[int], args, printer: Printer) -> list[int]:
    """Stream the model's answer to the prompt; returns its tokens (without the stop token). Ctrl-C stops it."""
    tokens = []
    try:
        for column, _ in engine.generate(prompt, num_samples=1, max_tokens=args.max_tokens,
                                         temperature=args.temperature, top_k=args.top_k, seed=args.seed):
            token = column[0]
            if token in engine.tools.stops:
                break
            tokens.append(token)
            printer.feed(token)
    except KeyboardInterrupt:
        pass
    printer.flush()
    print(flush=True)
    return tokens


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal.")
    p.add_argument("-i", "--source", choices=["sft", "rl", "base"], default=None,
                   help="which checkpoints (default: rl, else sft, else base)")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = sample from the whole vocabulary")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--unsafe-python-tool", action="store_true",
                   help="run the model's Python tool even where the kernel sandbox is unavailable (rlimits only)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and the model, then exit")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or args.max_tokens < 1:
        raise UserError("--temperature and --top-k must be >= 0 and --max-tokens >= 1")
    if args.unsafe_python_tool:
        allow_unsafe_python_tool()
    compute = compute_init(args.device_type)
    loaded = load_chat_model(args.source, compute.device, args.model_tag, args.step, dry_run=args.dry_run)
    print0(python_tool_banner(), file=sys.stderr)  # stderr: -p output stays clean for pipes
    if loaded is None:
        return
    model, tokenizer, meta = loaded
    source, described = meta.phase, f"{meta.phase} model {meta.model_tag} step {meta.step}"
    if args.dry_run:
        print0(f"chat_cli dry run: {described} loads")
        return
    engine = Engine(model, tokenizer, dtype=compute.dtype)
    printer = Printer(tokenizer, color=sys.stdout.isatty())
    if args.prompt is not None:
        reply(engine, make_prompt(tokenizer, source, [{"role": "user", "content": args.prompt}]), args, printer)
        return
    mode = "each line is continued as plain text" if source == "base" else "multi-turn chat"
    print(f"nanochat: {described}, {mode}. Type 'clear' to start over, 'quit' to exit.")
    messages = []
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.lower() in ("quit", "exit"):
            return
        if text.lower() == "clear":
            messages = []
            print("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        print("\nAssistant: ", end="", flush=True)
        tokens = reply(engine, make_prompt(tokenizer, source, messages), args, printer)
        messages.append({"role": "assistant", "content": tokenizer.parse_assistant(tokens)})


if __name__ == "__main__":
    run_cli(main)
