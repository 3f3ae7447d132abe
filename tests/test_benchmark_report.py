"""``make benchmark`` replaces the measured sections of docs/PERFORMANCE.md and keeps the rest."""

from __future__ import annotations

from benchmarks.run_all import ROOT, merge_sections

DOCUMENT = """# Performance

Old preamble.

## Voice (Kokoro)

old voice table

### Kokoro tuning (what was measured)

hand-written tuning notes

## Overload and robustness

overload run, its own script
"""


def test_measured_sections_replace_their_namesakes_and_the_rest_stays() -> None:
    merged = merge_sections(DOCUMENT, "# Performance\n\nNew preamble.",
                            ["## Voice (Kokoro)\n\nnew voice table\n", "## CSM\n\ncsm table\n"])
    assert merged.startswith("# Performance\n\nNew preamble.\n\n## Voice (Kokoro)\n\nnew voice")
    assert "old voice table" not in merged and "Old preamble" not in merged
    for kept in ("hand-written tuning notes", "overload run, its own script"):
        assert merged.count(kept) == 1
    assert merged.index("new voice table") < merged.index("tuning notes") < merged.index(
        "overload run") < merged.index("csm table")


def test_merging_the_current_report_with_nothing_measured_keeps_every_section() -> None:
    document = (ROOT / "docs/PERFORMANCE.md").read_text()
    preamble = document.split("\n## ", 1)[0]
    assert merge_sections(document, preamble, []) == document
