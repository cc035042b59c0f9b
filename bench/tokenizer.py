"""Tokenizer benchmark: BPE training time on real text, and encoding throughput single-threaded and batched.

    NANOCHAT_MIRROR=../shared/mirror python -m bench.tokenizer --max-chars 50000000 --vocab-size 32768
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.tokenizer import Tokenizer


def corpus(max_chars: int) -> list[str]:
    """Documents from the mirror's training shards (or downloaded shards) up to max_chars characters."""
    mirror = os.environ.get("NANOCHAT_MIRROR")
    if mirror:
        folder = Path(mirror) / "hf/datasets/nanochat-mirror/docs-dictionary-sample"
        shards = sorted(folder.glob("shard_*.parquet"))[:-1]
    else:
        from nanochat.dataset import list_shards
        shards = list_shards("train")
    docs, total = [], 0
    for shard in shards:
        for text in pq.read_table(shard, columns=["text"]).column("text").to_pylist():
            docs.append(text)
            total += len(text)
            if total >= max_chars:
                return docs
    return docs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-chars", type=int, default=50_000_000)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--encode-chars", type=int, default=20_000_000)
    args = p.parse_args()
    docs = corpus(args.max_chars)
    chars = sum(len(d) for d in docs)
    print(f"training on {chars:,} characters ({len(docs):,} documents)", file=sys.stderr)
    t0 = time.perf_counter()
    tok = Tokenizer.train_from_iterator(iter(docs), args.vocab_size)
    train_s = time.perf_counter() - t0
    sample, total = [], 0
    for d in docs:
        sample.append(d)
        total += len(d.encode("utf-8"))
        if total >= args.encode_chars:
            break
    t0 = time.perf_counter()
    for d in sample:
        tok.encode(d)
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok.encode(sample, num_threads=os.cpu_count() or 1)
    batch_s = time.perf_counter() - t0
    print(json.dumps({"train_chars": chars, "vocab_size": args.vocab_size, "train_s": round(train_s, 2),
                      "train_chars_per_s": round(chars / train_s), "encode_mb": round(total / 1e6, 1),
                      "encode_mb_per_s_single": round(total / 1e6 / single_s, 2),
                      "encode_mb_per_s_batched": round(total / 1e6 / batch_s, 2), "threads": os.cpu_count()}))


if __name__ == "__main__":
    main()
