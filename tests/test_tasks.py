"""Tasks render real mirror rows into conversations and grade answers the way the benchmarks define."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from nanochat.download import hf_file
from tasks.arc import ARC
from tasks.chat import HHRLHF, CustomJSON, parse_hh_transcript
from tasks.common import TaskMixture, hf_shuffled
from tasks.gsm8k import GSM8K, answer_to_parts, extract_answer
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spelling import SimpleSpelling, SpellingBee


@pytest.fixture(autouse=True)
def use_mirror(mirror, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror))


def test_arc_renders_lettered_choices_and_keeps_numeric_labels(tiny_tokenizer):
    task = ARC("ARC-Challenge", "test")
    assert len(task) == 1172 and task.eval_type == "categorical"
    conv = task[0]
    user = conv["messages"][0]["content"]
    assert user.startswith("Multiple Choice question: ") and "=A\n" in user
    assert user.endswith("Respond only with the letter of the correct answer.")
    assert conv["messages"][1]["content"] in conv["letters"]
    numeric = [i for i, row in enumerate(task.rows) if row["choices"]["label"][0] == "1"]
    assert numeric, "the original data labels some choices 1-4"
    c = task[numeric[0]]
    assert c["letters"][0] == "1" and "=1\n" in c["messages"][0]["content"]
    assert c["messages"][1]["content"] in "1234"
    ids, mask = tiny_tokenizer.render_conversation(c)
    assert sum(mask) == 2  # the letter and <|assistant_end|>


def test_mmlu_rows_and_grading():
    task = MMLU("all", "validation")
    assert len(task) == 1531
    conv = task[3]
    assert task.evaluate(conv, conv["messages"][1]["content"]) and not task.evaluate(conv, "Z")
    assert conv["subject"]


def test_mmlu_auxiliary_train_missing_offline_names_the_dataset():
    from nanochat.common import UserError
    with pytest.raises(UserError, match="MMLU auxiliary_train"):
        MMLU("auxiliary_train")


@pytest.mark.parametrize("text, expected", [
    ("so the answer is\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("#### -5", "-5"),
    ("#### 3.50", "3.50"),   # compared as a string, as published: not 3.5
    ("#### $18", None),      # the published pattern wants a digit, '-', '.' or ',' after '#### '
    ("####72", None),
    ("#### 10\nlater #### 12", "10"),  # the first answer counts
    ("no marker 42", None),
])
def test_gsm8k_answer_extraction_follows_the_published_grader(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_grades_by_the_first_answer_as_a_string():
    task = GSM8K("main", "test")
    conv = task[0]
    answer = conv["answer"]
    assert task.evaluate(conv, f"#### {answer}\n#### 0")
    assert not task.evaluate(conv, f"#### 0\n#### {answer}")
    assert not task.evaluate(conv, f"#### {answer}.0") and not task.evaluate(conv, "no answer")


def test_hf_shuffled_is_datasets_shuffle_with_seed_42():
    # datasets' Dataset.shuffle(seed) draws numpy's default_rng(seed).permutation(len) and selects by it
    assert hf_shuffled(list(range(10))) == list(np.random.default_rng(42).permutation(10))
    assert hf_shuffled(list("abcdef"), seed=7) == [list("abcdef")[i] for i in np.random.default_rng(7).permutation(6)]


@pytest.mark.parametrize("make, repo, path, key", [
    (lambda: GSM8K("main", "test"), "openai/gsm8k", "main/test-00000-of-00001.parquet", "question"),
    (lambda: MMLU("all", "validation"), "cais/mmlu", "all/validation-00000-of-00001.parquet", "question"),
    (lambda: ARC("ARC-Easy", "test"), "allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet", "question"),
    (HumanEval, "openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet", "prompt"),
])
def test_task_rows_are_in_the_order_of_the_seed_42_shuffle(make, repo, path, key):
    raw = pq.read_table(hf_file(repo, path)).to_pylist()
    order = np.random.default_rng(42).permutation(len(raw))
    task = make()
    assert [task.rows[i][key] for i in range(5)] == [raw[j][key] for j in order[:5]]
    assert order[0] != 0  # the shuffle moved the first row, so this compares something


def test_gsm8k_calculator_annotations_become_tool_calls(tiny_tokenizer):
    parts = answer_to_parts("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72")
    assert parts == [{"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
                     {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 clips.\n#### 72"}]
    task = GSM8K("main", "train")
    conv = task[0]
    ids, mask = tiny_tokenizer.render_conversation(conv)
    start = tiny_tokenizer.encode_special("<|output_start|>")
    assert mask[ids.index(start)] == 0
    answer = conv["answer"]
    assert task.evaluate(conv, f"The total is #### {answer}") and task.reward(conv, f"#### {answer}1") == 0.0


def test_humaneval_runs_the_tests_in_the_sandbox():
    task = HumanEval()
    conv = task[0]
    assert task.evaluate(conv, conv["messages"][1]["content"])
    assert task.evaluate(conv, "Here:\n```python\n" + conv["messages"][1]["content"] + "\n```\nDone.")
    assert task.evaluate(conv, "```python\n" + conv["prompt"] + "    return False\n```") is False


def test_humaneval_grades_like_the_reference_so_a_bare_body_fails():
    # The reference runs the prompt's imports + the completion's code + the tests; it does not prepend the
    # signature to a completion that only holds the function body.
    task = HumanEval()
    conv = next(c for c in (task[i] for i in range(len(task))) if "import " in c["prompt"])
    body = conv["messages"][1]["content"][len(conv["prompt"]):]
    assert not task.evaluate(conv, body)
    solution = conv["messages"][1]["content"]
    without_imports = "\n".join(line for line in solution.split("\n") if not line.startswith(("import ", "from ")))
    assert task.evaluate(conv, without_imports)  # the prompt's imports are added


def test_hh_rlhf_transcripts_become_alternating_conversations():
    messages = parse_hh_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert parse_hh_transcript("\n\nHuman: only a question") is None
    task = HHRLHF()
    assert len(task) + task.skipped == 2312 and len(task) > 2000


def test_custom_json_reads_the_mirror_file_and_rejects_bad_lines(mirror, tmp_path):
    task = CustomJSON(mirror / "files/chat/dolly-hhrlhf-1k.jsonl")
    assert len(task) == 1000
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"role": "user"}]\n')
    from nanochat.common import UserError
    with pytest.raises(UserError, match="bad.jsonl:1"):
        CustomJSON(bad)


def test_spelling_tasks_are_deterministic_and_graded(tiny_tokenizer):
    bee = SpellingBee(50, "train")
    assert bee[7] == SpellingBee(50, "train")[7] and bee[7] != SpellingBee(50, "test")[7]
    conv = bee[7]
    parts = conv["messages"][1]["content"]
    word_call = parts[1]["text"]
    assert word_call.endswith(".count('" + word_call[-3] + "')") or ".count(" in word_call
    assert bee.evaluate(conv, f"... #### {conv['answer']}")
    simple = SimpleSpelling(10)
    c = simple[0]
    word = c["messages"][0]["content"].removeprefix("Spell the word: ")
    assert c["answer"] == word + ":" + ",".join(word) and simple.evaluate(c, c["answer"])


def test_mixture_interleaves_deterministically_and_slices():
    a, b = SimpleSpelling(20), SpellingBee(10)
    mix = TaskMixture([a, b])
    assert len(mix) == 30 and [mix[i] for i in range(5)] == [TaskMixture([a, b])[i] for i in range(5)]
    assert {m["messages"][0]["content"][:5] for m in (mix[i] for i in range(30))} > {"Spell"}
    sliced = GSM8K("main", "test", start=10, stop=20, step=2)
    assert len(sliced) == 5 and sliced[1] == GSM8K("main", "test")[12]


def test_smoltalk_rows_are_shuffled_with_seed_42_as_the_reference_loads_them(monkeypatch):
    import tasks.chat
    from tasks.common import hf_shuffled
    shard = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(10)]
    monkeypatch.setattr(tasks.chat, "read_parquet_rows", lambda repo, path, label: list(shard))
    task = tasks.chat.SmolTalk("test")
    assert task.rows == hf_shuffled(shard, seed=42) != shard
    assert task[0]["messages"][0]["content"] == hf_shuffled(shard, seed=42)[0]["messages"][0]["content"]
