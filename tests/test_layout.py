"""The layout shows the architecture: the core of `nanochat/` is flat and never imports the peripheral subsystems
(serving, the Hugging Face export) or the report card, and light modules stay light to import."""

import ast
import re
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


def module_imports(path: Path) -> set[str]:
    """The project modules `path` imports, named as docs/architecture.md names them (`engine`, `sandbox.execution`,
    `tasks`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            top, _, rest = node.module.partition(".")
            if top == "tasks":
                found.add("tasks")
            elif top == "nanochat":
                for alias in node.names:
                    dotted = f"{rest}.{alias.name}" if rest else alias.name
                    is_module = (REPO / "nanochat" / (dotted.replace(".", "/") + ".py")).exists()
                    found.add(dotted if is_module else rest)
    return found


def test_the_module_map_lists_every_module_with_its_imports():
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text[text.index("## The module map"):].split("\n## ")[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    listed = set()
    for first, _, imports in rows:
        package, _, names = first.removeprefix("| ").rpartition(": ") if ": " in first else ("", "", first[2:])
        package = package.strip("`/")
        modules = [f"{package}.{n}" if package else n for n in re.findall(r"`([a-z_0-9]+)`", names)]
        if package == "" and "tasks/*" in names:
            modules = ["tasks"]
        documented = set() if imports.strip(" |") == "—" else {i.strip() for i in imports.strip(" |").split(",")}
        actual = set()
        for module in modules:
            paths = ([p for p in (REPO / "tasks").glob("*.py") if p.stem != "__init__"] if module == "tasks" else
                     [REPO / "nanochat" / (module.replace(".", "/") + ".py")])
            assert all(p.exists() for p in paths), f"docs/architecture.md lists {module}, which does not exist"
            for p in paths:
                actual |= module_imports(p)
        actual -= set(modules) | {"", "sandbox", "serving", "hf_export"}
        actual = {m for m in actual if not m.startswith("hf_export.hf_code")}
        assert documented == actual, f"the module map's row for {modules} says it imports {sorted(documented)}, " \
                                     f"the code imports {sorted(actual)}"
        listed |= set(modules)
    every = {str(p.relative_to(REPO / "nanochat").with_suffix("")).replace("/", ".")
             for p in (REPO / "nanochat").rglob("*.py") if p.stem != "__init__" and "hf_code" not in p.parts}
    assert every <= listed, f"modules missing from docs/architecture.md's module map: {sorted(every - listed)}"


def test_no_import_cycles_in_the_library():
    graph = {}
    for path in (REPO / "nanochat").rglob("*.py"):
        if path.stem == "__init__" or "hf_code" in path.parts:
            continue
        name = str(path.relative_to(REPO / "nanochat").with_suffix("")).replace("/", ".")
        graph[name] = {m for m in module_imports(path) if m and m != name}

    def visit(node, trail):
        if node in trail:
            raise AssertionError(f"import cycle: {' -> '.join(trail[trail.index(node):] + [node])}")
        for nxt in graph.get(node, ()):
            visit(nxt, trail + [node])

    for node in graph:
        visit(node, [])
