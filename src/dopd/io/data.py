"""Examples with privileged context: loading, privileged prompts, and prompt tokenization.

A dataset row has ``prompt`` (a string or a chat message list), ``privileged_context`` (a string)
and an optional ``answer``. The student sees ``prompt``; the privileged views see
``privileged_template`` filled with both (for chat prompts, only the last user turn changes).
Both prompts go through one tokenization function with the same chat-template kwargs, so the two
views differ only where the privileged context is, never in template or special-token handling
(docs/method.md §9).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dopd.errors import ConfigError, DataError, quote

Messages = list[dict[str, str]]
Prompt = str | Messages

DEFAULT_PRIVILEGED_TEMPLATE = "{prompt}\n\n{privileged_context}"
TEMPLATE_FIELDS = ("prompt", "privileged_context")
# apply_chat_template arguments tokenize_prompt sets itself; a config must not override them.
RESERVED_CHAT_KWARGS = ("tokenize", "add_generation_prompt", "return_dict")
ROW_FIX = 'each row needs "prompt" (string or chat message list) and "privileged_context" (string)'
READERS_HELP = ".jsonl, .json (a list of objects) or .parquet file, or a datasets name or folder"


@dataclass(frozen=True)
class Example:
    """One task input with its privileged context and, for evaluation, its reference answer."""

    prompt: Prompt
    privileged_context: str
    answer: str | None = None


# ---------------------------------------------------------------------------------------------
# Loading


def load_examples(source: str) -> list[Example]:
    """Read examples from a .jsonl, .json (list of objects) or .parquet file, or a ``datasets``
    dataset name or path (``"name"`` loads split ``train``, ``"name:split"`` another split).

    Raises ``DataError`` naming the file and line (or row) of the first bad row.
    """
    suffix = Path(source).suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if suffix not in readers and Path(source).is_file():
        raise DataError(
            f"{source}: unsupported file type {suffix or '(none)'!r}; fix: give a {READERS_HELP}"
        )
    rows = readers.get(suffix, _read_dataset)(source)
    if not rows:
        raise DataError(f"{source}: no examples found; fix: add at least one row ({ROW_FIX})")
    return [example_from_row(row, where) for where, row in rows]


def example_from_row(row: Any, where: str) -> Example:
    """Validate one decoded row; ``where`` (e.g. ``"data.jsonl:7"``) prefixes every error."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}; fix: {ROW_FIX}")
    for field in ("prompt", "privileged_context"):
        if field not in row:
            raise DataError(f"{where}: missing field {field!r}; fix: {ROW_FIX}")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        _require_text(prompt, "prompt", where)
    else:
        _check_messages(prompt, where)
    _require_text(row["privileged_context"], "privileged_context", where)
    answer = row.get("answer")
    if answer is not None:
        _require_text(answer, "answer", where)
    return Example(prompt=prompt, privileged_context=row["privileged_context"], answer=answer)


def _require_text(value: Any, field: str, where: str) -> None:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: {field}={quote(value)} has type {type(value).__name__}; "
            "fix: write it as a JSON string"
        )
    if not value.strip():
        raise DataError(f"{where}: {field} is empty; fix: give it non-blank text or drop the row")
    _require_unicode(value, field, where)


