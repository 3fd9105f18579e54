"""Writing small dataset files for the data tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    """One JSON object per line; returns the path as a string (what data.source takes)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)
