"""GSM8K: grade-school math word problems; the calculator annotations become python tool calls.

A reference answer "… 48/2 = <<48/2=24>>24 clips …\n#### 72" becomes the assistant parts
text "… 48/2 = ", python "48/2", python_output "24", text "24 clips …\n#### 72".
"""

import re

from tasks.common import Task, read_parquet_rows

ANSWER = re.compile(r"####\s*(-?[$]?\s*[\d,]*\.?\d+)")
CALC = re.compile(r"<<([^=<>]*)=([^<>]*)>>")


def extract_answer(text: str) -> str | None:
    """The number after the last '####', normalised (no commas, no $, no trailing zeros after a point)."""
    matches = ANSWER.findall(text)
    if not matches:
        return None
    number = matches[-1].replace(",", "").replace("$", "").replace(" ", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number or None


def same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a == b


def answer_to_parts(answer: str) -> list[dict]:
    parts, position = [], 0
    for m in CALC.finditer(answer):
        if m.start() > position:
            parts.append({"type": "text", "text": answer[position:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        parts.append({"type": "python_output", "text": m.group(2)})
        position = m.end()
    if position < len(answer):
        parts.append({"type": "text", "text": answer[position:]})
    return parts


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "test", **kwargs):
        super().__init__(**kwargs)
        self.rows = read_parquet_rows("openai/gsm8k", f"{subset}/{split}-00000-of-00001.parquet", f"GSM8K {split}")

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": answer_to_parts(row["answer"])}],
                "answer": extract_answer(row["answer"])}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return same_number(extract_answer(completion), conversation["answer"])

    def reward(self, conversation: dict, completion: str) -> float:
        """The RL reward is the evaluation itself, so training and evaluation can never disagree."""
        return float(self.evaluate(conversation, completion))
