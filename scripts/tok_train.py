"""Train the BPE tokenizer on the first --max-chars characters of the pretraining shards.

    python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
"""

import argparse
import time

from nanochat.common import run_cli
from nanochat.dataset import default_dataset, iter_texts
from nanochat.report import get_report
from nanochat.tokenizer import Tokenizer, iter_capped, tokenizer_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the BPE tokenizer (rustbpe) and save it for tiktoken.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="characters of training text to use")
    p.add_argument("--doc-cap", type=int, default=10_000, help="characters kept from each document")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size incl. 9 special tokens")
    p.add_argument("--dataset", default=None, help="pretraining dataset (default $NANOCHAT_DATASET or FineWeb-Edu)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and the data, then exit")
    args = p.parse_args(argv)
    dataset = args.dataset or default_dataset()
    texts = iter_texts("train", dataset)  # raises a clear error when no shards are downloaded
    print(f"tok_train: vocab {args.vocab_size:,} from up to {args.max_chars:,} characters of {dataset} "
          f"(documents capped at {args.doc_cap:,})", flush=True)
    if args.dry_run:
        return
    seen = {"chars": 0, "docs": 0}

    def counted():
        for text in iter_capped(texts, args.max_chars, args.doc_cap):
            seen["chars"] += len(text)
            seen["docs"] += 1
            yield text

    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(counted(), args.vocab_size)
    seconds = time.time() - t0
    tokenizer.save(tokenizer_dir())
    print(f"trained on {seen['chars']:,} characters ({seen['docs']:,} documents) in {seconds:.1f} s "
          f"({seen['chars'] / seconds / 1e6:.1f} M chars/s); saved to {tokenizer_dir()}", flush=True)
    get_report().log("Tokenizer training", [{"vocab_size": tokenizer.get_vocab_size(), "dataset": dataset,
                                             "train_chars": seen["chars"], "documents": seen["docs"],
                                             "doc_cap": args.doc_cap, "train_time_s": round(seconds, 2)}])


if __name__ == "__main__":
    run_cli(main)
