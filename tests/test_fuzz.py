"""Fuzz tests (hypothesis) of the input boundaries: the dataset reader, the privileged-template
builder (with tokenization), the config parser and the rollout HTML page.

Whatever arrives, the only exceptions allowed are dopd's own (``DataError``, ``ConfigError``), and
whatever is accepted satisfies the documented invariants. ``CASES`` counts the examples each target
actually ran; ``test_fuzz_case_count`` (last) checks the total reaches ``MIN_TOTAL`` when the whole
module ran. Two kinds of case: hypothesis examples (random bytes, random JSON rows, templates,
YAML documents, HTML strings) and seeded mutations of the shipped ``configs/tiny.yaml`` and
``configs/data/tiny.jsonl`` (a classic byte-mutation fuzzer: cheap, and close to valid input, so
it reaches the row and key checks). 11,400 cases.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dopd.config import load_config
from dopd.errors import ConfigError, DataError
from dopd.io.data import (
    Example,
    check_privileged_template,
    load_examples,
    privileged_prompt,
    tokenize_views,
)
from dopd.modeling.tiny import build_char_tokenizer
from dopd.viz.tokens import render_rollouts_html

# Full-count fuzzing takes a while: the inner loop (-m "not slow") skips it, CI runs it.
pytestmark = pytest.mark.slow
CASES: Counter[str] = Counter()
MIN_TOTAL = 10_000
# Per target: (max_examples, ...). The sum is the case count docs/reliability.md reports.
BUDGET = {
    "jsonl_bytes": 800,
    "json_bytes": 400,
    "parquet_bytes": 200,
    "json_rows": 1000,
    "jsonl_mutations": 3000,
    "json_mutations": 1000,
    "template": 1200,
    "config_bytes": 400,
    "config_yaml": 600,
    "config_mutations": 2500,
    "html": 300,
}
SEED_ROWS = (
    (Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny.jsonl")
    .read_bytes()
    .split(b"\n")[:4]
)
SEED_CONFIG = (Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").read_bytes()
# Bytes a mutation inserts: JSON/YAML structure, escapes, a BOM, invalid UTF-8, NUL, a YAML tag.
INSERTS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b'"',
    b",",
    b":",
    b"\\",
    b"\n",
    b"\xef\xbb\xbf",
    b"\xff",
    b"\x00",
    b"\\ud800",
    b"null",
    b"0",
    b"-1",
    b"1e999",
    b"!!python/object:os.system",
    b"\t",
    b" ",
    b"#",
]
SETTINGS = {"deadline": None, "suppress_health_check": list(HealthCheck)}
REQUIRED = ["student.path=student-model", "teacher.path=teacher-model", "data.train=train.jsonl"]
TOKENIZER = build_char_tokenizer("0123456789+-*=() abcdefghij\n{}", chat_template=True)


def fuzz(target: str):
    """``settings`` of one target: its budget of examples, no deadline, no health checks."""
    return settings(max_examples=BUDGET[target], **SETTINGS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------------------------------------
# Dataset reader

# A small alphabet keeps generation cheap yet hits every class that matters: ASCII, braces,
# quotes and backslashes, whitespace and line separators, NUL, non-ASCII, and a lone surrogate
# (JSON can spell one as a \\ud800 escape).
ALPHABET = 'ab01 +={}\n\t"\\\x00\u00e9\u4e2d\u2028\U0001f642\ud800'
TEXT = st.text(st.sampled_from(ALPHABET), max_size=8) | st.sampled_from(["", " ", "1+1=", "user"])
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]) | TEXT, "content": TEXT}
) | st.dictionaries(st.sampled_from(["role", "content", "x"]), TEXT | st.integers(), max_size=3)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON_VALUES = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(TEXT, SCALARS, max_size=2)
FIELD = TEXT | JSON_VALUES | st.lists(MESSAGE, max_size=3)
ROW = st.dictionaries(
    st.sampled_from(["prompt", "privileged_context", "answer"]) | TEXT, FIELD, max_size=4
) | st.fixed_dictionaries(
    {"prompt": TEXT | st.lists(MESSAGE, max_size=3), "privileged_context": FIELD},
    optional={"answer": FIELD},
)


def check_examples(examples: list[Example]) -> None:
    """Accepted examples hold non-blank text and tokenize in both views without error."""
    assert examples
    for example in examples:
        assert example.privileged_context.strip()
        if isinstance(example.prompt, str):
            assert example.prompt.strip()
    plain, privileged = tokenize_views(examples, TOKENIZER)
    assert len(plain) == len(privileged) == len(examples)


def read_or_refuse(path: Path) -> None:
    try:
        examples = load_examples(str(path))
    except DataError as error:
        assert str(path) in str(error) and "fix" in str(error)
        return
    check_examples(examples)


@fuzz("jsonl_bytes")
@given(
    data=st.binary(max_size=200)
    | st.lists(
        st.sampled_from(
            [
                b'{"prompt": "1+1=", "privileged_context": "add"}',
                b"{",
                b"\xff",
                b"[]",
                b"\n",
                b"\xef\xbb\xbf",
                b'{"prompt": "\\ud800", "privileged_context": "x"}',
                b"[" * 5000,
            ]
        ),
        max_size=4,
    ).map(b"\n".join)
)
def test_jsonl_bytes_raise_only_data_error(workdir, data):
    CASES["jsonl_bytes"] += 1
    path = workdir / "fuzz.jsonl"
    path.write_bytes(data)
    read_or_refuse(path)


@fuzz("json_bytes")
@given(
    data=st.binary(max_size=200) | st.sampled_from([b"[" * 5000, b"[]", b"\xef\xbb\xbf[]", b"{}"])
)
def test_json_bytes_raise_only_data_error(workdir, data):
    CASES["json_bytes"] += 1
    path = workdir / "fuzz.json"
    path.write_bytes(data)
    read_or_refuse(path)


@fuzz("parquet_bytes")
@given(
    data=st.binary(max_size=300).map(lambda body: b"PAR1" + body + b"PAR1") | st.binary(max_size=64)
)
def test_parquet_bytes_raise_only_data_error(workdir, data):
    CASES["parquet_bytes"] += 1
    path = workdir / "fuzz.parquet"
    path.write_bytes(data)
    read_or_refuse(path)


@fuzz("json_rows")
@given(rows=st.lists(ROW | JSON_VALUES, min_size=0, max_size=4), as_array=st.booleans())
def test_json_rows_raise_only_data_error_and_valid_rows_tokenize(workdir, rows, as_array):
    CASES["json_rows"] += 1
    if as_array:
        path = workdir / "rows.json"
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    else:
        path = workdir / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    read_or_refuse(path)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-4 random edits of ``data``: flip, insert, delete or duplicate bytes (a classic fuzzer)."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        kind = rng.randrange(4)
        if kind == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif kind == 1:
            data[at:at] = rng.choice(INSERTS)
        elif kind == 2:
            del data[at : at + rng.randint(1, 16)]
        else:
            data[at:at] = data[max(0, at - 16) : at]
    return bytes(data)


def test_jsonl_mutations_raise_only_data_error(workdir):
    rng, path = random.Random(0), workdir / "mutated.jsonl"
    for _ in range(BUDGET["jsonl_mutations"]):
        CASES["jsonl_mutations"] += 1
        path.write_bytes(mutate(b"\n".join(SEED_ROWS), rng))
        read_or_refuse(path)


def test_json_mutations_raise_only_data_error(workdir):
    rng, path = random.Random(1), workdir / "mutated.json"
    array = b"[\n" + b",\n".join(row for row in SEED_ROWS if row) + b"\n]"
    for _ in range(BUDGET["json_mutations"]):
        CASES["json_mutations"] += 1
        path.write_bytes(mutate(array, rng))
        read_or_refuse(path)


# ---------------------------------------------------------------------------------------------
# Privileged template builder

PIECES = st.sampled_from(
    [
        "{prompt}",
        "{privileged_context}",
        "{",
        "}",
        "{{",
        "}}",
        "{prompt!r}",
        "{prompt:>4}",
        "{privileged_context.x}",
        "{0}",
        "{}",
        "{prompt[0]}",
        "\n",
        " hint: ",
        "{prompt:{privileged_context}}",
    ]
) | st.text(max_size=4)
TEMPLATES = st.lists(PIECES, max_size=6).map("".join) | st.tuples(TEXT, TEXT, TEXT).map(
    lambda parts: f"{parts[0]}{{prompt}}{parts[1]}{{privileged_context}}{parts[2]}"
)
SAFE_TEXT = st.text(st.sampled_from("ab1+= \n\u00e9{}"), min_size=1, max_size=8).map(
    lambda t: t + "x"
)
CHAT = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "assistant", "user"]), "content": SAFE_TEXT}
    ),
    max_size=3,
).map(lambda messages: [*messages, {"role": "user", "content": "q"}])


def fill(template: str, prompt: str, context: str) -> str:
    """Independent reference of ``str.format`` for accepted templates, scanning left to right."""
    replacements = (
        ("{{", "{"),
        ("}}", "}"),
        ("{prompt}", prompt),
        ("{privileged_context}", context),
    )
    out, index = [], 0
    while index < len(template):
        for token, value in replacements:
            if template.startswith(token, index):
                out.append(value)
                index += len(token)
                break
        else:
            out.append(template[index])
            index += 1
    return "".join(out)


@fuzz("template")
@given(template=TEMPLATES, prompt=SAFE_TEXT | CHAT, context=SAFE_TEXT)
def test_template_builder_raises_only_config_error(template, prompt, context):
    CASES["template"] += 1
    try:
        check_privileged_template(template)
    except ConfigError as error:
        assert "privileged_template" in str(error)
        return
    example = Example(prompt=prompt, privileged_context=context)
    built = privileged_prompt(example, template)
    if isinstance(prompt, str):
        assert built == fill(template, prompt, context)
    else:
        assert (
            built[:-1] == prompt[:-1] and prompt[-1]["content"] == "q"
        )  # a copy; only the last user turn
        assert context in built[-1]["content"]
    tokenize_views([example], TOKENIZER, template)


# ---------------------------------------------------------------------------------------------
# Config parser

KEYS = (
    st.sampled_from(
        [
            "output_dir",
            "seed",
            "student",
            "teacher",
            "data",
            "objective",
            "optim",
            "rollout",
            "loop",
            "path",
            "tiny",
            "top_k",
            "trim_quantile",
            "beta_weak",
            "lr",
            "train",
            "trust_remote_code",
            "x",
        ]
    )
    | TEXT
)
YAML_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=6,
)
YAML_SNIPPETS = st.sampled_from(
    [
        "!!python/object/apply:os.system ['true']",
        "!!python/name:os.system",
        "&a [*a]",
        "*x",
        "{a: 1",
        "- a\n- b",
        "\t",
        "2024-13-45",
        "1" * 5000,
        "!!binary 'AA=='",
        "? [a]\n: 1",
        "'\\ud800'",
        '"\\ud800"',
        "!!set {a}",
        "<<: {a: 1}",
    ]
)


def load_or_refuse(path: Path, overrides: list[str]) -> None:
    try:
        config = load_config(path, overrides)
    except ConfigError as error:
        assert "\n" not in str(error)
        return
    assert config.output_dir.encode("utf-8")  # accepted strings are writable text


@fuzz("config_bytes")
@given(data=st.binary(max_size=120) | st.sampled_from(["", "a: b\n"]).map(str.encode))
def test_config_bytes_raise_only_config_error(workdir, data):
    CASES["config_bytes"] += 1
    path = workdir / "fuzz.yaml"
    path.write_bytes(data)
    load_or_refuse(path, REQUIRED)


@fuzz("config_yaml")
@given(
    document=st.dictionaries(KEYS, YAML_VALUES, max_size=4),
    snippet=st.none() | st.tuples(KEYS, YAML_SNIPPETS),
    overrides=st.lists(
        st.tuples(KEYS, KEYS, TEXT).map(lambda t: f"{t[0]}.{t[1]}={t[2]}"), max_size=2
    ),
)
def test_config_yaml_raises_only_config_error(workdir, document, snippet, overrides):
    CASES["config_yaml"] += 1
    text = yaml.safe_dump(document, allow_unicode=True)
    if snippet is not None:
        text += f"{snippet[0]!r}: {snippet[1]}\n"
    path = workdir / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    load_or_refuse(path, [*REQUIRED, *overrides])


def test_config_mutations_raise_only_config_error(workdir):
    rng, path = random.Random(2), workdir / "mutated.yaml"
    for _ in range(BUDGET["config_mutations"]):
        CASES["config_mutations"] += 1
        path.write_bytes(mutate(SEED_CONFIG, rng))
        load_or_refuse(path, [])


# ---------------------------------------------------------------------------------------------
# Rollout page: every model or dataset string stays text

ALLOWED_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "h1",
    "h2",
    "div",
    "span",
    "pre",
    "p",
    "code",
    "details",
    "summary",
    "section",
    "br",
}
HOSTILE = st.sampled_from(
    [
        "<script>alert(1)</script>",
        '"><img src=x onerror=alert(1)>',
        "</style>",
        "&amp;",
        "'",
        "\n",
        "<!--",
        "]]>",
        "</span>",
    ]
) | st.text(st.sampled_from("<>&\"'/ab=\n"), max_size=8)


class Tags(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attributes = set(), set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes |= {name for name, _ in attrs}


@fuzz("html")
@given(
    tokens=st.lists(st.tuples(HOSTILE, HOSTILE), min_size=1, max_size=4),
    prompt=HOSTILE,
    title=HOSTILE,
    answer=HOSTILE,
    legend=st.dictionaries(HOSTILE, HOSTILE, max_size=2),
)
def test_rollout_page_escapes_every_string(tokens, prompt, title, answer, legend):
    CASES["html"] += 1
    rollout = {
        "prompt": prompt,
        "tokens": [t for t, _ in tokens],
        "regimes": [r for _, r in tokens],
        "q_teacher": [0.5] * len(tokens),
        "q_student": [0.5] * len(tokens),
        "gap": [0.0] * len(tokens),
        "answer": answer,
        "completion": prompt,
    }
    page = Tags()
    page.feed(render_rollouts_html([rollout], title=title, legend=legend))
    assert page.tags <= ALLOWED_TAGS, page.tags - ALLOWED_TAGS
    assert page.attributes <= {"lang", "charset", "class", "title"}


# ---------------------------------------------------------------------------------------------


def test_fuzz_case_count():
    """Runs last (file order): with every target run, the total is at least ``MIN_TOTAL``."""
    if set(CASES) != set(BUDGET):
        pytest.skip(f"only {sorted(CASES)} ran")
    print(f"fuzz cases: {dict(CASES)} total {sum(CASES.values())}")
    assert sum(CASES.values()) >= MIN_TOTAL, CASES