def _require_unicode(value: str, field: str, where: str) -> None:
    """Refuse lone surrogates (JSON allows the escape ``\\ud800``): no tokenizer can encode them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = value[error.start : error.end]
        raise DataError(
            f"{where}: {field} holds the unpaired surrogate {bad!r} at character {error.start}, "
            "which is not text; fix: remove it or escape a whole surrogate pair"
        ) from None


def _check_messages(messages: Any, where: str) -> None:
    """A chat prompt is a non-empty list of {"role", "content"} strings with a user turn."""
    fix = 'write the prompt as [{"role": "user", "content": "..."}, ...]'
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: prompt={quote(messages)} is neither text nor a message list; fix: {fix}"
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not all(
            isinstance(message.get(key), str) for key in ("role", "content")
        ):
            raise DataError(
                f"{where}: prompt[{index}]={quote(message)} lacks string role/content; fix: {fix}"
            )
        for key in ("role", "content"):
            _require_unicode(message[key], f"prompt[{index}].{key}", where)
    user_turns = [message for message in messages if message["role"] == "user"]
    if not user_turns:
        raise DataError(
            f"{where}: prompt has no user turn to hold the privileged context; fix: {fix}"
        )
    _require_text(user_turns[-1]["content"], "content of the last user turn", where)


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


def _read_dataset(source: str) -> list[tuple[str, Any]]:
    """A Hugging Face ``datasets`` dataset: a hub name or a local dataset directory."""
    import datasets

    name, _, split = source.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except (OSError, ValueError) as error:  # unknown name or path (offline included), unknown split
        raise DataError(
            f"{source}: cannot load as a dataset ({type(error).__name__}: {error}); fix: give a "
            ".jsonl/.json/.parquet file or a datasets name or path, optionally as name:split"
        ) from None
    return [(f"{source} row {index}", record) for index, record in enumerate(dataset)]


# ---------------------------------------------------------------------------------------------
# Privileged prompts


def check_privileged_template(template: str) -> None:
    """Raise ``ConfigError`` unless ``template`` is a format string using exactly ``{prompt}``
    and ``{privileged_context}``, each plain: no conversion (``!r``) and no format spec (``:>9``),
    so filling it with any two strings cannot fail."""
    try:
        template.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConfigError(
            f"privileged_template={quote(template)} holds the unpaired surrogate "
            f"{template[error.start : error.end]!r}, which is not text; fix: remove it"
        ) from None
    try:
        parsed = [field for field in string.Formatter().parse(template) if field[1] is not None]
    except ValueError as error:
        raise ConfigError(
            f"privileged_template={quote(template)} is not a format string ({error}); "
            "write literal braces as {{ and }}"
        ) from None
    names = {name for _, name, _, _ in parsed}
    if names != set(TEMPLATE_FIELDS):
        raise ConfigError(
            f"privileged_template={quote(template)} uses fields {quote(sorted(names))}; "
            "it must use exactly {prompt} and {privileged_context}"
        )
    for _, name, spec, conversion in parsed:
        if spec or conversion:
            written = (
                "{"
                + name
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            raise ConfigError(
                f"privileged_template={quote(template)} writes {quote(written)}; "
                f"write plain {{{name}}} (no conversion or format spec)"
            )


def privileged_prompt(example: Example, template: str = DEFAULT_PRIVILEGED_TEMPLATE) -> Prompt:
    """The prompt the privileged views see: ``template`` filled with the prompt and context.

    For a chat prompt, a copy of the messages in which only the content of the last user turn is
    replaced by the filled template; ``example`` is never modified.
    """
    check_privileged_template(template)
    context = example.privileged_context
    if isinstance(example.prompt, str):
        return template.format(prompt=example.prompt, privileged_context=context)
    messages = [dict(message) for message in example.prompt]
    last_user = max(index for index, message in enumerate(messages) if message["role"] == "user")
    content = messages[last_user]["content"]
    messages[last_user]["content"] = template.format(prompt=content, privileged_context=context)
    return messages


def privileged_examples(examples: list[Example], template: str) -> list[Example]:
    """``examples`` with each prompt replaced by its privileged version."""
    return [replace(example, prompt=privileged_prompt(example, template)) for example in examples]


# ---------------------------------------------------------------------------------------------
# Tokenization


def tokenize_prompt(
    prompt: Prompt, tokenizer: Any, chat_template_kwargs: dict | None = None
) -> list[int]:
    """Token ids of one prompt, ready for generation (a chat prompt ends with the assistant header).

    A string prompt is encoded with ``add_special_tokens=True``; a chat prompt goes through
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True, **chat_template_kwargs)``.
    Either way the result starts with at most one BOS.
    """
    kwargs = dict(chat_template_kwargs or {})
    reserved = sorted(set(kwargs) & set(RESERVED_CHAT_KWARGS))
    if reserved:
        raise ConfigError(
            f"chat_template_kwargs sets {reserved}; remove them, dopd sets them itself"
        )
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    elif tokenizer.chat_template is None:
        raise DataError(
            "a prompt is a chat message list but the tokenizer has no chat_template; "
            "fix: use a tokenizer with a chat template or write prompts as text"
        )
    else:
        # return_dict=False: transformers 5 returns a BatchEncoding by default, 4.x a list.
        ids = tokenizer.apply_chat_template(
            prompt, tokenize=True, add_generation_prompt=True, return_dict=False, **kwargs
        )
    return _drop_repeated_bos(list(ids), tokenizer.bos_token_id)


def _drop_repeated_bos(ids: list[int], bos_token_id: int | None) -> list[int]:
    """Keep one leading BOS when both the text (or template) and the tokenizer supplied one."""
    start = 0
    while bos_token_id is not None and ids[start : start + 2] == [bos_token_id, bos_token_id]:
        start += 1
    return ids[start:]


def tokenize_views(
    examples: list[Example],
    tokenizer: Any,
    template: str = DEFAULT_PRIVILEGED_TEMPLATE,
    chat_template_kwargs: dict | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Plain and privileged prompt ids of every example, tokenized by the same function and kwargs.

    Returns:
        (plain_ids, privileged_ids): two lists of ``len(examples)`` unpadded id lists.
    """
    plain_ids = [
        tokenize_prompt(example.prompt, tokenizer, chat_template_kwargs) for example in examples
    ]
    privileged_ids = [
        tokenize_prompt(example.prompt, tokenizer, chat_template_kwargs)
        for example in privileged_examples(examples, template)
    ]
    return plain_ids, privileged_ids
