"""Pretraining data: parquet shards with one `text` column, downloaded on demand or made from your own files.

    python -m nanochat.dataset -n 8                         # first 8 training shards + the validation shard
    python -m nanochat.dataset -n 8 --dataset climbmix    # the reference's current data (a preset name)
    python -m nanochat.dataset --from-text notes/*.txt --name mynotes   # then --dataset local/mynotes

The validation shard is always the dataset's last shard, however many training shards are present.
"""

import argparse
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError, get_base_dir, run_cli
from nanochat.download import hf_file

FINEWEB_EDU = "karpathy/fineweb-edu-100b-shuffle"  # the seed's pretraining data, the default
CLIMBMIX = "karpathy/climbmix-400b-shuffle"  # the reference's current data (its leaderboard's val bpb ~0.718)
DATASET_PRESETS = {"fineweb-edu": FINEWEB_EDU, "climbmix": CLIMBMIX}
KNOWN_SHARD_COUNTS = {
    "karpathy/fineweb-edu-100b-shuffle": 1823,
    "karpathy/climbmix-400b-shuffle": 6543,
    "nanochat-mirror/docs-dictionary-sample": 7,
}
ROWS_PER_GROUP = 1024


def default_dataset(name: str | None = None) -> str:
    """The dataset repo of `name` (a preset of DATASET_PRESETS or a repo), else of $NANOCHAT_DATASET, else
    FineWeb-Edu's."""
    name = name or os.environ.get("NANOCHAT_DATASET") or FINEWEB_EDU
    return DATASET_PRESETS.get(name, name)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def dataset_dir(dataset: str) -> Path:
    return get_base_dir() / "hf" / "datasets" / dataset


def num_shards(dataset: str, given: int | None = None) -> int:
    """How many shards the dataset has in all (the last one is the validation shard): from a local dataset's
    manifest, else `given` (--num-shards), else `NANOCHAT_NUM_SHARDS` (for a Hub dataset we know no count of)."""
    manifest = dataset_dir(dataset) / "dataset.json"
    if manifest.exists():
        return json.loads(manifest.read_text())["num_shards"]
    if given:
        return given
    if os.environ.get("NANOCHAT_NUM_SHARDS"):
        return int(os.environ["NANOCHAT_NUM_SHARDS"])
    if dataset in KNOWN_SHARD_COUNTS:
        return KNOWN_SHARD_COUNTS[dataset]
    raise UserError(f"unknown number of shards for dataset {dataset!r}: set NANOCHAT_NUM_SHARDS (or --num-shards) "
                    "so the last shard can be used for validation")


def download_shards(n: int, dataset: str | None = None, workers: int = 4, total: int | None = None) -> list[Path]:
    """Fetch the first n training shards and the validation shard, in parallel; returns their paths. `total`: the
    dataset's shard count when `num_shards` cannot know it."""
    dataset = default_dataset(dataset)
    total = num_shards(dataset, total)
    n = min(n, total - 1)
    indices = list(range(n)) + [total - 1]
    if dataset.startswith("local/"):
        return [dataset_dir(dataset) / shard_name(i) for i in indices]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda i: hf_file(dataset, shard_name(i)), indices))


