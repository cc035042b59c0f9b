"""The terminal front end's pieces: a reply streamed as text with its tool calls set apart, and line editing with a
history and multi-line input."""

import atexit
import sys
from pathlib import Path

try:
    import readline
except ImportError:  # optional: Windows' Python has none; input then works without editing or history
    readline = None

from nanochat.engine import TextStream

PART_STYLE = {  # part → (colour on a terminal, plain-text opening, closing)
    "python": ("\033[36m", "[python] ", " [/python]"),
    "python_output": ("\033[33m", "[output] ", " [/output]"),
}
RESET = "\033[0m"


class Printer:
    """Streams tokens as text; tool calls and tool outputs are set apart by brackets (so copied text keeps them
    apart too) and, on a terminal, by their own colour."""

    def __init__(self, tokenizer, color: bool):
        self.tokenizer, self.color = tokenizer, color
        markup = tokenizer.tool_markup()
        self.opens = {token: part for token, part in markup.items() if part != "text"}
        self.closes = {token for token, part in markup.items() if part == "text"}
        self.text = TextStream(tokenizer)
        self.part = "text"

    def feed(self, token: int) -> None:
        if token in self.opens:
            self.close_part()
            self.part = self.opens[token]
            colour, opening, _ = PART_STYLE[self.part]
            sys.stdout.write(colour + opening if self.color else opening)
        elif token in self.closes:
            self.close_part()
        else:
            sys.stdout.write(self.text.push(token))
        sys.stdout.flush()

    def close_part(self) -> None:
        """Write out held text and end a tool part, if one is open (never leave the terminal coloured)."""
        sys.stdout.write(self.text.flush())
        if self.part != "text":
            closing = PART_STYLE[self.part][2]
            sys.stdout.write(closing + RESET if self.color else closing)
            self.part = "text"
        sys.stdout.flush()

    def flush(self) -> None:
        """At the end of a reply."""
        self.close_part()


def line_editing(history: Path) -> None:
    """Arrow keys, line editing and a history kept across sessions in `history` (readline, where Python has it;
    without it input still works, unedited). Lines are added by `read_message`, not by readline itself, so that
    piped input is recorded the same way."""
    if readline is None:
        return
    readline.set_auto_history(False)
    try:
        readline.read_history_file(history)
    except OSError:  # no history yet
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError as e:
            print(f"warning: the chat history could not be saved to {history}: {e.strerror or e}", file=sys.stderr)

    atexit.register(save)


def read_message(prompt: str) -> str:
    """One message from the user: a line, or several when a line ends with a backslash (the backslash is dropped
    and the next line joins with a newline). Raises EOFError at the end of input."""
    lines = []
    line = input(prompt)
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input("... ")
    lines.append(line)
    text = "\n".join(lines).strip()
    if text and readline is not None:
        readline.add_history(text)
    return text
