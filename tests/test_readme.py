"""The README's Layout names every module of the package, and no module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_layout_names_every_module_and_only_those() -> None:
    text = (ROOT / "README.md").read_text()
    layout = text.split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"\b([_a-z]+\.py)\b", layout))
    modules = {p.name for p in (ROOT / "sharedpool").rglob("*.py")}
    assert modules - named == set(), "modules the README's Layout does not name"
    assert named - modules == set(), "the README's Layout names modules that are gone"
