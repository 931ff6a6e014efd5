"""Rows from files and datasets, each with the place it came from, for ``dopd.io.data``.

``read_rows(source)`` reads a .jsonl file (one object per line), a .json file (a list of
objects), a .parquet file, or anything else through ``datasets.load_dataset`` (``"name"``,
``"name:split"``, a local dataset folder). Each row comes with its place for error messages:
``file.jsonl:LINE``, ``file.json:LINE (item i)``, ``file.parquet: row i``, ``name row i``.
Files that cannot be read are ``DataError``s naming the file (and line) and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dopd.errors import DataError

READERS_HELP = ".jsonl, .json (a list of objects) or .parquet file, or a datasets name or folder"


def read_rows(source: str, subset: str | None = None) -> list[tuple[str, Any]]:
    """``(place, decoded row)`` of every row of ``source``; ``subset`` is a dataset's
    configuration name (files ignore it)."""
    suffix = Path(source).suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if suffix not in readers and Path(source).is_file():
        raise DataError(
            f"{source}: unsupported file type {suffix or '(none)'!r}; fix: give a {READERS_HELP}"
        )
    if suffix in readers:
        return readers[suffix](source)
    return _read_dataset(source, subset)


def _require_file(path: str) -> Path:
    file = Path(path)
    if file.is_dir():
        raise DataError(f"{path}: is a directory, not a data file; fix: give a {READERS_HELP}")
    if not file.is_file():
        raise DataError(f"{path}: no such file; fix: check the data path")
    return file


def _read_text(path: str) -> str:
    try:
        raw = _require_file(path).read_bytes()
    except OSError as error:  # e.g. no read permission
        raise DataError(
            f"{path}: cannot read ({error.strerror or error}); fix: check its permissions"
        ) from None
    try:
        # utf-8-sig: a byte-order mark (editors on Windows write one) is not part of the JSON.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8; fix: re-encode the file as UTF-8"
        ) from None


def _read_jsonl(path: str) -> list[tuple[str, Any]]:
    rows = []
    # split("\n"), not splitlines(): JSON strings may legally hold U+2028 and similar breaks.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{number}: invalid JSON ({error.msg}, column {error.colno}); "
                "fix: write exactly one JSON object per line"
            ) from None
        except RecursionError:
            raise _too_deep(f"{path}:{number}") from None
    return rows


def _read_json(path: str) -> list[tuple[str, Any]]:
    text = _read_text(path)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: invalid JSON ({error.msg}); fix: correct the syntax"
        ) from None
    except RecursionError:
        raise _too_deep(path) from None
    if not isinstance(items, list):
        raise DataError(
            f"{path}: top level is a {type(items).__name__}; fix: make it a list of objects"
        )
    lines = _array_item_lines(text)
    return [
        (f"{path}:{line} (item {index})", item)
        for index, (line, item) in enumerate(zip(lines, items))
    ]


def _too_deep(where: str) -> DataError:
    # json.loads recurses once per nesting level; Python's recursion limit ends it first.
    return DataError(f"{where}: JSON nested too deeply to read; fix: flatten the row")


def _array_item_lines(text: str) -> list[int]:
    """The 1-based line on which each element of a valid top-level JSON array starts."""
    decoder = json.JSONDecoder()
    lines, position = [], text.index("[") + 1
    while True:
        while text[position] in " \t\r\n,":
            position += 1
        if text[position] == "]":
            return lines
        lines.append(text.count("\n", 0, position) + 1)
        position = decoder.raw_decode(text, position)[1]


def _read_parquet(path: str) -> list[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        records = pyarrow.parquet.read_table(_require_file(path)).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error}); fix: rewrite it") from None
    return [(f"{path}: row {index}", record) for index, record in enumerate(records)]


def _read_dataset(source: str, subset: str | None = None) -> list[tuple[str, Any]]:
    """A Hugging Face ``datasets`` dataset: a hub name or a local dataset directory, with its
    configuration ``subset`` (``None``: the default one)."""
    import datasets

    name, _, split = source.partition(":")
    try:
        dataset = datasets.load_dataset(name, subset, split=split or "train")
    except (OSError, ValueError) as error:  # unknown name, path, subset (offline included), split
        raise DataError(
            f"{source}: cannot load as a dataset"
            + (f" (subset {subset!r})" if subset else "")
            + f" ({type(error).__name__}: {error}); fix: give a .jsonl/.json/.parquet file or a "
            "datasets name or path, optionally as name:split, and an existing data.subset"
        ) from None
    return [(f"{source} row {index}", record) for index, record in enumerate(dataset)]
