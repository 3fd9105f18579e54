"""Dataset rows as users have them: a local .jsonl/.json/.parquet file, a local dataset folder, or a hub
dataset (online or from the Hugging Face cache), read with `datasets`; and values inside nested columns
(verl's `reward_model.ground_truth`) by dotted path."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from icepop.data.tasks import TASKS

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_rows(source: str, split: str = "train", subset: str | None = None) -> Any:  # -> datasets.Dataset
    """A `datasets.Dataset` from a local .jsonl/.json/.parquet file, a local dataset folder (its README's
    `configs:` name the subsets), or a hub name "org/name" (online, or in the Hugging Face cache).
    ValueError/FileNotFoundError say what is wrong and what would be right."""
    import datasets

    path = Path(source)
    file_format = FILE_FORMATS.get(path.suffix)
    if file_format is not None:
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {source!r} does not exist")
        return datasets.load_dataset(file_format, data_files=str(path), split="train")
    if path.is_file():
        raise ValueError(f"dataset file {source!r} must end in one of {', '.join(FILE_FORMATS)}")
    if not path.is_dir() and source.count("/") != 1:
        guess = difflib.get_close_matches(source, TASKS, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise ValueError(
            f"{source!r} is neither a built-in task ({', '.join(TASKS)}), a local file or folder, nor a hub "
            f"dataset named 'org/name'{hint}"
        )
    if not path.is_dir():
        snapshot = _hub_snapshot(source)  # offline, a dataset downloaded into the hub cache still loads
        path = Path(snapshot) if snapshot is not None else path
    # A local folder is read again every time: datasets' cache keys it by its name alone and would
    # serve the rows it saw first after the files changed.
    fresh = {"download_mode": "force_redownload", "verification_mode": "no_checks"} if path.is_dir() else {}
    try:
        return datasets.load_dataset(str(path) if path.is_dir() else source, subset, split=split, **fresh)
    except (ValueError, FileNotFoundError, OSError, ConnectionError) as error:
        where = "local folder" if Path(source).is_dir() else "hub dataset"
        if "Config name is missing" in str(error):  # a multi-config dataset
            raise ValueError(
                f"{where} {source!r} has several subsets; name one with data.subset: "
                f"{_first_lines(str(error), 2)}"
            ) from error
        raise ValueError(
            f"{where} {source!r} (subset {subset!r}, split {split!r}) could not be loaded: "
            f"{_first_lines(str(error))}"
        ) from error


def _hub_snapshot(repo_id: str) -> str | None:
    """The folder of a hub dataset in the local Hugging Face cache (`hf download --repo-type dataset`
    puts it there) when the hub cannot be reached (HF_HUB_OFFLINE=1, an air-gapped cluster); None
    otherwise, and then `datasets` fetches it (or uses its own cache) as usual."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not constants.HF_HUB_OFFLINE:
        return None
    try:
        return snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except LocalEntryNotFoundError:  # not in the cache: datasets' own error then says so
        return None


def _first_lines(text: str, lines: int = 3) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines()[:lines])


CHAT_FIELD = "messages"
"""The column of chat rows (Hugging Face's conversational layout): used as the prompt when the data has
no `prompt_field` column; a trailing assistant message (the row's reference reply) is left out."""


def field_value(row: dict[str, Any], path: str, index: int) -> Any:
    """`row`'s value at `path`: a column, or a dotted path into a nested one (verl's
    "reward_model.ground_truth"); ValueError naming the row and the missing key."""
    value: Any = row
    for depth, key in enumerate(path.split(".")):
        if not isinstance(value, dict) or key not in value:
            where = ".".join(path.split(".")[:depth]) or "the row"
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"row {index}: {path!r}: {where} has no key {key!r} ({keys})")
        value = value[key]
    return value
