"""The report card: sections recorded by stages become report.md with a metrics table and plot files, kept per model
and per run so that two runs in one base directory never mix."""

from nanochat.report import get_report


def test_generate_writes_markdown_table_and_plots(base_dir):
    report = get_report("d2")
    report.reset()
    curve = [[s, s * 1e9, 5.0 - s * 0.1] for s in range(1, 11)]
    report.log("Base model training", [{"val_bpb": 1.5, "steps": 10}], curves={"train_loss": curve,
                                                                           "val_bpb": [[10, 1e10, 1.5]]})
    report.log("Base model evaluation", [{"CORE over 21/22 tasks": 0.05}])
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.3, "GSM8K": 0.01}])
    report.log("Chat evaluation rl", [{"GSM8K": 0.04}])
    path = report.generate()
    assert path == base_dir / "report" / "d2" / "report.md"
    text = path.read_text()
    assert "| Metric | Chance | BASE | SFT | RL |" in text
    assert "| CORE over 21/22 tasks | - | 0.0500 | - | - |" in text
    assert "| GSM8K | - | - | 0.0100 | 0.0400 |" in text
    plots = sorted(p.name for p in (base_dir / "report" / "d2").glob("*.png"))
    assert plots == ["base-model-training-flops.png", "base-model-training-step.png"]
    assert all((base_dir / "report" / "d2" / p).stat().st_size > 1000 for p in plots)
    assert "![base-model-training-step](base-model-training-step.png)" in text
    overall = get_report().generate().read_text()
    assert "# Model d2" in overall and "![base-model-training-step](d2/base-model-training-step.png)" in overall


def test_sections_are_filed_under_the_model_tag_they_name(base_dir):
    report = get_report()
    report.log("Tokenizer training", [{"vocab_size": 1024}])
    report.log("Base model training", [{"model_tag": "d2", "val_bpb": 1.5}])
    report.log("Base model training", [{"model_tag": "d4", "val_bpb": 1.1}])
    d2, d4 = get_report("d2").sections(), get_report("d4").sections()
    assert [s["section"] for s in d2] == ["Tokenizer training", "Base model training"]
    assert d2[1]["data"][0]["val_bpb"] == 1.5 and d4[1]["data"][0]["val_bpb"] == 1.1
    text = report.generate().read_text()
    assert "# Model d2" in text and "# Model d4" in text
    assert "| val_bpb | - | 1.5000 | - | - |" in (base_dir / "report" / "d2" / "report.md").read_text()
    assert "1.1000" not in (base_dir / "report" / "d2" / "report.md").read_text()


def test_a_new_model_supersedes_what_was_measured_on_the_previous_one(base_dir):
    report = get_report("d2")
    report.log("Base model training", [{"val_bpb": 1.5}])
    report.log("Base model evaluation", [{"CORE": 0.1}])
    report.log("Chat SFT", [{"val_loss": 2.0}])
    report.log("Chat SFT", [{"val_loss": 1.9}])  # a second SFT run keeps the base sections
    assert [s["section"] for s in report.sections()] == ["Base model training", "Base model evaluation", "Chat SFT"]
    report.log("Base model training", [{"val_bpb": 1.4}])  # a new pretraining run under the same tag
    assert [s["section"] for s in report.sections()] == ["Base model training"]
    archived = sorted(p.name for p in (base_dir / "report" / "d2" / "superseded").rglob("*.json"))
    assert archived == ["base-model-evaluation.json", "chat-sft.json"]


def test_logging_a_section_again_replaces_it_and_reset_clears(base_dir):
    report = get_report("d2")
    report.log("Chat evaluation sft", [{"GSM8K": 0.1}])
    report.log("Chat evaluation sft", [{"GSM8K": 0.2}])
    assert [s["data"][0]["GSM8K"] for s in report.sections()] == [0.2]
    report.reset()
    assert report.sections() == []


def test_the_summary_shows_chance_levels_and_one_val_bpb_per_stage_with_tokens_and_dataset(base_dir):
    report = get_report("d2")
    report.log("Base model training", [{"model_tag": "d2", "val_bpb": 1.6663, "val_bpb_tokens": 65536,
                                        "dataset": "karpathy/fineweb-edu-100b-shuffle"}])
    report.log("Base model evaluation", [{"model_tag": "d2", "val_bpb": 1.634, "val_bpb_tokens": 20_971_520,
                                          "dataset": "karpathy/fineweb-edu-100b-shuffle", "CORE": 0.1,
                                          "chance": {"CORE": 0.0}}])
    report.log("Chat evaluation sft", [{"model_tag": "d2", "ARC-Easy": 0.3, "SpellingBee": 0.5,
                                        "chance": {"ARC-Easy": 0.25, "SpellingBee": 0.0}}])
    text = report.generate().read_text()
    table = text[text.index("| Metric"):text.index("## Base model training")]
    assert "| val_bpb | - | 1.6340 (21.0M tokens) | - | - |" in table and "1.6663" not in table
    assert "val bpb measured on: BASE karpathy/fineweb-edu-100b-shuffle" in table
    assert "| CORE | 0.0000 | 0.1000 | - | - |" in table
    assert "| ARC-Easy | 0.2500 | - | 0.3000 | - |" in table and "| SpellingBee | 0.0000 | - | 0.5000 | - |" in table
