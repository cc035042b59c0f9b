"""The terminal front end's pieces: a reply streamed as text with its tool calls set apart, and the prompt that a
chat model or a base model gets."""

import sys

from nanochat.engine import TextStream

PART_STYLE = {  # part → (colour on a terminal, plain-text opening, closing)
    "python": ("\033[36m", "[python] ", " [/python]"),
    "python_output": ("\033[33m", "[output] ", " [/output]"),
}
RESET = "\033[0m"


class Printer:
    """Streams tokens as text; tool calls and tool outputs are shown in their own colour and brackets."""

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


def make_prompt(tokenizer, source: str, messages: list[dict]) -> list[int]:
    """A chat model gets the conversation in its chat format; a base model, which never saw that format, just
    continues the last user text."""
    if source == "base":
        return tokenizer.encode(messages[-1]["content"], prepend="<|bos|>")
    return tokenizer.render_for_completion({"messages": messages})
