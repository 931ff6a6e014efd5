"""Examples with privileged context: loading, privileged prompts, and prompt tokenization.

A dataset row has ``prompt`` (a string or a chat message list) or ``messages`` (a chat whose
turns after the last user turn are dropped), ``privileged_context`` (a string) and an optional
``answer``; ``columns`` maps each of these to the row's own column or a dotted path into nested
records (``reward_model.ground_truth``). The student sees ``prompt``; the privileged views see
``privileged_template`` filled with both (for chat prompts, only the last user turn changes), or a
``privileged_prompt`` column taken verbatim. Both prompts go through one tokenization function with
the same chat-template kwargs, so the two views differ only where the privileged context is, never
in template or special-token handling (docs/method.md §9).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from dopd.errors import ConfigError, DataError, quote
from dopd.io.readers import read_rows

Messages = list[dict[str, str]]
Prompt = str | Messages

DEFAULT_PRIVILEGED_TEMPLATE = "{prompt}\n\n{privileged_context}"
TEMPLATE_FIELDS = ("prompt", "privileged_context")
# The row fields dopd reads and the column each comes from unless data.columns says otherwise
# (privileged_prompt: none, the privileged prompt is built from privileged_template).
DEFAULT_COLUMNS: dict[str, str | None] = {
    "prompt": "prompt",
    "messages": "messages",
    "privileged_context": "privileged_context",
    "answer": "answer",
    "privileged_prompt": None,
}
# apply_chat_template arguments tokenize_prompt sets itself; a config must not override them.
RESERVED_CHAT_KWARGS = ("tokenize", "add_generation_prompt", "return_dict")
ROW_FIX = (
    'each row needs "prompt" (string or chat message list) or "messages" (chat), and '
    '"privileged_context" (string); data.columns maps other column names'
)


@dataclass(frozen=True)
class Example:
    """One task input with its privileged context and, for evaluation, its reference answer.

    ``privileged_prompt``, when set, is the privileged views' prompt verbatim (a chat prompt's
    last user turn when it is text and ``prompt`` is a chat), instead of ``privileged_template``
    filled with ``prompt`` and ``privileged_context``. Evaluation examples may have neither.
    """

    prompt: Prompt
    privileged_context: str | None = None
    answer: str | None = None
    privileged_prompt: Prompt | None = None

    @property
    def has_privilege(self) -> bool:
        """Whether a privileged prompt can be built: a context or a verbatim privileged prompt."""
        return self.privileged_context is not None or self.privileged_prompt is not None


# ---------------------------------------------------------------------------------------------
# Loading


def load_examples(
    source: str,
    columns: Mapping[str, str | None] | None = None,
    *,
    privileged: bool = True,
    answers: bool = False,
    subset: str | None = None,
) -> list[Example]:
    """Read examples from a .jsonl, .json (list of objects) or .parquet file, or a ``datasets``
    dataset name or path (``"name"`` loads split ``train``, ``"name:split"`` another split;
    ``subset`` is the dataset's configuration name).

    ``columns`` maps the fields of ``DEFAULT_COLUMNS`` to column names or dotted paths (missing
    keys keep their default). ``privileged=False`` (evaluation data) lets rows lack privileged
    context; ``answers=True`` requires an answer in every row, as does a non-default answer column.

    Raises ``DataError`` naming the file and line (or row) of the first bad row.
    """
    rows = read_rows(source, subset)
    if not rows:
        raise DataError(f"{source}: no examples found; fix: add at least one row ({ROW_FIX})")
    return [
        example_from_row(row, where, columns, privileged=privileged, answers=answers)
        for where, row in rows
    ]


def example_from_row(
    row: Any,
    where: str,
    columns: Mapping[str, str | None] | None = None,
    *,
    privileged: bool = True,
    answers: bool = False,
) -> Example:
    """Validate one decoded row; ``where`` (e.g. ``"data.jsonl:7"``) prefixes every error.

    ``columns``, ``privileged`` and ``answers`` as in ``load_examples``.
    """
    columns = {**DEFAULT_COLUMNS, **(columns or {})}
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}; fix: {ROW_FIX}")
    prompt = _row_prompt(row, where, columns)
    context = verbatim = None
    if columns["privileged_prompt"] is not None:
        verbatim = _column(row, where, columns, "privileged_prompt", required=privileged)
        if verbatim is not None:
            verbatim = _privileged_prompt_value(verbatim, prompt, where, columns)
    else:
        context = _column(row, where, columns, "privileged_context", required=privileged)
        if context is not None:
            _require_text(context, "privileged_context", where)
    required = answers or columns["answer"] != DEFAULT_COLUMNS["answer"]
    answer = _column(row, where, columns, "answer", required=required)
    if answer is not None:
        _require_text(answer, "answer", where)
    return Example(
        prompt=prompt, privileged_context=context, answer=answer, privileged_prompt=verbatim
    )


_MISSING = object()


def lookup(row: Mapping[str, Any], path: str) -> Any:
    """The value at column ``path`` of ``row``: the key itself if the row has it, else the dotted
    path walked through nested objects (``reward_model.ground_truth``); ``_MISSING`` if absent."""
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _column(
    row: Mapping[str, Any], where: str, columns: Mapping[str, str | None], key: str, *, required
) -> Any:
    """Field ``key`` of ``row`` through ``columns``; ``None`` when absent (or null) and optional."""
    path = columns[key]
    value = lookup(row, path)
    if value is _MISSING or value is None:
        if required:
            state = "missing" if value is _MISSING else "null"
            raise DataError(
                f"{where}: {state} field {path!r} (data.columns.{key}); fix: give every row "
                f"a {key}, or point data.columns.{key} at the column that holds it ({ROW_FIX})"
            )
        return None
    return value


def _row_prompt(row: Mapping[str, Any], where: str, columns: Mapping[str, str | None]) -> Prompt:
    """The plain prompt: the prompt column as written, else the messages column up to and
    including its last user turn (the turns after it are the dataset's reply, not the prompt)."""
    prompt = lookup(row, columns["prompt"])
    if prompt is not _MISSING:
        if isinstance(prompt, str):
            _require_text(prompt, "prompt", where)
        else:
            _check_messages(prompt, where)
        return prompt
    messages = lookup(row, columns["messages"])
    if messages is _MISSING:
        raise DataError(
            f"{where}: missing field {columns['prompt']!r} (data.columns.prompt) and "
            f"{columns['messages']!r} (data.columns.messages); fix: {ROW_FIX}"
        )
    _check_messages(messages, where, "messages")
    last_user = max(index for index, message in enumerate(messages) if message["role"] == "user")
    return messages[: last_user + 1]


def _privileged_prompt_value(
    value: Any, prompt: Prompt, where: str, columns: Mapping[str, str | None]
) -> Prompt:
    """A verbatim privileged prompt: text, or a chat when the plain prompt is a chat too."""
    if isinstance(value, str):
        _require_text(value, "privileged_prompt", where)
        return value
    if isinstance(prompt, str):
        raise DataError(
            f"{where}: privileged_prompt ({columns['privileged_prompt']!r}) is a message list "
            "but the prompt is text, so the views would be templated differently; fix: make "
            "both text, or both chats"
        )
    _check_messages(value, where, "privileged_prompt")
    return value


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


def _check_messages(messages: Any, where: str, field: str = "prompt") -> None:
    """A chat prompt is a non-empty list of {"role", "content"} strings with a user turn."""
    fix = f'write the {field} as [{{"role": "user", "content": "..."}}, ...]'
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: {field}={quote(messages)} is neither text nor a message list; fix: {fix}"
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not all(
            isinstance(message.get(key), str) for key in ("role", "content")
        ):
            raise DataError(
                f"{where}: {field}[{index}]={quote(message)} lacks string role/content; fix: {fix}"
            )
        for key in ("role", "content"):
            _require_unicode(message[key], f"{field}[{index}].{key}", where)
    user_turns = [message for message in messages if message["role"] == "user"]
    if not user_turns:
        raise DataError(
            f"{where}: {field} has no user turn to hold the privileged context; fix: {fix}"
        )
    _require_text(user_turns[-1]["content"], "content of the last user turn", where)


# ---------------------------------------------------------------------------------------------
# Privileged prompts


def format_fields(key: str, template: str) -> list[tuple[str, str, str, str | None]]:
    """The replacement fields of ``template`` (``string.Formatter().parse`` items with a field
    name); a ``ConfigError`` naming ``key`` if it is not a format string."""
    try:
        return [item for item in string.Formatter().parse(template) if item[1] is not None]
    except ValueError as error:
        raise ConfigError(
            f"{key}={quote(template)} is not a format string ({error}); "
            "write literal braces as {{ and }}"
        ) from None


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
    parsed = format_fields("privileged_template", template)
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
    """The prompt the privileged views see: ``template`` filled with the prompt and context, or
    ``example.privileged_prompt`` verbatim.

    For a chat prompt, a copy of the messages in which only the content of the last user turn is
    replaced by the filled template (or by a text ``privileged_prompt``; a chat one replaces the
    whole conversation); ``example`` is never modified.
    """
    check_privileged_template(template)
    if not example.has_privilege:
        raise DataError(
            f"prompt {quote(example.prompt)} has no privileged_context (nor privileged_prompt), "
            "so it has no privileged view; fix: give training rows a privileged_context column "
            "(data.columns.privileged_context)"
        )
    verbatim = example.privileged_prompt
    if verbatim is not None and not isinstance(verbatim, str):
        return [dict(message) for message in verbatim]
    if isinstance(example.prompt, str):
        if verbatim is not None:
            return verbatim
        return template.format(prompt=example.prompt, privileged_context=example.privileged_context)
    messages = [dict(message) for message in example.prompt]
    last_user = max(index for index, message in enumerate(messages) if message["role"] == "user")
    content = messages[last_user]["content"]
    messages[last_user]["content"] = (
        verbatim
        if verbatim is not None
        else template.format(prompt=content, privileged_context=example.privileged_context)
    )
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
    *,
    require_privileged: bool = True,
) -> tuple[list[list[int]], list[list[int]]]:
    """Plain and privileged prompt ids of every example, tokenized by the same function and kwargs.

    ``require_privileged=False`` (evaluation data, which is decoded on the plain prompt only)
    gives an example without privileged context its plain ids in both lists; otherwise such an
    example is a ``DataError``.

    Returns:
        (plain_ids, privileged_ids): two lists of ``len(examples)`` unpadded id lists.
    """
    plain_ids = [
        tokenize_prompt(example.prompt, tokenizer, chat_template_kwargs) for example in examples
    ]
    privileged_ids = [
        plain
        if not require_privileged and not example.has_privilege
        else tokenize_prompt(privileged_prompt(example, template), tokenizer, chat_template_kwargs)
        for example, plain in zip(examples, plain_ids)
    ]
    return plain_ids, privileged_ids
