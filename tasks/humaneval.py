"""HumanEval: write a Python function from its docstring; graded by running the benchmark's tests in the sandbox."""

import re

from nanochat.sandbox.execution import execute_code
from tasks.common import Task, hf_shuffled, read_parquet_rows

CODE_BLOCK = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def leading_imports(prompt: str) -> str:
    """The import lines at the top of the prompt (before its first line of other code)."""
    imports = []
    for line in (raw.strip() for raw in prompt.split("\n")):
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first fenced code block of the completion, or the whole completion; graded as the reference grades it,
    so a completion must define the function itself (the prompt's signature is not prepended)."""
    blocks = CODE_BLOCK.findall(completion)
    return (blocks[0] if blocks else completion).strip()


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = hf_shuffled(read_parquet_rows("openai/openai_humaneval",
                                                  "openai_humaneval/test-00000-of-00001.parquet", "HumanEval"))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        program = (leading_imports(conversation["prompt"]) + "\n\n" + extract_program(completion) + "\n\n"
                   + conversation["test"] + "\n" + f"check({conversation['entry_point']})")
        return execute_code(program, timeout=5.0).success
