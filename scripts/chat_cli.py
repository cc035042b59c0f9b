"""Chat with a trained model in the terminal.

    python -m scripts.chat_cli                       # interactive; 'clear' starts over, 'quit' exits
    python -m scripts.chat_cli -p "Why is the sky blue?"
"""

import argparse
import sys

from nanochat.checkpoint import load_model
from nanochat.common import compute_init, run_cli
from nanochat.engine import Engine


class Printer:
    """Streams tokens as text; tool calls and tool outputs are shown in their own colour and brackets."""

    def __init__(self, tokenizer, color: bool):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.markers = {special("<|python_start|>"): ("\033[36m[python] ", "[python] "),
                        special("<|python_end|>"): ("\033[0m", " [/python]"),
                        special("<|output_start|>"): ("\033[33m[output] ", "[output] "),
                        special("<|output_end|>"): ("\033[0m", " [/output]")}
        self.color = color
        self.pending: list[int] = []

    def feed(self, token: int) -> None:
        if token in self.markers:
            self.flush()
            sys.stdout.write(self.markers[token][0 if self.color else 1])
        else:
            self.pending.append(token)
            text = self.tokenizer.decode(self.pending)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text)
                self.pending = []
        sys.stdout.flush()

    def flush(self) -> None:
        if self.pending:
            sys.stdout.write(self.tokenizer.decode(self.pending))
            self.pending = []


def reply(engine: Engine, tokenizer, conversation: dict, args, printer: Printer) -> list[int]:
    """Stream the assistant's answer to the conversation; returns its tokens (without the stop token)."""
    prompt = tokenizer.render_for_completion(conversation)
    tokens = []
    for column, _ in engine.generate(prompt, num_samples=1, max_tokens=args.max_tokens,
                                     temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        token = column[0]
        if token in engine.tools.stops:
            break
        tokens.append(token)
        printer.feed(token)
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
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device-type", default="")
    args = p.parse_args(argv)
    compute = compute_init(args.device_type)
    model, tokenizer, meta, source = load_chat_model(args.source, compute.device, args.model_tag, args.step)
    engine = Engine(model, tokenizer, compute.autocast)
    printer = Printer(tokenizer, color=sys.stdout.isatty())
    conversation = {"messages": []}
    if args.prompt is not None:
        conversation["messages"].append({"role": "user", "content": args.prompt})
        reply(engine, tokenizer, conversation, args, printer)
        return
    print(f"nanochat ({source} model {meta.get('model_tag', '')} step {meta['step']}). "
          "Type 'clear' to start over, 'quit' to exit.")
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.lower() in ("quit", "exit"):
            return
        if text.lower() == "clear":
            conversation = {"messages": []}
            print("(conversation cleared)")
            continue
        if not text:
            continue
        conversation["messages"].append({"role": "user", "content": text})
        print("\nAssistant: ", end="", flush=True)
        tokens = reply(engine, tokenizer, conversation, args, printer)
        conversation["messages"].append({"role": "assistant", "content": tokenizer.decode(tokens) or "…"})


def load_chat_model(source: str | None, device, model_tag: str | None, step: int | None):
    """The requested checkpoints, or the most trained ones available: rl, then sft, then base."""
    from nanochat.common import UserError
    candidates = [source] if source else ["rl", "sft", "base"]
    error = None
    for phase in candidates:
        try:
            model, tokenizer, meta = load_model(phase, device, model_tag, step)
            return model, tokenizer, meta, phase
        except UserError as e:
            error = e
    raise error


if __name__ == "__main__":
    run_cli(main)
