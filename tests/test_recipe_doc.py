"""docs/recipe.md, the list of differences from the reference design, stays inside the repository and keeps the
figures behind its known differences."""

import re
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"


def test_recipe_points_only_at_files_inside_the_repository():
    text = RECIPE.read_text()
    assert "../" not in text and "/work/" not in text
    for path in re.findall(r"`((?:nanochat|scripts|runs|bench|tests|tasks)/[\w/.]+\.(?:py|sh))", text):
        assert (RECIPE.parents[1] / path).exists(), path


def test_the_python_tools_arithmetic_output_is_a_known_difference_with_its_counts():
    row = next(line for line in RECIPE.read_text().splitlines() if line.startswith("| Python tool"))
    assert all(figure in row for figure in ("`48/2` → `24.0`", "`48/2` → `24`", "24.5%", "23,716", "689", "6,348"))
