"""The layout shows the architecture: the core of `nanochat/` is flat and never imports the peripheral subsystems
(serving, the Hugging Face export) or the report card, and light modules stay light to import."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PERIPHERAL = ("nanochat.serving", "nanochat.hf_export", "nanochat.report")


def project_imports(path: Path) -> set[str]:
    """Every `nanochat.*` module that `path` imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanochat"):
            names.update(f"{node.module}.{a.name}" for a in node.names)
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("nanochat"))
    return names


def test_core_modules_never_import_serving_export_or_the_report():
    for path in sorted((REPO / "nanochat").glob("*.py")):
        if path.stem == "report":
            continue
        upward = [name for name in project_imports(path) if name.startswith(PERIPHERAL)]
        assert not upward, f"nanochat/{path.name} imports {upward}: the core must not depend on a leaf"


def test_the_library_never_imports_a_script_and_no_script_imports_another():
    for folder in ("nanochat", "tasks", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
            modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            assert not [m for m in modules if m.split(".")[0] == "scripts"], f"{path.relative_to(REPO)} imports a script"


def test_the_report_does_not_import_the_model():
    code = "import sys, nanochat.report; print(sorted(m for m in sys.modules if m.startswith('nanochat')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "nanochat.gpt" not in loaded and "nanochat.checkpoint" not in loaded, loaded
