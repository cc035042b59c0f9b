"""ARC (AI2 Reasoning Challenge), Easy and Challenge: grade-school science, multiple choice."""

from tasks.common import Task, evaluate_letter, hf_shuffled, multiple_choice_conversation, read_parquet_rows


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be ARC-Easy or ARC-Challenge, not {subset!r}")
        self.rows = hf_shuffled(read_parquet_rows("allenai/ai2_arc", f"{subset}/{split}-00000-of-00001.parquet",
                                                  subset))
        self.subset = subset

    @property
    def name(self) -> str:
        return self.subset

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        labels = list(row["choices"]["label"])  # usually A-D, sometimes 1-4: kept, as the reference does
        return multiple_choice_conversation(row["question"], list(row["choices"]["text"]),
                                            labels.index(row["answerKey"]), letters=labels)

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_letter(conversation, completion)
