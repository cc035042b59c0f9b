"""GSM8K: grade-school math word problems; the calculator annotations become python tool calls.

A reference answer "… 48/2 = <<48/2=24>>24 clips …\n#### 72" becomes the assistant parts
text "… 48/2 = ", python "48/2", python_output "24", text "24 clips …\n#### 72".
"""

import re

from tasks.common import Task, hf_shuffled, read_parquet_rows

ANSWER = re.compile(r"#### (\-?[0-9.,]+)")  # the published grader's pattern
CALC = re.compile(r"<<([^=<>]*)=([^<>]*)>>")


def extract_answer(text: str) -> str | None:
    """The answer after the first '#### ', normalised as OpenAI's grade-school-math reference does: stripped,
    commas removed. Answers are compared as strings, so '#### 72.0' does not match 72, as published."""
    match = ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


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
        self.rows = hf_shuffled(read_parquet_rows("openai/gsm8k", f"{subset}/{split}-00000-of-00001.parquet",
                                                  f"GSM8K {split}"))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": answer_to_parts(row["answer"])}],
                "answer": extract_answer(row["answer"])}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        predicted = extract_answer(completion)
        return predicted is not None and predicted == conversation["answer"]

    def reward(self, conversation: dict, completion: str) -> float:
        """The RL reward is the evaluation itself, so training and evaluation can never disagree."""
        return float(self.evaluate(conversation, completion))
