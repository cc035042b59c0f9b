"""Tokenizer: BPE training on real text, lossless round trips, special-token safety, chat rendering masks."""

import os
import subprocess
import sys

import pytest
import torch

from nanochat.common import UserError
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.mark.parametrize("text", [
    "Hello, world! How's it going?",
    "Émile, naïve café, Zürich — “quotes” and 日本語のテキスト",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
    "digits 1234567890 and 3.14159 and -42",
    "whitespace   runs\t\ttabs\n\n\nnewlines    end   ",
    "def f(x):\n    return x ** 2  # comment\n",
    "",
])
def test_encode_decode_round_trip(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_numbers_split_into_groups_of_at_most_two_digits(tiny_tokenizer):
    pieces = [tiny_tokenizer.decode([t]) for t in tiny_tokenizer.encode("12345")]
    assert "".join(pieces) == "12345"
    assert all(len(p) <= 2 for p in pieces)


def test_special_token_strings_in_text_encode_as_ordinary_text(tiny_tokenizer):
    text = "a <|bos|> b <|assistant_end|> c <|python_start|>"
    ids = tiny_tokenizer.encode(text)
    specials = {tiny_tokenizer.encode_special(s) for s in SPECIAL_TOKENS}
    assert not specials & set(ids)
    assert tiny_tokenizer.decode(ids) == text


def test_special_tokens_take_the_last_ids(tiny_tokenizer):
    V = tiny_tokenizer.get_vocab_size()
    assert V == 1024
    assert [tiny_tokenizer.encode_special(s) for s in SPECIAL_TOKENS] == list(range(V - len(SPECIAL_TOKENS), V))
    assert tiny_tokenizer.get_bos_token_id() == V - len(SPECIAL_TOKENS)


def test_prepend_and_append_in_batch_encoding(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    batch = tiny_tokenizer.encode(["one", "two three"], prepend="<|bos|>", append=bos, num_threads=2)
    assert all(ids[0] == bos and ids[-1] == bos for ids in batch)
    assert tiny_tokenizer.decode(batch[1][1:-1]) == "two three"


def test_save_and_load_give_the_same_tokenizer(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    loaded = Tokenizer.from_directory(tmp_path)
    text = "The mitochondria is the powerhouse of the cell. 🙂 123"
    assert loaded.encode(text) == tiny_tokenizer.encode(text)
    assert torch.equal(torch.load(tmp_path / "token_bytes.pt"), tiny_tokenizer.token_bytes())


def test_token_bytes_count_raw_bytes_and_zero_for_specials(tiny_tokenizer):
    counts = tiny_tokenizer.token_bytes()
    for name in SPECIAL_TOKENS:
        assert counts[tiny_tokenizer.encode_special(name)] == 0
    # byte tokens such as 0xE6 are not valid UTF-8 alone; decoding through str would count 3 bytes (U+FFFD)
    invalid = [rank for token, rank in tiny_tokenizer.mergeable_ranks.items() if len(token) == 1 and token[0] >= 0x80]
    assert invalid and all(counts[r] == 1 for r in invalid)
    for token, rank in list(tiny_tokenizer.mergeable_ranks.items())[:2000]:
        assert counts[rank] == len(token)


def test_a_tokenizer_file_naming_a_class_is_refused_not_run(tiny_tokenizer, tmp_path):
    import os
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    tiny_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps({"mergeable_ranks": Exploit(), "pattern": "x"}))
    with pytest.raises(UserError, match="not a nanochat tokenizer.*tok_train"):
        Tokenizer.from_directory(tmp_path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("opcodes", [b"\x82\x01", b"\x83\x00\x01", b"\x84\x00\x00\x00\x01"],
                         ids=["EXT1", "EXT2", "EXT4"])
def test_a_tokenizer_file_with_an_extension_opcode_gets_the_one_line_error(tiny_tokenizer, tmp_path, opcodes):
    """pickle's EXT opcodes name a class through copyreg's registry; an unregistered code raised a bare ValueError."""
    tiny_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(b"\x80\x02" + opcodes + b".")
    with pytest.raises(UserError, match="not a nanochat tokenizer.*extension code.*tok_train"):
        Tokenizer.from_directory(tmp_path)


def test_parse_assistant_inverts_rendering_with_tool_calls(tiny_tokenizer):
    tok = tiny_tokenizer
    tokens = (tok.encode("Let me see.") + [tok.encode_special("<|python_start|>")] + tok.encode("6*7")
              + [tok.encode_special("<|python_end|>"), tok.encode_special("<|output_start|>")] + tok.encode("42")
              + [tok.encode_special("<|output_end|>")] + tok.encode("It is 42."))
    parts = tok.parse_assistant(tokens)
    assert parts == [{"type": "text", "text": "Let me see."}, {"type": "python", "text": "6*7"},
                     {"type": "python_output", "text": "42"}, {"type": "text", "text": "It is 42."}]
    rendered, _ = tok.render_conversation({"messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": parts}]})
    assert rendered[-len(tokens) - 1:-1] == tokens  # the next turn sees exactly what the model wrote
    assert tok.parse_assistant(tok.encode("plain")) == "plain"
    assert tok.parse_assistant([]) == ""
    assert tok.stop_tokens() == {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}


def test_loading_a_missing_tokenizer_names_the_command(tmp_path):
    with pytest.raises(UserError, match="scripts.tok_train"):
        Tokenizer.from_directory(tmp_path)


CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute "},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": "It is 42."}]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]}