def list_shards(split: str, dataset: str | None = None) -> list[Path]:
    """Local shards of a split: 'train' = every present shard but the last, 'val' = the dataset's last shard."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    dataset = default_dataset(dataset)
    total = num_shards(dataset)
    folder = dataset_dir(dataset)
    if split == "val":
        shards = [folder / shard_name(total - 1)]
        shards = [p for p in shards if p.exists()]
    else:
        shards = [folder / shard_name(i) for i in range(total - 1) if (folder / shard_name(i)).exists()]
    if not shards:
        raise UserError(f"no {split} shards of {dataset} in {folder}: download them with "
                        f"`python -m nanochat.dataset -n 8` (with --dataset {dataset} or NANOCHAT_DATASET)")
    return shards


def row_groups(split: str, dataset: str | None = None) -> list[tuple[Path, int]]:
    """Every (shard, row group) of a split, in order: the unit of work distributed over ranks."""
    units = []
    for shard in list_shards(split, dataset):
        units.extend((shard, g) for g in range(pq.ParquetFile(shard).num_row_groups))
    return units


def read_row_group(shard: Path, group: int) -> list[str]:
    return pq.ParquetFile(shard).read_row_group(group, columns=["text"]).column("text").to_pylist()


def iter_texts(split: str, dataset: str | None = None, rank: int = 0, world_size: int = 1) -> Iterator[str]:
    """Documents of a split, one pass; row groups are dealt to ranks rank::world_size."""
    for shard, group in row_groups(split, dataset)[rank::world_size]:
        yield from read_row_group(shard, group)


# ---------------------------------------------------------------------------------------------------------------------
# Your own text as shards

def _read_documents(path: Path) -> list[str]:
    """A .txt file is one document (the whole file); a .jsonl file one per line's 'text' field; a .parquet file one
    per row of its 'text' column."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise UserError(f"{path}:{n}: each JSONL line needs a string 'text' field")
                docs.append(row["text"])
        return docs
    if suffix == ".parquet":
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise UserError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
        return table.column("text").to_pylist()
    raise UserError(f"{path}: unsupported file type {suffix!r}; use .txt (one document per file), .jsonl (a 'text' "
                    "field per line) or .parquet (a 'text' column)")


def write_shard(docs: list[str], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": docs}), tmp, row_group_size=ROWS_PER_GROUP, compression="zstd")
    os.replace(tmp, path)


def shards_from_text(paths: list[Path], name: str, docs_per_shard: int) -> Path:
    """Turn .txt/.jsonl/.parquet files into a local dataset `local/<name>`; the last shard is for validation."""
    docs = []
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist")
        docs.extend(d for d in _read_documents(path) if d.strip())
    if len(docs) < 2:
        raise UserError(f"found {len(docs)} non-empty documents in {len(paths)} file(s): need at least 2 "
                        "(one for training, one for validation)")
    n_shards = max(2, -(-len(docs) // docs_per_shard))
    per_shard = -(-len(docs) // n_shards)
    folder = dataset_dir(f"local/{name}")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        write_shard(docs[i * per_shard:(i + 1) * per_shard] or docs[-1:], folder / shard_name(i))
    (folder / "dataset.json").write_text(json.dumps({"num_shards": n_shards, "documents": len(docs)}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Download pretraining shards, or make shards from your own text.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-n", "--num-files", type=int, default=8, help="training shards to download (plus val)")
    parser.add_argument("--dataset", default=None, help="fineweb-edu, climbmix or a Hub dataset repo of parquet "
                        "shards (default: $NANOCHAT_DATASET or fineweb-edu)")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="total shards of a dataset we know no count of (default: $NANOCHAT_NUM_SHARDS)")
    parser.add_argument("--from-text", nargs="+", type=Path, default=None, help=".txt/.jsonl/.parquet files")
    parser.add_argument("--name", default="mytext", help="name of the local dataset made by --from-text")
    parser.add_argument("--docs-per-shard", type=int, default=50_000)
    args = parser.parse_args()
    if args.from_text:
        folder = shards_from_text(args.from_text, args.name, args.docs_per_shard)
        print(f"wrote {num_shards('local/' + args.name)} shards to {folder}; train on them with "
              f"--dataset local/{args.name} (or NANOCHAT_DATASET=local/{args.name})")
        return
    dataset = default_dataset(args.dataset)
    paths = download_shards(args.num_files, dataset, args.num_workers, args.num_shards)
    print(f"{len(paths)} shards of {dataset} ready in {dataset_dir(dataset)} (validation: {paths[-1].name})")


if __name__ == "__main__":
    run_cli(main)
