"""Tests of dopd.io.data: loading, privileged prompts, and identical tokenization of both views."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from dopd.errors import ConfigError, DataError
from dopd.io.data import (
    DEFAULT_PRIVILEGED_TEMPLATE,
    Example,
    load_examples,
    privileged_prompt,
    tokenize_prompt,
    tokenize_views,
)
from dopd.modeling.tiny import build_char_tokenizer

REPO = Path(__file__).resolve().parents[1]
CHARACTERS = "0123456789+-*=() ,\nabcdefghijklmnopqrstuvwxyz<>"
TOKENIZER = build_char_tokenizer(CHARACTERS)
CHAT_TOKENIZER = build_char_tokenizer(CHARACTERS, chat_template=True)
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2*3="}]
ROWS = [
    {"prompt": "1+2*3=", "privileged_context": "multiply first", "answer": "7"},
    {"prompt": CHAT, "privileged_context": "multiply first"},
]
EXPECTED = [
    Example(prompt="1+2*3=", privileged_context="multiply first", answer="7"),
    Example(prompt=CHAT, privileged_context="multiply first", answer=None),
]


def char_ids(tokenizer, text: str) -> list[int]:
    """Independent reference: one id per character, looked up in the vocabulary."""
    vocab = tokenizer.get_vocab()
    return [vocab[character] for character in text]


# ---------------------------------------------------------------------------------------------
# Loading


def test_jsonl_json_and_parquet_load_the_same_examples(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n\n")  # trailing blank lines
    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps(ROWS, indent=2))
    for path in (jsonl, as_json):
        assert load_examples(str(path)) == EXPECTED, path


def test_parquet_loads_text_and_chat_prompts(tmp_path):
    # A Parquet column has one type, so text and chat prompts live in separate files.
    for index, row in enumerate(ROWS):
        path = tmp_path / f"data{index}.parquet"
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist([row, row]), path)
        assert load_examples(str(path)) == [EXPECTED[index]] * 2


def test_datasets_directory_loads_through_datasets(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in ROWS[:1]))
    assert load_examples(str(tmp_path)) == EXPECTED[:1]
    assert load_examples(f"{tmp_path}:train") == EXPECTED[:1]
    with pytest.raises(
        DataError, match=f"{tmp_path}:test: cannot load as a dataset .*Unknown split"
    ):
        load_examples(f"{tmp_path}:test")


def test_shipped_tiny_dataset_loads_and_is_small():
    path = REPO / "configs" / "data" / "tiny.jsonl"
    examples = load_examples(str(path))
    assert len(examples) == 64 and path.stat().st_size < 20_000
    assert all(
        example.answer and example.answer not in example.privileged_context for example in examples
    )


GOOD = '{"prompt": "1+1=", "privileged_context": "add"}'
BAD_JSONL_ROWS = {
    "invalid JSON": "{not json",
    "not an object": '["1+1=", "add"]',
    "missing prompt": '{"privileged_context": "add"}',
    "missing privileged_context": '{"prompt": "1+1="}',
    "number answer": '{"prompt": "1+1=", "privileged_context": "add", "answer": 2}',
    "number context": '{"prompt": "1+1=", "privileged_context": 3}',
    "empty prompt": '{"prompt": "", "privileged_context": "add"}',
    "blank context": '{"prompt": "1+1=", "privileged_context": "  "}',
    "empty message list": '{"prompt": [], "privileged_context": "add"}',
    "message without content": '{"prompt": [{"role": "user"}], "privileged_context": "add"}',
    "no user turn": (
        '{"prompt": [{"role": "system", "content": "hi"}], "privileged_context": "add"}'
    ),
}


@pytest.mark.parametrize("bad_row", BAD_JSONL_ROWS.values(), ids=BAD_JSONL_ROWS.keys())
def test_bad_jsonl_row_names_file_line_and_fix(tmp_path, bad_row):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{bad_row}\n{GOOD}\n")
    with pytest.raises(DataError, match="fix") as error:
        load_examples(str(path))
    assert str(error.value).startswith(f"{path}:3")


def test_bad_json_item_names_its_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(f'[\n  {GOOD},\n  {GOOD},\n\n  {{"prompt": "1+1="}}\n]')
    with pytest.raises(DataError, match="missing field 'privileged_context'") as error:
        load_examples(str(path))
    assert str(error.value).startswith(f"{path}:5 (item 2)")


def test_json_syntax_error_and_non_list_are_reported(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n{"prompt": "1"},\n}')
    with pytest.raises(DataError, match=f"{path}:3: invalid JSON"):
        load_examples(str(path))
    path.write_text(GOOD)
    with pytest.raises(DataError, match="list of objects"):
        load_examples(str(path))


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(f"{GOOD}\n{GOOD}\n".encode() + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=f"{path}:3: not valid UTF-8; fix"):
        load_examples(str(path))


def test_byte_order_mark_is_not_part_of_the_data(tmp_path):
    for name in ("bom.jsonl", "bom.json"):
        path = tmp_path / name
        text = f"{GOOD}\n" if name.endswith("l") else f"[{GOOD}]"
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert load_examples(str(path)) == [Example(prompt="1+1=", privileged_context="add")]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            '{"prompt": "\\ud800", "privileged_context": "add"}',
            "prompt holds the unpaired surrogate",
        ),
        (
            '{"prompt": [{"role": "user", "content": "a\\udc00"}], "privileged_context": "add"}',
            "prompt[0].content holds the unpaired surrogate",
        ),
    ],
)
def test_lone_surrogates_are_refused_before_tokenization(tmp_path, row, message):
    path = tmp_path / "data.jsonl"
    path.write_text(row + "\n")
    with pytest.raises(DataError, match=rf"data.jsonl:1: {re.escape(message)}"):
        load_examples(str(path))


def test_deep_json_directories_and_other_file_types_are_data_errors(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000)
    with pytest.raises(DataError, match="deep.jsonl:1: JSON nested too deeply"):
        load_examples(str(deep))
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        load_examples(str(tmp_path / "folder.jsonl"))
    (tmp_path / "data.csv").write_text("prompt,privileged_context\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_examples(str(tmp_path / "data.csv"))


def test_missing_and_empty_files_are_reported(tmp_path):
    for name in ("absent.jsonl", "absent.json", "absent.parquet"):
        with pytest.raises(DataError, match="no such file"):
            load_examples(str(tmp_path / name))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no examples found; fix"):
        load_examples(str(empty))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_examples(str(corrupt))


# ---------------------------------------------------------------------------------------------
# Privileged prompts


def test_string_prompt_gets_the_filled_template():
    example = Example(prompt="1+2*3=", privileged_context="multiply first")
    assert privileged_prompt(example) == "1+2*3=\n\nmultiply first"
    assert (
        privileged_prompt(example, "hint: {privileged_context}\n{prompt}")
        == "hint: multiply first\n1+2*3="
    )
    braces = Example(prompt="{x}", privileged_context="{y}")
    assert privileged_prompt(braces) == "{x}\n\n{y}"


def test_chat_prompt_changes_only_the_last_user_turn_of_a_copy():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "1+2*3="},
        {"role": "assistant", "content": "prefill"},
    ]
    example = Example(prompt=messages, privileged_context="multiply first")
    original = copy.deepcopy(messages)
    result = privileged_prompt(example)
    assert messages == original
    assert (
        result
        == original[:3] + [{"role": "user", "content": "1+2*3=\n\nmultiply first"}] + original[4:]
    )


@pytest.mark.parametrize(
    "template",
    [
        "{privileged_context}",
        "{prompt} {answer}",
        "{prompt} {0}",
        # Conversions and format specs could fail on some strings: ':d' on any str, a spec
        # taken from the context, so only plain fields are allowed.
        "{prompt!r} {privileged_context}",
        "{prompt:d} {privileged_context}",
        "{prompt:{privileged_context}} {privileged_context}",
        "{prompt} {privileged_context}\ud800",
    ],
)
def test_bad_template_is_a_config_error(template):
    with pytest.raises(ConfigError, match="privileged_template"):
        privileged_prompt(Example(prompt="1", privileged_context="c"), template)


# ---------------------------------------------------------------------------------------------
# Tokenization


@pytest.mark.parametrize("text", ["1+2=", "<bos>1+2=", "<bos><bos>1+2="])
def test_string_prompt_starts_with_exactly_one_bos(text):
    ids = tokenize_prompt(text, TOKENIZER, None)
    assert ids == [TOKENIZER.bos_token_id] + char_ids(TOKENIZER, "1+2=")


def test_chat_prompt_with_bos_in_template_has_exactly_one_bos():
    ids = tokenize_prompt(CHAT, CHAT_TOKENIZER, {})
    vocab = CHAT_TOKENIZER.get_vocab()
    expected = (
        [vocab["<bos>"], vocab["<|system|>"]]
        + char_ids(CHAT_TOKENIZER, "be brief")
        + [vocab["<|end|>"]]
        + [vocab["<|user|>"]]
        + char_ids(CHAT_TOKENIZER, "1+2*3=")
        + [vocab["<|end|>"], vocab["<|assistant|>"]]
    )
    assert ids == expected


def test_views_share_tokenization_and_chat_kwargs():
    tokenizer = build_char_tokenizer(CHARACTERS, chat_template=True)
    tokenizer.chat_template = (
        "{{ bos_token }}{% if mode %}{{ mode }}{% endif %}{{ messages[-1]['content'] }}"
    )
    examples = [
        Example(prompt="1+2*3=", privileged_context="multiply first"),
        Example(prompt=[{"role": "user", "content": "4*5="}], privileged_context="times"),
    ]
    plain, privileged = tokenize_views(
        examples, tokenizer, DEFAULT_PRIVILEGED_TEMPLATE, {"mode": "z"}
    )
    bos = [tokenizer.bos_token_id]
    assert plain == [bos + char_ids(tokenizer, "1+2*3="), bos + char_ids(tokenizer, "z4*5=")]
    assert privileged == [
        bos + char_ids(tokenizer, "1+2*3=\n\nmultiply first"),
        bos + char_ids(tokenizer, "z4*5=\n\ntimes"),
    ]


def test_reserved_chat_kwargs_and_missing_template_are_errors():
    with pytest.raises(ConfigError, match="add_generation_prompt"):
        tokenize_prompt(CHAT, CHAT_TOKENIZER, {"add_generation_prompt": False})
    with pytest.raises(DataError, match="no chat_template"):
        tokenize_prompt(CHAT, TOKENIZER, None)
