"""Chat with a trained model in the terminal.

    python -m scripts.chat_cli                       # interactive; 'clear' starts over, 'quit' exits
    python -m scripts.chat_cli -p "Why is the sky blue?"
    python -m scripts.chat_cli --system "Answer in one sentence."
    python -m scripts.chat_cli -i base -p "The capital of France is"   # a base model continues the text

Arrow keys edit the line and walk the history (kept in $NANOCHAT_BASE_DIR/chat_history); a line ending with a
backslash continues on the next. The model attends to its training context: a conversation that outgrows it drops
its oldest turns (never the system prompt or the last message) and says so.
"""

import argparse
import sys

from nanochat.checkpoint import describe_model, load_chat_model
from nanochat.common import UserError, compute_init, get_base_dir, print0, run_cli
from nanochat.engine import Engine
from nanochat.sandbox.execution import allow_unsafe_python_tool, python_tool_banner
from nanochat.terminal import Printer, line_editing, read_message


def note(text: str) -> None:
    """A line about the chat rather than from the model: on stderr, so that -p output stays clean for pipes."""
    sys.stdout.flush()
    print(f"({text})", file=sys.stderr, flush=True)


def reply(engine: Engine, prompt: list[int], max_tokens: int, args, printer: Printer) -> list[int]:
    """Stream the model's answer to the prompt; returns its tokens (without the stop token). Ctrl-C stops it.
    An empty reply, and one cut at the token limit, are said, never left silent."""
    tokens, stopped, interrupted = [], False, False
    try:
        for column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens,
                                         temperature=args.temperature, top_k=args.top_k, seed=args.seed):
            token = column[0]
            if token in engine.tools.stops:
                stopped = True
                break
            tokens.append(token)
            printer.feed(token)
    except KeyboardInterrupt:
        interrupted = True
    printer.flush()
    print(flush=True)
    if interrupted:
        note("reply stopped")
    elif not stopped:
        limit = "--max-tokens" if max_tokens == args.max_tokens else "the end of the model's context"
        note(f"reply cut at {max_tokens} tokens by {limit}")
    elif not tokens:
        note("the model gave an empty reply")
    return tokens


class Conversation:
    """The messages so far and the prompt they make within the model's context."""

    def __init__(self, tokenizer, source: str, context: int, max_tokens: int, system: str | None):
        self.tokenizer, self.source, self.context, self.system = tokenizer, source, context, system
        self.prompt_budget = context - min(max_tokens, context // 2)  # leave room for a reply
        self.messages: list[dict] = []
        self.dropped = 0

    def clear(self) -> None:
        self.messages, self.dropped = [], 0

    def prompt(self) -> list[int]:
        if self.source == "base":  # a base model never saw the chat format: it continues the last text
            ids = self.tokenizer.encode(self.messages[-1]["content"], prepend="<|bos|>")
            if len(ids) > self.prompt_budget:
                raise UserError(f"the text is {len(ids)} tokens, more than the {self.prompt_budget} this model can "
                                "take as a prompt: shorten it")
            return ids
        system = [{"role": "system", "content": self.system}] if self.system else []
        ids, dropped = self.tokenizer.render_within({"messages": system + self.messages}, self.prompt_budget)
        if dropped > self.dropped:
            note(f"the conversation outgrew the model's context of {self.context} tokens: its {dropped} oldest "
                 "messages are no longer seen")
        self.dropped = dropped
        return ids


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--source", choices=["sft", "rl", "base"], default=None,
                   help="which checkpoints (default: rl, else sft, else base)")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--system", default=None, help="a system prompt, kept however long the conversation grows")
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
    compute = compute_init(args.device_type, announce=sys.stderr)
    loaded = load_chat_model(args.source, compute.device, args.model_tag, args.step, dry_run=args.dry_run)
    print0(python_tool_banner(), file=sys.stderr)
    if loaded is None:
        return
    model, tokenizer, meta = loaded
    if args.system and meta.phase == "base":
        raise UserError("--system needs a chat model (-i sft or -i rl): a base model only continues text")
    name, expectation = describe_model(meta)
    if args.dry_run:
        print0(f"chat_cli dry run: {name} loads")
        return
    engine = Engine(model, tokenizer, dtype=compute.dtype)
    printer = Printer(tokenizer, color=sys.stdout.isatty())
    context = meta.model_config.sequence_len
    chat = Conversation(tokenizer, meta.phase, context, args.max_tokens, args.system)
    mode = "each message is continued as plain text" if meta.phase == "base" else "multi-turn chat"
    header = [f"nanochat: {name}, {mode}", *([expectation] if expectation else [])]

    def answer(text: str) -> None:
        chat.messages.append({"role": "user", "content": text})
        prompt = chat.prompt()
        tokens = reply(engine, prompt, min(args.max_tokens, context - len(prompt)), args, printer)
        chat.messages.append({"role": "assistant", "content": tokenizer.parse_assistant(tokens)})

    if args.prompt is not None:
        for line in header:
            print(line, file=sys.stderr)
        answer(args.prompt)
        return
    print("\n".join(header))
    print("Type 'clear' to start over, 'quit' to exit; end a line with \\ to continue it on the next.")
    line_editing(get_base_dir() / "chat_history")
    while True:
        try:
            text = read_message("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.lower() in ("quit", "exit"):
            return
        if text.lower() == "clear":
            chat.clear()
            print("(conversation cleared)")
            continue
        if not text:
            continue
        print("\nAssistant: ", end="", flush=True)
        try:
            answer(text)
        except UserError as e:  # this message alone is too long: say so and keep the conversation
            chat.messages.pop()
            print(f"\nerror: {e}")


if __name__ == "__main__":
    run_cli(main)
