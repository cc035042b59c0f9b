"""MMLU: 57 subjects of four-choice questions. `auxiliary_train` is the Hub's extra training split."""

from tasks.common import Task, evaluate_letter, hf_shuffled, multiple_choice_conversation, read_parquet_rows


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset: str = "all", split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be 'all' or 'auxiliary_train', not {subset!r}")
        if subset == "auxiliary_train":
            path, split = "auxiliary_train/train-00000-of-00001.parquet", "train"
        else:
            path = f"all/{split}-00000-of-00001.parquet"
        self.rows = read_parquet_rows("cais/mmlu", path, f"MMLU {subset}/{split}")
        if subset == "auxiliary_train" and self.rows and "train" in self.rows[0]:
            self.rows = [row["train"] for row in self.rows]  # that file nests each row under "train"
        self.rows = hf_shuffled(self.rows)

    @property
    def name(self) -> str:
        return "MMLU"

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return multiple_choice_conversation(row["question"], list(row["choices"]), int(row["answer"]),
                                            row.get("subject", ""))

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_letter(conversation, completion)
