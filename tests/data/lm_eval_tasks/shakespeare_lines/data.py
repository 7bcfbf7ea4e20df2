"""The task's documents, from lines.jsonl beside this file (whatever the working directory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LINES = Path(__file__).with_name("lines.jsonl")


def load(**_: Any) -> dict[str, Any]:
    """{"test": the documents} as a datasets.Dataset (lm-eval's custom_dataset hook)."""
    import datasets

    rows = [json.loads(line) for line in LINES.read_text("utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}
