"""The CORE scorer on hand-built items with a model whose outputs are known, then a real tiny model on the bundle."""

import torch

from nanochat.core_eval import build_prompts, core_label, evaluate_core, evaluate_task


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


def test_prompts_join_fewshot_examples_with_blank_lines():
    item = {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0}
    shot = {"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}
    prompts = build_prompts("multiple_choice", item, [shot], "\nAnswer: ")
    assert prompts == [("Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: ", "4"), ("Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: ", "5")]
    schema = build_prompts("schema", {"context_options": ["A cat", "A dog"], "continuation": "barks", "gold": 1}, [],
                           " ")
    assert schema == [("A cat ", "barks"), ("A dog ", "barks")]


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


def test_core_over_the_mirror_bundle_with_a_tiny_model(mirror, tiny_checkpoint, base_dir, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror))
    result = evaluate_core(tiny_checkpoint, __import__("nanochat.tokenizer").tokenizer.get_tokenizer(), "cpu",
                           max_per_task=4)
    assert result["missing"] == ["squad"]
    assert result["label"] == core_label(21) == "CORE over 21/22 tasks"
    assert len(result["tasks"]) == 21
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result["tasks"].values())
    assert "squad" in capsys.readouterr().err
