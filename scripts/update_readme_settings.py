"""Regenerate the settings table in README.md from moderation/config.py."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from moderation.config import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def main() -> int:
    """Rewrite the table between the markers; exit 1 with --check when it is stale."""
    text = README.read_text()
    fresh = re.sub(
        re.escape(BEGIN) + r".*?" + re.escape(END), f"{BEGIN}\n{settings_table()}\n{END}", text, flags=re.S
    )
    if "--check" in sys.argv:
        return 0 if fresh == text else 1
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
