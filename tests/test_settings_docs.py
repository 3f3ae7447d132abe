"""The README's configuration table lists every setting with its default."""

from __future__ import annotations

import re
from pathlib import Path

from handler.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_table_matches_settings() -> None:
    rows = dict(re.findall(r"^\| `(CONVERSE_[A-Z0-9_]+)` \| ([^|]+) \|", README.read_text(), re.M))
    expected = {f"CONVERSE_{name.upper()}": field.get_default(call_default_factory=True)
                for name, field in
                Settings.model_fields.items()}
    assert set(rows) == set(expected)
    for variable, default in expected.items():
        shown = rows[variable].strip()
        written = ("(empty)" if default == "" else "(unset)" if default is None
                   else f"`{default}`")
        assert shown == written, variable
