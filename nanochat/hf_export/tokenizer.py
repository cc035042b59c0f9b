"""Our tokenizer as a Hugging Face `tokenizers` byte-level BPE, plus a chat template that renders conversations as
`Tokenizer.render_for_completion` does. Used by the export (scripts/export_hf.py); needs the `hf` extra.

tiktoken keeps only the ranks of the merged tokens; a BPE in `tokenizers` needs the merges themselves. Each token is
the merge of every split of it into two tokens that exist, ranked by the token's rank: applying the lowest-ranked
available merge is then exactly tiktoken's rule (merge the adjacent pair whose concatenation has the lowest rank).
`ignore_merges` mirrors tiktoken's shortcut of taking a whole pre-tokenized piece when it is itself a token.
"""

from functools import cache

from nanochat.common import UserError
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which byte-level BPE vocabularies are written in:
    printable Latin-1 bytes stand for themselves, the rest are shifted past U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def _as_unicode(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    if sorted(ranks.values()) != list(range(len(ranks))) or any(ranks.get(bytes([b])) != b for b in range(256)):
        raise UserError("the tokenizer's ranks are not 256 byte tokens followed by contiguous merges: "
                        "retrain it with `python -m scripts.tok_train`")
    vocab = {_as_unicode(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], _as_unicode(left), _as_unicode(right)))
    merges.sort()
    return vocab, [(left, right) for *_, left, right in merges]


def build_hf_tokenizer(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly as ours, with the special tokens at their ids."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    vocab, merges = bpe_vocab_and_merges(tokenizer.mergeable_ranks)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False,
                                byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False, lstrip=False, rstrip=False)
                           for name in SPECIAL_TOKENS])
    for name in SPECIAL_TOKENS:
        if hf.token_to_id(name) != tokenizer.encode_special(name):
            raise UserError(f"special token {name} lands at id {hf.token_to_id(name)} in the Hugging Face tokenizer "
                            f"but is {tokenizer.encode_special(name)} in ours: the tokenizer's vocabulary has gaps")
    return hf


# render_conversation in Jinja: <|bos|>, a leading system message merged into the first user turn (separated by a
# blank line), user turns in <|user_start|>…<|user_end|>, assistant turns in <|assistant_start|>…<|assistant_end|>
# whose content is a string or a list of parts (text, python tool calls, python outputs).
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages | length < 2 or messages[1]['role'] != 'user' -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}"
    "{%- endif -%}"
    "{%- set merged = {'role': 'user', 'content': messages[0]['content'] ~ '\\n\\n' ~ messages[1]['content']} -%}"
    "{%- set messages = [merged] + messages[2:] -%}"
    "{%- endif -%}"
    "<|bos|>"
    "{%- for message in messages -%}"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('roles must alternate user, assistant, ... after an optional first system message') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user_start|>{{- message['content'] -}}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}"
    "<|python_start|>{{- part['text'] -}}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}"
    "<|output_start|>{{- part['text'] -}}<|output_end|>"
    "{%- else -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def build_hf_fast_tokenizer(tokenizer: Tokenizer, model_max_length: int):
    """The transformers tokenizer of an export: our BPE, the chat template, <|bos|> as BOS and <|assistant_end|> as
    end of turn (and padding, which generation never mistakes for input: it is also an end token)."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=build_hf_tokenizer(tokenizer), bos_token="<|bos|>",
                                   eos_token="<|assistant_end|>", pad_token="<|assistant_end|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)
