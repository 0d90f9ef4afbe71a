"""Datasets of the zoo's local lm-eval tasks (`custom_dataset` functions; lm-eval passes them the run's metadata,
`--metadata` merged with `--model_args`, as keyword arguments). Nothing here reads the Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset

from training.data import read_documents

HELDOUT_HINT = ("pass --heldout_file FILE to `python -m benchmarks.lm_eval` (or --metadata "
                "'{\"heldout_file\": \"FILE\"}' to lm_eval)")


def heldout_documents(heldout_file: str | None = None, heldout_doc_separator: str = "auto",
                      heldout_text_column: str | None = None, **_: Any) -> dict[str, Dataset]:
    """The `test` split of `zoo_heldout`: the documents of `heldout_file`, one `text` row each."""
    if not heldout_file:
        raise ValueError(f"zoo_heldout needs a held-out text file: {HELDOUT_HINT}")
    documents = read_documents(str(heldout_file), heldout_doc_separator, heldout_text_column)
    return {"test": Dataset.from_dict({"text": documents})}


def story_choice(**_: Any) -> dict[str, Dataset]:
    """The `test` split of `zoo_story_choice`: `context`, `choices` (three endings) and `label` (the right one)."""
    path = Path(__file__).with_name("zoo_story_choice.jsonl")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": Dataset.from_list(records)}
