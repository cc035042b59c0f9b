"""Compression of our tokenizer (bytes per token) on held-out text, against GPT-2 and GPT-4 when available."""

import argparse
import itertools

import tiktoken

from nanochat import download
from nanochat.common import run_cli
from nanochat.dataset import default_dataset, iter_texts
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

SAMPLES = {
    "news": "The city council voted 7-2 on Tuesday to approve a $4.5 million plan to repair bridges, officials said.",
    "code": "def fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "math": "If 3x + 7 = 22, then 3x = 15 and x = 5. The area of a circle of radius 2 is 4π ≈ 12.566.",
    "korean": "안녕하세요. 오늘 날씨가 정말 좋네요. 우리는 공원에 산책하러 갈 거예요.",
}


def other_encodings() -> dict:
    """GPT-2 and GPT-4 encodings from tiktoken, if they can be loaded (they need network or a tiktoken cache)."""
    found = {}
    for name, encoding in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
        try:
            found[name] = tiktoken.get_encoding(encoding)
        except Exception:
            pass
    return found


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Bytes per token of the tokenizer on held-out text.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--val-docs", type=int, default=200, help="documents of the validation shard to measure on")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    tokenizer = get_tokenizer()
    if args.dry_run:
        return
    texts = dict(SAMPLES)
    texts["validation shard"] = "\n".join(itertools.islice(iter_texts("val", default_dataset()), args.val_docs))
    others = {} if download.offline() else other_encodings()
    if not others:
        print("GPT-2 / GPT-4 encodings unavailable offline: comparing nothing but ours")
    header = f"{'text':<18}{'bytes':>10}{'ours':>10}" + "".join(f"{n:>10}" for n in others)
    print(header + "   (bytes per token)")
    rows = {}
    for name, text in texts.items():
        nbytes = len(text.encode("utf-8"))
        ours = nbytes / max(1, len(tokenizer.encode(text)))
        row = {"ours": round(ours, 3)}
        line = f"{name:<18}{nbytes:>10,}{ours:>10.2f}"
        for other, enc in others.items():
            ratio = nbytes / max(1, len(enc.encode_ordinary(text)))
            row[other] = round(ratio, 3)
            line += f"{ratio:>10.2f}"
        rows[name] = row
        print(line)
    get_report().log("Tokenizer evaluation", [{"vocab_size": tokenizer.get_vocab_size()},
                                              {f"bytes/token {k}": v["ours"] for k, v in rows.items()}])


if __name__ == "__main__":
    run_cli(main)
