"""The CORE scorer as the DCLM reference harness defines it, on hand-built items, then a tiny model on the bundle.

Item order, few-shot sampling, prompt text and the scored token span are each checked against the definition;
the end-to-end comparison with an independent implementation of the reference lives in test_core_oracle.py.
"""

import random

import pytest
import torch

from conftest import make_tiny_model
from nanochat.core_eval import (core_label, evaluate_core, evaluate_task, fewshot_examples, prepare_items,
                                render_prompts, scored_spans)


class LookupModel(torch.nn.Module):
    """Stands in for a GPT in this unit test only: predicts `favourite` after every position (logit 10, else 0)."""

    def __init__(self, vocab: int, favourite: list[int]):
        super().__init__()
        self.vocab, self.favourite = vocab, favourite
        self.config = type("C", (), {"sequence_len": 512})()

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        for t in self.favourite:
            logits[..., t] = 10.0
        return logits


def spans_as_text(tok, task_type: str, prompts: list[str]) -> list[str]:
    seqs = [tok.encode(p, prepend=tok.get_bos_token_id()) for p in prompts]
    rows, spans = scored_spans(task_type, seqs)
    return [tok.decode(row[s:e]) for row, (s, e) in zip(rows, spans)]


# ---------------------------------------------------------------------------------------------------------------------
# Item order and few-shot examples

def test_items_are_shuffled_with_seed_1337_before_max_per_task_cuts_them():
    items = [{"id": i} for i in range(50)]
    expected = list(items)
    random.Random(1337).shuffle(expected)
    assert prepare_items(items, -1) == expected
    assert prepare_items(items, 7) == expected[:7]
    assert items == [{"id": i} for i in range(50)]  # the task's own list is left alone


def test_fewshot_examples_are_sampled_from_the_other_items_of_the_cut_list():
    data = prepare_items([{"id": i} for i in range(40)], 12)
    for idx in range(len(data)):
        shots = fewshot_examples(data, idx, 5)
        others = [j for j in range(len(data)) if j != idx]
        assert shots == [data[j] for j in random.Random(1234 + idx).sample(others, 5)]
        assert data[idx] not in shots and all(s in data for s in shots)
    assert fewshot_examples(data, 0, 0) == []


def test_fewshot_examples_take_every_other_item_when_the_list_is_shorter_than_the_shots():
    data = [{"id": i} for i in range(4)]
    shots = fewshot_examples(data, 2, 10)
    assert sorted(s["id"] for s in shots) == [0, 1, 3]


# ---------------------------------------------------------------------------------------------------------------------
# Prompts

def test_multiple_choice_prompts_join_solved_examples_with_blank_lines():
    item = {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0}
    shot = {"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}
    assert render_prompts("multiple_choice", item, [shot], "\nAnswer: ") == [
        "Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 4", "Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 5"]


def test_schema_prompts_put_each_context_before_the_shared_continuation():
    item = {"context_options": ["A cat", "A dog"], "continuation": "barks.", "gold": 1}
    shot = {"context_options": ["Fish", "Birds"], "continuation": "fly.", "gold": 1}
    assert render_prompts("schema", item, [shot], " ") == ["Birds fly.\n\nA cat barks.", "Birds fly.\n\nA dog barks."]


def test_language_modeling_prompts_strip_contexts_and_the_prompt_without_continuation():
    item = {"context": "  The capital of France is \n", "continuation": "Paris"}
    shot = {"context": "The capital of Spain is ", "continuation": "Madrid"}
    without, full = render_prompts("language_modeling", item, [shot], " ")
    assert without == "The capital of Spain is Madrid\n\nThe capital of France is"
    assert full == "The capital of Spain is Madrid\n\nThe capital of France is Paris"


def test_unknown_task_type_is_an_error():
    with pytest.raises(ValueError, match="unknown CORE task type"):
        render_prompts("ranking", {}, [], " ")


# ---------------------------------------------------------------------------------------------------------------------
# The scored span, on a real BPE tokenizer

def test_lm_context_ending_in_whitespace_scores_the_continuation_word_only(tiny_tokenizer):
    item = {"context": "The quick brown fox jumps over the ", "continuation": "lazy dog"}
    prompts = render_prompts("language_modeling", item, [], " ")
    assert spans_as_text(tiny_tokenizer, "language_modeling", prompts) == [" lazy dog"]
    newline = {"context": "The quick brown fox jumps over the\n", "continuation": "lazy dog"}
    prompts = render_prompts("language_modeling", newline, [], " ")
    assert spans_as_text(tiny_tokenizer, "language_modeling", prompts) == [" lazy dog"]


def test_lm_with_an_empty_delimiter_scores_the_continuation_as_written(tiny_tokenizer):
    item = {"context": "print(add(2, 3))  # prints", "continuation": " 5"}
    prompts = render_prompts("language_modeling", item, [], "")
    assert spans_as_text(tiny_tokenizer, "language_modeling", prompts) == [" 5"]


def test_choices_sharing_leading_words_are_scored_where_they_differ(tiny_tokenizer):
    item = {"query": "The fox jumps over", "choices": ["the lazy dog", "the brown dog"], "gold": 0}
    prompts = render_prompts("multiple_choice", item, [], " ")
    assert spans_as_text(tiny_tokenizer, "multiple_choice", prompts) == [" lazy dog", " brown dog"]


def test_a_query_ending_in_a_space_gives_the_space_to_the_choices_first_token(tiny_tokenizer):
    item = {"query": "The quick brown fox jumps over the ", "choices": ["lazy dog", "moon"], "gold": 0}
    prompts = render_prompts("multiple_choice", item, [], "")
    assert spans_as_text(tiny_tokenizer, "multiple_choice", prompts) == [" lazy dog", " moon"]


def test_schema_scores_the_shared_continuation_after_contexts_of_different_lengths(tiny_tokenizer):
    item = {"context_options": ["The astronauts", "The 3 astronauts from 1969"], "continuation": "flew to the Moon.",
            "gold": 0}
    prompts = render_prompts("schema", item, [], " ")
    assert spans_as_text(tiny_tokenizer, "schema", prompts) == [" flew to the Moon.", " flew to the Moon."]


def test_prompts_longer_than_the_training_context_are_scored_whole(tiny_tokenizer):
    # A real GPT with a 16-token context, and 3-shot prompts several times that long: the model must see every
    # prompt token (the reference scores nanochat models uncropped), which its 10x rotary tables allow.
    tok = tiny_tokenizer
    model = make_tiny_model(tok.get_vocab_size(), sequence_len=16)
    assert model.cos.size(1) == 160
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[1]))
    items = [{"query": f"Question {i}: is the sky blue today?", "choices": ["yes", "no"], "gold": 0}
             for i in range(4)]
    task = {"label": "t", "type": "multiple_choice", "shots": 3, "delimiter": " ", "items": items}
    evaluate_task(model, tok, task, "cpu")
    data = prepare_items(items)
    longest = [max(len(tok.encode(p, prepend=tok.get_bos_token_id()))
                   for p in render_prompts("multiple_choice", item, fewshot_examples(data, i, 3), " "))
               for i, item in enumerate(data)]
    assert seen == longest and min(seen) > 16