def test_render_conversation_masks_token_by_token(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask = tok.render_conversation(CONVERSATION)
    s = tok.encode_special
    expected: list[tuple[list[int], int]] = [
        ([s("<|bos|>")], 0),
        ([s("<|user_start|>")], 0), (tok.encode("Be brief.\n\nWhat is 6*7?"), 0), ([s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0), (tok.encode("Let me compute "), 1),
        ([s("<|python_start|>")], 1), (tok.encode("6*7"), 1), ([s("<|python_end|>")], 1),
        ([s("<|output_start|>")], 0), (tok.encode("42"), 0), ([s("<|output_end|>")], 0),
        (tok.encode("It is 42."), 1), ([s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")], 0), (tok.encode("Thanks"), 0), ([s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0), (tok.encode("You're welcome."), 1), ([s("<|assistant_end|>")], 1),
    ]
    assert ids == [t for tokens, _ in expected for t in tokens]
    assert mask == [m for tokens, m in expected for _ in tokens]


def test_render_conversation_truncates_to_max_tokens(tiny_tokenizer):
    ids, mask = tiny_tokenizer.render_conversation(CONVERSATION, max_tokens=10)
    assert len(ids) == len(mask) == 10


def test_render_for_completion_drops_the_answer_and_opens_the_assistant_turn(tiny_tokenizer):
    conv = {"messages": CONVERSATION["messages"][1:3]}
    ids = tiny_tokenizer.render_for_completion(conv)
    assert ids[-1] == tiny_tokenizer.encode_special("<|assistant_start|>")
    assert tiny_tokenizer.encode_special("<|python_start|>") not in ids


def test_empty_user_and_assistant_turns_are_rendered_not_refused(tiny_tokenizer):
    s = tiny_tokenizer.encode_special
    ids, mask = tiny_tokenizer.render_conversation({"messages": [{"role": "user", "content": ""},
                                                                 {"role": "assistant", "content": ""}]})
    assert ids == [s("<|bos|>"), s("<|user_start|>"), s("<|user_end|>"), s("<|assistant_start|>"),
                   s("<|assistant_end|>")]
    assert mask == [0, 0, 0, 0, 1]


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "assistant", "content": "hi"}], "role"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "role"),
    ([{"role": "user", "content": None}], "string content"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "unknown part"),
    ([], "at least one message"),
])
def test_invalid_conversations_raise_clear_errors(tiny_tokenizer, messages, problem):
    with pytest.raises(UserError, match=problem):
        tiny_tokenizer.render_conversation({"messages": messages})


def test_tok_train_and_tok_eval_run_on_mirror_shards(mirror, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATASET="nanochat-mirror/docs-dictionary-sample")
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True,
                                       timeout=300)
    missing = run("scripts.tok_train", "--max-chars=200000", "--vocab-size=600")
    assert missing.returncode == 1 and "python -m nanochat.dataset" in missing.stderr
    assert run("nanochat.dataset", "-n", "1").returncode == 0
    trained = run("scripts.tok_train", "--max-chars=2000000", "--vocab-size=600")
    assert trained.returncode == 0, trained.stderr
    assert (base_dir / "tokenizer" / "tokenizer.pkl").exists() and (base_dir / "tokenizer" / "token_bytes.pt").exists()
    evaluated = run("scripts.tok_eval", "--val-docs=20")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "validation shard" in evaluated.stdout and "unavailable offline" in evaluated.stdout
