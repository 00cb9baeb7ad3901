"""Write docs/models.md's family x verb table from the coverage tests themselves (tests/test_families.py:
FAMILY_ROWS and VERBS, which its tests run), so the table says exactly what the tests cover.

The table lives between two marker comments in docs/models.md; tests/test_families.py fails when it is stale.
Run: python scripts/models_table.py   (rewrites docs/models.md in place; --check: exit 1 when stale;
--file PATH: another copy of the page instead of docs/models.md)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "models.md"
BEGIN, END = "<!-- families-table:begin -->", "<!-- families-table:end -->"


def table() -> str:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from test_families import docs_table

    return docs_table()


def render(text: str) -> str:
    """`text` with the generated table between the markers."""
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str]) -> int:
    page = Path(argv[argv.index("--file") + 1]) if "--file" in argv else DOCS
    text = page.read_text()
    fresh = render(text)
    if "--check" in argv:
        print(f"the family table in {page} is {'current' if fresh == text else 'stale'}")
        return 0 if fresh == text else 1
    page.write_text(fresh)
    print(f"wrote the family table in {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