# ---------------------------------------------------------------------------------------------------------------------
# Scoring with a model whose outputs are known

def test_scorer_picks_the_lowest_loss_choice_for_each_task_type(tiny_tokenizer):
    tok = tiny_tokenizer
    word = tok.encode(" the")
    assert len(word) == 1  # a single token, so "predict it everywhere" is a complete, known behaviour
    model = LookupModel(tok.get_vocab_size(), word)
    mc = {"label": "t", "type": "multiple_choice", "shots": 0, "delimiter": " ",
          "items": [{"query": "Is it?", "choices": ["no", "the"], "gold": 1},
                    {"query": "Is it?", "choices": ["the", "no"], "gold": 1}]}
    assert evaluate_task(model, tok, mc, "cpu") == 0.5
    schema = {"label": "s", "type": "schema", "shots": 0, "delimiter": " ",
              "items": [{"context_options": ["x", "y"], "continuation": "the", "gold": 0}]}
    assert evaluate_task(model, tok, schema, "cpu") == 1.0  # equal losses: the first option wins
    lm = {"label": "l", "type": "language_modeling", "shots": 0, "delimiter": " ",
          "items": [{"context": "Say", "continuation": "the"}, {"context": "Say", "continuation": "no"}]}
    assert evaluate_task(model, tok, lm, "cpu") == 0.5


def test_tokens_the_choices_share_do_not_count_in_their_mean_loss(tiny_tokenizer):
    # The model finds " the" cheap and every other token dear. Over whole choices, "the no" (one cheap token of
    # two) beats "the the no no no" (two of five); over the tokens after the shared " the", the second choice has
    # one cheap token of four against none of one, and wins.
    tok = tiny_tokenizer
    model = LookupModel(tok.get_vocab_size(), tok.encode(" the"))
    mc = {"label": "t", "type": "multiple_choice", "shots": 0, "delimiter": " ",
          "items": [{"query": "Is it?", "choices": ["the no", "the the no no no"], "gold": 1}]}
    assert evaluate_task(model, tok, mc, "cpu") == 1.0


def test_core_over_the_mirror_bundle_with_a_tiny_model(mirror, tiny_tokenizer, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror))
    # Whole prompts reach ~1,500 tokens of the tiny tokenizer: a 512-token context gives rotary tables for 5,120.
    model = make_tiny_model(tiny_tokenizer.get_vocab_size(), sequence_len=512)
    result = evaluate_core(model, tiny_tokenizer, "cpu", max_per_task=4)
    assert result["missing"] == ["squad"]
    assert result["label"] == core_label(21) == "CORE over 21/22 tasks"
    assert len(result["tasks"]) == 21
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result["tasks"].values())
    assert "squad" in capsys.readouterr().err


def test_the_per_task_table_shows_each_accuracy_beside_its_chance_level():
    from nanochat.core_eval import core_table
    table = core_table({"hellaswag": {"accuracy": 0.3, "chance": 0.25, "centered": 0.3 / 0.75 - 1 / 3}})
    assert table.splitlines()[0] == "| CORE task | Accuracy | Chance | Centered |"
    assert "| hellaswag | 0.3000 | 0.2500 | +0.0667 |" in table
