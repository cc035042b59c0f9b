"""HumanEval: write a Python function from its docstring; graded by running the benchmark's tests in the sandbox."""

import re

from nanochat.execution import execute_code
from tasks.common import Task, read_parquet_rows

CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_program(prompt: str, completion: str) -> str:
    """The completion's code: a fenced block if there is one; a body without the signature is appended to the prompt."""
    blocks = CODE_BLOCK.findall(completion)
    code = blocks[0] if blocks else completion
    if "def " not in code:
        return prompt + code
    imports = "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))
    return imports + "\n" + code


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = read_parquet_rows("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet",
                                      "HumanEval")

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        program = extract_program(conversation["prompt"], completion)
        program += f"\n\n{conversation['test']}\n\ncheck({conversation['entry_point']})\n"
        return execute_code(program, timeout=5.0).success
