"""Packaging hygiene: every runtime dependency is used, torch's requirement matches what runs/setup.sh installs,
the license ships, and the `nanochat` console command dispatches to the same stages as `python -m`."""

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")
IMPORT_NAMES = {"pyyaml": "yaml"}  # distributions whose module has another name


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement_name(spec: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()


def test_every_runtime_dependency_is_imported_by_the_code():
    sources = "\n".join(p.read_text() for d in ("nanochat", "scripts", "tasks") for p in (REPO / d).rglob("*.py"))
    for spec in project()["dependencies"]:
        module = IMPORT_NAMES.get(requirement_name(spec), requirement_name(spec))
        assert re.search(rf"^\s*(import|from) {module}\b", sources, re.M), f"{spec} is a dependency nothing imports"


def test_torch_requirement_admits_the_version_setup_installs():
    from packaging.specifiers import SpecifierSet
    installed = re.search(r'TORCH_VERSION="\$\{TORCH_VERSION:-([0-9.]+)\}"', (REPO / "runs/setup.sh").read_text())
    torch_spec = next(s for s in project()["dependencies"] if requirement_name(s) == "torch")
    assert installed, "runs/setup.sh no longer names a default TORCH_VERSION"
    assert installed.group(1) in SpecifierSet(torch_spec.removeprefix("torch")), (torch_spec, installed.group(1))
    minimum = re.search(r">=([0-9.]+)", torch_spec).group(1)
    assert installed.group(1).startswith(minimum), "setup.sh installs a newer torch than pyproject requires: raise it"


def test_the_license_is_mit_and_packaged():
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert project()["license"] == "MIT" and project()["license-files"] == ["LICENSE"]


def test_console_command_dispatches_to_the_stage(base_dir, monkeypatch, capsys):
    from nanochat.report import get_report
    from scripts import cli
    get_report("d2").log("Base model training", [{"val_bpb": 1.5}])
    monkeypatch.setattr(sys, "argv", ["nanochat", "report", "generate"])
    cli.main()
    assert "report written" in capsys.readouterr().out and (base_dir / "report" / "d2" / "report.md").exists()
    monkeypatch.setattr(sys, "argv", ["nanochat", "train-everything"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2 and "unknown command" in capsys.readouterr().err
    assert project()["scripts"]["nanochat"] == "scripts.cli:main"


def test_every_stage_shows_its_defaults_in_help(monkeypatch, capsys):
    from scripts import cli
    for name in cli.COMMANDS:
        monkeypatch.setattr(sys, "argv", ["nanochat", name, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and "usage:" in out, name
        assert "(default:" in out, f"nanochat {name} --help does not show its defaults"
