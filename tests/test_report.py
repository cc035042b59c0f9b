"""The report card: sections recorded by stages become report.md with a metrics table and plot files."""

from nanochat.report import get_report


def test_generate_writes_markdown_table_and_plots(base_dir):
    report = get_report()
    report.reset()
    curve = [[s, s * 1e9, 5.0 - s * 0.1] for s in range(1, 11)]
    report.log("Base model training", [{"val_bpb": 1.5, "steps": 10}], curves={"train_loss": curve,
                                                                           "val_bpb": [[10, 1e10, 1.5]]})
    report.log("Base model evaluation", [{"CORE over 21/22 tasks": 0.05}])
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.3, "GSM8K": 0.01}])
    report.log("Chat evaluation rl", [{"GSM8K": 0.04}])
    path = report.generate()
    text = path.read_text()
    assert "| Metric | BASE | SFT | RL |" in text
    assert "| CORE over 21/22 tasks | 0.0500 | - | - |" in text
    assert "| GSM8K | - | 0.0100 | 0.0400 |" in text
    plots = sorted(p.name for p in base_dir.joinpath("report").glob("*.png"))
    assert plots == ["base-model-training-flops.png", "base-model-training-step.png"]
    assert all((base_dir / "report" / p).stat().st_size > 1000 for p in plots)
    assert "![base-model-training-step](base-model-training-step.png)" in text


def test_logging_a_section_again_replaces_it_and_reset_clears(base_dir):
    report = get_report()
    report.log("Chat SFT", [{"val_loss": 2.0}])
    report.log("Chat SFT", [{"val_loss": 1.0}])
    assert [s["data"][0]["val_loss"] for s in report.sections()] == [1.0]
    report.reset()
    assert report.sections() == []
