"""Training data: local JSONL / JSON / CSV files of chat, prompt/completion or plain-text records.

Record shapes (one per record; a file may mix them):

* ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}``:
  rendered with the model's chat template; the loss is on the assistant turns only.
* ``{"prompt": ..., "completion": ...}``: the loss is on the completion only.
* ``{"text": ...}``: the loss is on every token.

A ``.json`` file holds a list of records, or an object of splits (``{"train": [...],
"test": [...]}``, chosen by ``dataset_split``). In a CSV file a ``messages`` cell is JSON.
This module is plain Python (the server validates a dataset with it before starting a job);
tokenization needs a tokenizer and happens in the job.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from inferd.errors import InvalidArgument

FORMATS = (".jsonl", ".json", ".csv")
KINDS = ("messages", "prompt_completion", "text")
MAX_RECORD_ERRORS = 3


def load_records(path: Path, split: str = "", field: str = "dataset_source") -> list[dict[str, Any]]:
    """Every record of the file (the ``split`` of a JSON object of splits)."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidArgument(f"{path.name}: unsupported file type {suffix or '(none)'}; "
                              f"use one of {', '.join(FORMATS)}", field)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if suffix == ".jsonl":
                records = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        records.append(_json(line, f"{path.name} line {n}", field))
            elif suffix == ".json":
                records = _select_split(_json(f.read(), path.name, field), split, field)
                split = ""
            else:
                records = [dict(row) for row in csv.DictReader(f)]
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path.name} is not UTF-8 text ({exc.reason})", field) from None
    except csv.Error as exc:
        raise InvalidArgument(f"{path.name}: malformed CSV: {exc}", field) from None
    if split not in ("", "train"):
        raise InvalidArgument(f"{path.name} has a single split ('train'), not {split!r}", "dataset_split")
    if not records:
        raise InvalidArgument(f"{path.name} holds no records", field)
    return records


def _json(text: str, where: str, field: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: invalid JSON: {exc}", field) from None


def _select_split(data: Any, split: str, field: str) -> list[dict[str, Any]]:
    if isinstance(data, list):
        if split not in ("", "train"):
            raise InvalidArgument(f"the file holds one list of records (split 'train'), not {split!r}",
                                  "dataset_split")
        return data
    if isinstance(data, dict):
        if any(k in data for k in ("messages", "prompt", "text")):
            return [data]
        name = split or "train"
        if isinstance(data.get(name), list):
            return data[name]
        raise InvalidArgument(f"no split {name!r} in the file; it has {', '.join(map(str, data)) or 'none'}",
                              "dataset_split")
    raise InvalidArgument("a .json dataset must hold a list of records or an object of splits", field)


def record_kind(record: Any, index: int, field: str = "dataset_source") -> str:
    """Which of ``KINDS`` a record is; InvalidArgument naming the record if none."""
    where = f"record {index}"
    if not isinstance(record, dict):
        raise InvalidArgument(f"{where} is a {type(record).__name__}, not an object", field)
    if record.get("messages") not in (None, ""):
        messages = record["messages"]
        if isinstance(messages, str):  # a CSV cell
            messages = _json(messages, f"{where} messages", field)
            record["messages"] = messages
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise InvalidArgument(f"{where}: messages must be a non-empty list of {{role, content}} strings", field)
        if not any(m["role"] == "assistant" for m in messages):
            raise InvalidArgument(f"{where}: messages has no assistant turn to learn from", field)
        return "messages"
    if "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str) \
                or not record["completion"]:
            raise InvalidArgument(f"{where}: prompt and completion must both be strings (completion non-empty)",
                                  field)
        return "prompt_completion"
    if isinstance(record.get("text"), str) and record["text"]:
        return "text"
    keys = ", ".join(map(str, record)) or "none"
    raise InvalidArgument(f"{where} has none of messages, prompt/completion, text (keys: {keys})", field)


def validate(path: Path, split: str = "") -> dict[str, int]:
    """Load and check every record; returns the count of each kind."""
    counts = dict.fromkeys(KINDS, 0)
    for i, record in enumerate(load_records(path, split)):
        counts[record_kind(record, i)] += 1
    return counts
