"""The report card: each stage records a section; `python -m nanochat.report generate` renders report.md + plots.

Sections are JSON files in <base>/report/ ({"section", "data", "curves", "time"}), so stages in separate processes
(and re-runs) simply overwrite their own file. Curves are lists of [step, flops, value].
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
from pathlib import Path

from nanochat.common import get_base_dir

STAGE_ORDER = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model evaluation",
               "Chat SFT", "Chat evaluation sft", "Chat RL", "Chat evaluation rl"]
# metrics shown in the summary table, by the key stages record them under
SUMMARY_KEYS = ["val_bpb", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee",
                "ChatCORE"]
STAGE_COLUMNS = {"Base model training": "BASE", "Base model evaluation": "BASE", "Chat evaluation sft": "SFT",
                 "Chat SFT": "SFT", "Chat RL": "RL", "Chat evaluation rl": "RL"}


def slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


class Report:
    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def log(self, section: str, data: list | dict, curves: dict | None = None) -> Path:
        """Record (replace) a stage's section; data is a list of dicts/strings, curves {name: [[step, flops, v]]}."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{slug(section)}.json"
        payload = {"section": section, "data": data if isinstance(data, list) else [data], "curves": curves or {},
                   "time": datetime.datetime.now().isoformat(timespec="seconds")}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, path)
        return path

    def sections(self) -> list[dict]:
        if not self.dir.is_dir():
            return []
        found = [json.loads(p.read_text()) for p in self.dir.glob("*.json")]
        order = {name: i for i, name in enumerate(STAGE_ORDER)}
        return sorted(found, key=lambda s: (order.get(s["section"], len(order)), s["time"]))

    def reset(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def generate(self) -> Path:
        sections = self.sections()
        lines = ["# nanochat report card", "", f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
                 "## System", "", *system_info(), ""]
        table = summary_table(sections)
        if table:
            lines += ["## Summary", "", *table, ""]
        plots = self._plot(sections)
        for s in sections:
            lines += [f"## {s['section']}", "", f"_recorded {s['time']}_", ""]
            for item in s["data"]:
                if isinstance(item, dict):
                    lines += [f"- {k}: {_fmt(v)}" for k, v in item.items()]
                else:
                    lines.append(str(item))
            for plot in plots.get(s["section"], []):
                lines += ["", f"![{plot.stem}]({plot.name})"]
            lines.append("")
        out = self.dir / "report.md"
        out.write_text("\n".join(lines))
        return out

    def _plot(self, sections: list[dict]) -> dict[str, list[Path]]:
        import matplotlib
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


def summary_table(sections: list[dict]) -> list[str]:
    """Metrics per stage (BASE → SFT → RL): the rows are the SUMMARY_KEYS any stage recorded."""
    values: dict[str, dict[str, object]] = {}
    labels: dict[str, str] = {}
    for s in sections:
        column = STAGE_COLUMNS.get(s["section"])
        if not column:
            continue
        for item in s["data"]:
            if not isinstance(item, dict):
                continue
            for key, value in item.items():
                base_key = key.split(" over ")[0] if key.startswith("CORE") else key
                if base_key in SUMMARY_KEYS:
                    labels[base_key] = key
                    values.setdefault(base_key, {})[column] = value
    if not values:
        return []
    rows = ["| Metric | BASE | SFT | RL |", "|---|---|---|---|"]
    for key in SUMMARY_KEYS:
        if key in values:
            cells = [_fmt(values[key].get(c, "-")) for c in ("BASE", "SFT", "RL")]
            rows.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    return rows


def system_info() -> list[str]:
    import torch
    from nanochat.checkpoint import git_commit
    info = [f"- Platform: {platform.platform()}", f"- Python: {platform.python_version()}, torch {torch.__version__}",
            f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            f"- git commit: {git_commit()}"]
    if torch.cuda.is_available():
        info.append(f"- GPUs: {torch.cuda.device_count()} × {torch.cuda.get_device_name()}")
    return info


def get_report() -> Report:
    return Report(get_base_dir() / "report")


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate or reset the report card.")
    parser.add_argument("command", choices=["generate", "reset"])
    args = parser.parse_args()
    report = get_report()
    if args.command == "reset":
        report.reset()
        print(f"report reset: {report.dir}")
    else:
        path = report.generate()
        print(f"report written: {path}")
        print("\n".join(summary_table(report.sections())))


if __name__ == "__main__":
    main()
