"""The report card: each stage records a section; `python -m nanochat.report generate` renders report.md + plots.

Sections are JSON files ({"section", "data", "curves", "time"}), so stages in separate processes (and re-runs) simply
overwrite their own file. Curves are lists of [step, flops, value]. They are kept per model, so that two models
trained in one base directory never mix:

    <base>/report/tokenizer-*.json          the tokenizer's sections, shared by every model of the base directory
    <base>/report/<model_tag>/*.json        one model's sections, its report.md and plots
    <base>/report/report.md                 every model's report, one after the other

and per run: when a stage that produces a model records again (a new pretraining run under the same tag, a new SFT),
the sections of what was derived from its previous model are moved to <model_tag>/superseded/<time>/.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
from pathlib import Path

import torch

from nanochat.common import get_base_dir, git_commit

STAGE_ORDER = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model evaluation",
               "Chat SFT", "Chat evaluation sft", "Chat RL", "Chat evaluation rl"]
SHARED_SECTIONS = {"Tokenizer training", "Tokenizer evaluation"}
# Sections describing a model derived from the one each model-producing stage writes.
DOWNSTREAM = {"Base model training": STAGE_ORDER[3:], "Chat SFT": STAGE_ORDER[5:], "Chat RL": STAGE_ORDER[7:]}
# metrics shown in the summary table, by the key stages record them under
SUMMARY_KEYS = ["val_bpb", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee",
                "ChatCORE"]
STAGE_COLUMNS = {"Base model training": "BASE", "Base model evaluation": "BASE", "Chat evaluation sft": "SFT",
                 "Chat SFT": "SFT", "Chat RL": "RL", "Chat evaluation rl": "RL"}


def slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def _model_tag_of(data: list) -> str | None:
    """The model a section is about: stages record it as `model_tag` in their first dict."""
    for item in data:
        if isinstance(item, dict) and item.get("model_tag"):
            return str(item["model_tag"])
    return None


def _read_sections(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in directory.glob("*.json")] if directory.is_dir() else []


class Report:
    """The report of one model (`model_tag`), or of the whole base directory when model_tag is None."""

    def __init__(self, directory: Path, model_tag: str | None = None):
        self.root = Path(directory)
        self.model_tag = model_tag

    @property
    def dir(self) -> Path:
        return self.root / self.model_tag if self.model_tag else self.root

    def log(self, section: str, data: list | dict, curves: dict | None = None) -> Path:
        """Record (replace) a stage's section; data is a list of dicts/strings, curves {name: [[step, flops, v]]}.

        A report without a model tag files the section under the `model_tag` its data names."""
        data = data if isinstance(data, list) else [data]
        tag = self.model_tag or _model_tag_of(data)
        directory = self.root if section in SHARED_SECTIONS or not tag else self.root / tag
        directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now()
        stale = [directory / f"{slug(name)}.json" for name in DOWNSTREAM.get(section, [])]
        stale = [p for p in stale if p.exists()]
        if stale:  # this stage made a new model: what was measured on its previous one belongs to an older run
            archive = directory / "superseded" / f"{stamp:%Y%m%d-%H%M%S-%f}"
            archive.mkdir(parents=True)
            for p in stale:
                os.replace(p, archive / p.name)
        path = directory / f"{slug(section)}.json"
        payload = {"section": section, "data": data, "curves": curves or {},
                   "time": stamp.isoformat(timespec="seconds")}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, path)
        return path

    def model_tags(self) -> list[str]:
        """Models with sections, in the order their newest section was recorded."""
        if self.model_tag:
            return [self.model_tag]
        dirs = [d for d in self.root.iterdir() if d.is_dir() and list(d.glob("*.json"))] if self.root.is_dir() else []
        return [d.name for d in sorted(dirs, key=lambda d: max(p.stat().st_mtime for p in d.glob("*.json")))]

    def sections(self) -> list[dict]:
        """The shared sections plus this model's (all models' without a tag), in pipeline order."""
        found = _read_sections(self.root)
        for tag in self.model_tags():
            found += _read_sections(self.root / tag)
        order = {name: i for i, name in enumerate(STAGE_ORDER)}
        return sorted(found, key=lambda s: (order.get(s["section"], len(order)), s["time"]))

    def reset(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def generate(self) -> Path:
        """This model's report.md; without a model tag, each model's and one report.md holding them all."""
        if self.model_tag:
            out = self.dir / "report.md"
            out.write_text("\n".join(self._header() + self._render(self.sections(), "")))
            return out
        shared = _read_sections(self.root)
        body = [] if self.model_tags() else self._render(shared, "")
        for tag in self.model_tags():
            model = Report(self.root, tag)
            model.generate()
            body += [f"# Model {tag}", ""] + model._render(model.sections(), f"{tag}/")
        out = self.root / "report.md"
        out.write_text("\n".join(self._header() + body))
        return out

    def _header(self) -> list[str]:
        title = f"# nanochat report card: {self.model_tag}" if self.model_tag else "# nanochat report card"
        return [title, "", f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M}", "", "## System", "",
                *system_info(), ""]

    def _render(self, sections: list[dict], link_prefix: str) -> list[str]:
        lines = []
        table = summary_table(sections)
        if table:
            lines += ["## Summary", "", *table, ""]
        plots = self._plot(sections) if not link_prefix else self._plot_names(sections)
        for s in sections:
            lines += [f"## {s['section']}", "", f"_recorded {s['time']}_", ""]
            for item in s["data"]:
                if isinstance(item, dict):
                    lines += [f"- {k}: {_fmt(v)}" for k, v in item.items()]
                else:
                    lines.append(str(item))
            for plot in plots.get(s["section"], []):
                lines += ["", f"![{plot.stem}]({link_prefix}{plot.name})"]
            lines.append("")
        return lines

    def _plot_names(self, sections: list[dict]) -> dict[str, list[Path]]:
        """The plots `_plot` already wrote for these sections (the per-model report is generated first)."""
        return {s["section"]: [p for axis in ("step", "flops")
                               if (p := self.dir / f"{slug(s['section'])}-{axis}.png").exists()]
                for s in sections}

    def _plot(self, sections: list[dict]) -> dict[str, list[Path]]:
        import matplotlib  # heavy: only the plots need it, not every stage that logs to the report
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        made: dict[str, list[Path]] = {}
        for s in sections:
            curves = {k: v for k, v in s.get("curves", {}).items() if v}
            if not curves:
                continue
            for axis, col, label in (("step", 0, "step"), ("flops", 1, "FLOPs")):
                fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
                for ax, (name, points) in zip(axes[0], curves.items()):
                    ax.plot([p[col] for p in points], [p[2] for p in points], marker="." if len(points) < 50 else None)
                    ax.set_xlabel(label)
                    ax.set_ylabel(name)
                    ax.set_title(f"{s['section']}: {name}")
                    ax.grid(alpha=0.3)
                    if axis == "flops":
                        ax.set_xscale("log")
                fig.tight_layout()
                path = self.dir / f"{slug(s['section'])}-{axis}.png"
                fig.savefig(path, dpi=90)
                plt.close(fig)
                made.setdefault(s["section"], []).append(path)
        return made


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _tokens(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def summary_table(sections: list[dict]) -> list[str]:
    """Metrics per stage (BASE → SFT → RL): the rows are the SUMMARY_KEYS any stage recorded, each beside its chance
    level (stages record it under "chance"). A stage's val bpb is its last measurement (base_eval's after
    base_train's), shown with the tokens it covered; a line under the table names the dataset of each."""
    values: dict[str, dict[str, object]] = {}
    labels: dict[str, str] = {}
    chance: dict[str, object] = {}
    bpb_datasets: dict[str, str] = {}
    for s in sections:
        column = STAGE_COLUMNS.get(s["section"])
        if not column:
            continue
        for item in s["data"]:
            if not isinstance(item, dict):
                continue
            chance.update(item.get("chance") or {})
            for key, value in item.items():
                base_key = key.split(" over ")[0] if key.startswith("CORE") else key
                if base_key not in SUMMARY_KEYS:
                    continue
                labels[base_key] = key
                if key == "val_bpb" and isinstance(value, float) and item.get("val_bpb_tokens"):
                    value = f"{value:.4f} ({_tokens(item['val_bpb_tokens'])} tokens)"
                    bpb_datasets[column] = str(item.get("dataset", "?"))
                values.setdefault(base_key, {})[column] = value
    if not values:
        return []
    rows = ["| Metric | Chance | BASE | SFT | RL |", "|---|---|---|---|---|"]
    for key in SUMMARY_KEYS:
        if key in values:
            cells = [_fmt(chance.get(key, "-"))] + [_fmt(values[key].get(c, "-")) for c in ("BASE", "SFT", "RL")]
            rows.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    if bpb_datasets:
        rows += ["", "val bpb measured on: " + "; ".join(f"{c} {d}" for c, d in bpb_datasets.items())]
    return rows


def system_info() -> list[str]:
    info = [f"- Platform: {platform.platform()}", f"- Python: {platform.python_version()}, torch {torch.__version__}",
            f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            f"- git commit: {git_commit()}"]
    if torch.cuda.is_available():
        info.append(f"- GPUs: {torch.cuda.device_count()} × {torch.cuda.get_device_name()}")
    return info


def get_report(model_tag: str | None = None) -> Report:
    """The report of one model, or without a tag the base directory's (which files sections by their model_tag)."""
    return Report(get_base_dir() / "report", model_tag)


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate or reset the report card.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("command", choices=["generate", "reset"])
    parser.add_argument("--model-tag", default=None, help="only this model's report (default: every model's)")
    args = parser.parse_args()
    report = get_report(args.model_tag)
    if args.command == "reset":
        report.reset()
        print(f"report reset: {report.dir}")
    else:
        path = report.generate()
        print(f"report written: {path}")
        for tag in report.model_tags():
            print(f"{tag}:")
            print("\n".join(summary_table(get_report(tag).sections())))


if __name__ == "__main__":
    main()
