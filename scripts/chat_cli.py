"""Chat with a trained model in the terminal.

    python -m scripts.chat_cli                       # interactive; 'clear' starts over, 'quit' exits
    python -m scripts.chat_cli -p "Why is the sky blue?"
    python -m scripts.chat_cli -i base -p "The capital of France is"   # a base model continues the text
"""

import argparse
import sys

from nanochat.checkpoint import load_model
from nanochat.common import UserError, compute_init, print0, run_cli
from nanochat.engine import Engine, TextStream
from nanochat.execution import allow_unsafe_python_tool, python_tool_banner

PART_STYLE = {  # part → (colour on a terminal, plain-text opening, closing)
    "python": ("\033[36m", "[python] ", " [/python]"),
    "python_output": ("\033[33m", "[output] ", " [/output]"),
}
RESET = "\033[0m"


class Printer:
    """Streams tokens as text; tool calls and tool outputs are shown in their own colour and brackets."""

    def __init__(self, tokenizer, color: bool):
        self.tokenizer, self.color = tokenizer, color
        special = tokenizer.encode_special
        self.opens = {special("<|python_start|>"): "python", special("<|output_start|>"): "python_output"}
        self.closes = {special("<|python_end|>"), special("<|output_end|>")}
        self.text = TextStream(tokenizer)
        self.part = "text"

    def feed(self, token: int) -> None:
        if token in self.opens:
            self.close_part()
            self.part = self.opens[token]
            colour, opening, _ = PART_STYLE[self.part]
            sys.stdout.write(colour if self.color else opening)
        elif token in self.closes:
            self.close_part()
        else:
            sys.stdout.write(self.text.push(token))
        sys.stdout.flush()

    def close_part(self) -> None:
        """Write out held text and end a tool part, if one is open (never leave the terminal coloured)."""
        sys.stdout.write(self.text.flush())
        if self.part != "text":
            sys.stdout.write(RESET if self.color else PART_STYLE[self.part][2])
            self.part = "text"
        sys.stdout.flush()

    def flush(self) -> None:
        """At the end of a reply."""
        self.close_part()


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
    loaded = load_or_warn(args, compute.device)
    print0(python_tool_banner(), file=sys.stderr)  # stderr: -p output stays clean for pipes
    if loaded is None:
        return
    model, tokenizer, meta, source = loaded
    if args.dry_run:
        print0(f"chat_cli dry run: {describe(meta, source)} loads")
        return
    engine = Engine(model, tokenizer, compute.autocast)
    printer = Printer(tokenizer, color=sys.stdout.isatty())
    if args.prompt is not None:
        reply(engine, make_prompt(tokenizer, source, [{"role": "user", "content": args.prompt}]), args, printer)
        return
    mode = "each line is continued as plain text" if source == "base" else "multi-turn chat"
    print(f"nanochat: {describe(meta, source)}, {mode}. Type 'clear' to start over, 'quit' to exit.")
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


def make_prompt(tokenizer, source: str, messages: list[dict]) -> list[int]:
    """A chat model gets the conversation in its chat format; a base model, which never saw that format, just
    continues the last user text."""
    if source == "base":
        return tokenizer.encode(messages[-1]["content"], prepend="<|bos|>")
    return tokenizer.render_for_completion({"messages": messages})


def model_tag(meta: dict) -> str:
    return meta.get("model_tag") or meta.get("args", {}).get("model_tag") or "model"


def describe(meta: dict, source: str) -> str:
    return f"{source} model {model_tag(meta)} step {meta.get('step')}"


def load_chat_model(source: str | None, device, model_tag: str | None, step: int | None):
    """The requested checkpoints, or the most trained ones available: rl, then sft, then base."""
    candidates = [source] if source else ["rl", "sft", "base"]
    error = None
    for phase in candidates:
        try:
            model, tokenizer, meta = load_model(phase, device, model_tag, step)
            return model, tokenizer, meta, phase
        except UserError as e:
            error = e  # with no source this ends as base's error, naming the first command to run
    raise error


def load_or_warn(args, device):
    """load_chat_model for the flags in `args`; a dry run without a model yet only warns and gets None."""
    try:
        return load_chat_model(args.source, device, args.model_tag, args.step)
    except UserError as e:
        if not args.dry_run:
            raise
        print0(f"warning (dry run): {e}")
        return None


if __name__ == "__main__":
    run_cli(main)
