"""Data written for other trainers loads through ``data.columns`` alone: TRL's prompt-only rows,
chat ``messages`` rows, ms-swift-style rows with a whole ``teacher_prompt``, and verl parquet rows
with nested ``reward_model`` / ``extra_info`` records. Each trains through ``dopd train`` and
builds the privileged prompt its format means; a bad mapping names the row and the dotted path;
``dopd eval`` reads the same columns and chat kwargs, needs no privileged context, and scores a
checkpoint folder exactly as the run's final model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from dopd.cli import main
from dopd.config import load_config
from dopd.errors import ConfigError, DataError
from dopd.io.data import load_examples, tokenize_prompt, tokenize_views
from dopd.modeling.tiny import CHAT_TEMPLATE, build_char_tokenizer
from dopd.training.eval_model import load_eval_model
from dopd.training.evaluation import evaluate, load_verifier

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
TINY_DATA = ROOT / "configs" / "data" / "tiny.jsonl"
CHARACTERS = load_config(CONFIG).tokenizer.characters
# The tiny chat template, with an optional prefix a chat_template_kwargs key can switch on.
TEMPLATE = "{% if mode %}{{ mode }}{% endif %}" + CHAT_TEMPLATE
SYSTEM = {"role": "system", "content": "be brief"}
# (prompt, privileged context, answer): the first rows of the shipped tiny data set.
PROBLEMS = [
    (row["prompt"], row["privileged_context"], row["answer"])
    for row in map(json.loads, TINY_DATA.read_text().splitlines()[:8])
]


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat-tokenizer")
    tokenizer = build_char_tokenizer(CHARACTERS, chat_template=True)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def chat_tokenizer():
    tokenizer = build_char_tokenizer(CHARACTERS, chat_template=True)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


# -- the four formats --------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A data format: how its rows are written, the settings that read them, and the plain and
    privileged prompts (and answer) that row ``i`` must give."""

    write: Callable[[Path], Path]
    settings: tuple[str, ...]
    chat: bool
    expected: Callable[[int], tuple]  # i -> (plain prompt, privileged prompt, answer)


def _trl(folder: Path) -> Path:  # TRL prompt-only: a text prompt; the hint in its own column
    rows = [{"prompt": p, "hint": c, "answer": a} for p, c, a in PROBLEMS]
    return write_jsonl(folder / "trl.jsonl", rows)


def _messages(folder: Path) -> Path:  # a chat with the dataset's reply after the last user turn
    rows = [
        {
            "messages": [SYSTEM, user(p), {"role": "assistant", "content": f"it is {a}"}],
            "privileged_context": c,
            "answer": a,
        }
        for p, c, a in PROBLEMS
    ]
    path = folder / "messages.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def _swift(folder: Path) -> Path:  # ms-swift style: the teacher's whole prompt in teacher_prompt
    rows = [
        {
            "messages": [user(p), {"role": "assistant", "content": a}],
            "teacher_prompt": f"reference: {c}\nnow solve {p}",
        }
        for p, c, a in PROBLEMS
    ]
    return write_jsonl(folder / "swift.jsonl", rows)


def _verl(folder: Path, *, hints: bool = True, name: str = "verl.parquet") -> Path:
    rows = [
        {
            "data_source": "tiny",
            "prompt": [SYSTEM, user(p)],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": a},
            "extra_info": {"split": "train", "index": i, **({"hint": c} if hints else {})},
        }
        for i, (p, c, a) in enumerate(PROBLEMS)
    ]
    path = folder / name
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


LAYOUTS = {
    "trl-prompt-only": Layout(
        _trl,
        ("data.columns.privileged_context=hint",),
        chat=False,
        expected=lambda i: (
            PROBLEMS[i][0],
            f"{PROBLEMS[i][0]}\n\n{PROBLEMS[i][1]}",
            PROBLEMS[i][2],
        ),
    ),
    "messages": Layout(
        _messages,
        ('data.privileged_template="{prompt}\\n\\nhint: {privileged_context}"',),
        chat=True,
        expected=lambda i: (
            [SYSTEM, user(PROBLEMS[i][0])],
            [SYSTEM, user(f"{PROBLEMS[i][0]}\n\nhint: {PROBLEMS[i][1]}")],
            PROBLEMS[i][2],
        ),
    ),
    "ms-swift-teacher-prompt": Layout(
        _swift,
        ("data.columns.privileged_prompt=teacher_prompt",),
        chat=True,
        expected=lambda i: (
            [user(PROBLEMS[i][0])],
            [user(f"reference: {PROBLEMS[i][1]}\nnow solve {PROBLEMS[i][0]}")],
            None,
        ),
    ),
    "verl-parquet": Layout(
        _verl,
        (
            "data.columns.answer=reward_model.ground_truth",
            "data.columns.privileged_context=extra_info.hint",
        ),
        chat=True,
        expected=lambda i: (
            [SYSTEM, user(PROBLEMS[i][0])],
            [SYSTEM, user(f"{PROBLEMS[i][0]}\n\n{PROBLEMS[i][1]}")],
            PROBLEMS[i][2],
        ),
    ),
}


def train(output_dir: Path, data: Path, settings, tokenizer_dir: Path | None, *extra: str) -> int:
    sets = [
        f"output_dir={output_dir}",
        f"data.train={data}",
        "optim.max_steps=2",
        "data.eval=null",
        "loop.eval_every=0",
        *settings,
        *extra,
    ]
    if tokenizer_dir is not None:
        sets += [f"tokenizer.path={tokenizer_dir}", "tokenizer.characters=null"]
    return main(["train", "--config", str(CONFIG), *(arg for s in sets for arg in ("--set", s))])


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_trains_and_builds_the_privileged_prompt_it_means(
    name, tmp_path, chat_tokenizer_dir
):
    layout = LAYOUTS[name]
    data = layout.write(tmp_path)
    run = tmp_path / "run"
    tokenizer_dir = chat_tokenizer_dir if layout.chat else None
    assert train(run, data, layout.settings, tokenizer_dir) == 0
    assert (run / "model" / "config.json").is_file()
    assert (run / "checkpoints" / "step-000002" / "student.safetensors").is_file()

    # The run's own config reads the file into exactly the prompts the format means.
    config = load_config(run / "config.yaml")
    tokenizer = chat_tokenizer() if layout.chat else build_char_tokenizer(CHARACTERS)
    examples = load_examples(str(data), config.data.columns.mapping())
    plain, privileged = tokenize_views(
        examples,
        tokenizer,
        config.data.privileged_template,
        config.tokenizer.chat_template_kwargs,
    )
    assert len(examples) == len(PROBLEMS)
    for i, example in enumerate(examples):
        want_plain, want_privileged, want_answer = layout.expected(i)
        assert example.prompt == want_plain
        assert example.answer == want_answer
        assert plain[i] == tokenize_prompt(want_plain, tokenizer)
        assert privileged[i] == tokenize_prompt(want_privileged, tokenizer)
        # Both views are one template apart: the plain prompt never holds the privilege.
        text = tokenizer.decode(privileged[i])
        assert PROBLEMS[i][1] in text and PROBLEMS[i][1] not in tokenizer.decode(plain[i])


def test_training_evaluates_on_rows_without_privileged_context(tmp_path):
    data = _trl(tmp_path)
    held_out = write_jsonl(
        tmp_path / "held-out.jsonl", [{"prompt": p, "answer": a} for p, _, a in PROBLEMS]
    )
    run = tmp_path / "run"
    extra = (f"data.eval={held_out}", "loop.eval_every=2", "eval.max_examples=4")
    assert train(run, data, LAYOUTS["trl-prompt-only"].settings, None, *extra) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "eval/accuracy" in records[-1] and 0.0 <= records[-1]["eval/accuracy"] <= 1.0


# -- column mapping: loading rules and errors -----------------------------------------------------


def test_a_missing_dotted_path_names_the_row_and_the_key(tmp_path):
    rows = [{"prompt": "1+1=", "privileged_context": "add", "reward_model": {"ground_truth": "2"}}]
    rows += [
        rows[0],
        {"prompt": "2+2=", "privileged_context": "add", "reward_model": {"style": "rule"}},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    columns = {"answer": "reward_model.ground_truth"}
    with pytest.raises(DataError) as error:
        load_examples(str(path), columns)
    assert str(error.value).startswith(
        f"{path}:3: missing field 'reward_model.ground_truth' (data.columns.answer); fix:"
    )
    # A path through something that is not an object is missing too; parquet names its row.
    rows[2]["reward_model"] = "rule"
    with pytest.raises(
        DataError, match=r"train.jsonl:3: missing field 'reward_model.ground_truth'"
    ):
        load_examples(str(write_jsonl(path, rows)), columns)
    parquet = _verl(tmp_path, hints=False)
    with pytest.raises(
        DataError,
        match=r"verl.parquet: row 0: missing field 'extra_info.hint' "
        r"\(data.columns.privileged_context\)",
    ):
        load_examples(str(parquet), {"privileged_context": "extra_info.hint"})


def test_a_bad_mapping_stops_dopd_train_with_one_line(tmp_path, capsys):
    data = _trl(tmp_path)
    run = tmp_path / "run"
    assert train(run, data, ("data.columns.privileged_context=extra_info.hint",), None) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith(
        f"dopd: error: {data}:1: missing field 'extra_info.hint' "
        "(data.columns.privileged_context); fix: give every row a privileged_context, or point "
        "data.columns.privileged_context at the column that holds it"
    )
    assert not run.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.columns.answr=x",
            "data.columns.answr is not a config key; did you mean data.columns.answer?",
        ),
        ("data.columns.answer=3", "data.columns.answer"),
        ("data.columns.answer=[a]", "data.columns.answer"),
        ("data.columns.answer=''", "data.columns.answer"),
        (
            "data.columns.answer=reward_model..ground_truth",
            "data.columns.answer=.* has an empty part",
        ),
        ("data.columns.prompt=null", "data.columns.prompt"),
        ("data.subset=''", "data.subset"),
    ],
)
def test_bad_columns_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


def test_prompt_column_wins_over_messages_and_a_literal_dotted_key_over_a_path(tmp_path):
    rows = [
        {
            "prompt": "1+1=",
            "messages": [user("ignored")],
            "extra.hint": "literal",
            "extra": {"hint": "nested"},
        }
    ]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    (example,) = load_examples(str(path), {"privileged_context": "extra.hint"})
    assert (example.prompt, example.privileged_context) == ("1+1=", "literal")
    (example,) = load_examples(
        str(path), {"prompt": "question", "privileged_context": "extra.hint"}
    )
    assert example.prompt == [user("ignored")]


def test_messages_keep_earlier_turns_and_drop_the_reply(tmp_path):
    conversation = [
        SYSTEM,
        user("first"),
        {"role": "assistant", "content": "one"},
        user("1+1="),
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "   "},  # a blank last user turn is refused, not skipped
    ]
    path = write_jsonl(
        tmp_path / "data.jsonl", [{"messages": conversation[:5], "privileged_context": "add"}]
    )
    (example,) = load_examples(str(path))
    assert example.prompt == conversation[:4]
    path = write_jsonl(
        tmp_path / "data.jsonl", [{"messages": conversation, "privileged_context": "add"}]
    )
    with pytest.raises(DataError, match="data.jsonl:1: content of the last user turn is empty"):
        load_examples(str(path))
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": "1+1=", "privileged_context": "add"}])
    with pytest.raises(
        DataError, match="data.jsonl:1: messages='1\\+1=' is neither text nor a message list"
    ):
        load_examples(str(path))


def test_privileged_context_is_required_for_training_only(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    with pytest.raises(DataError, match="missing field 'privileged_context'"):
        load_examples(str(path))
    (example,) = load_examples(str(path), privileged=False, answers=True)
    assert example.privileged_context is None and example.privileged_prompt is None
    tokenizer = build_char_tokenizer(CHARACTERS)
    plain, privileged = tokenize_views([example], tokenizer, require_privileged=False)
    assert plain == privileged == [tokenize_prompt("1+1=", tokenizer)]
    with pytest.raises(DataError, match="no privileged_context"):
        tokenize_views([example], tokenizer)
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "1+1="}])
    with pytest.raises(DataError, match=r"missing field 'answer' \(data.columns.answer\)"):
        load_examples(str(path), privileged=False, answers=True)


def test_verbatim_privileged_prompt_forms(tmp_path):
    tokenizer = chat_tokenizer()
    rows = [
        {"prompt": "1+1=", "teacher_prompt": "hint add then 1+1="},  # text for text
        {
            "prompt": [SYSTEM, user("1+1=")],
            "teacher_prompt": [user("all new 1+1=")],
        },  # chat for chat
    ]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    examples = load_examples(str(path), {"privileged_prompt": "teacher_prompt"})
    _, privileged = tokenize_views(examples, tokenizer)
    assert privileged == [
        tokenize_prompt("hint add then 1+1=", tokenizer),
        tokenize_prompt([user("all new 1+1=")], tokenizer),
    ]
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "1+1=", "teacher_prompt": [user("x")]}])
    with pytest.raises(
        DataError,
        match="data.jsonl:1: privileged_prompt .* is a message list but the prompt is text",
    ):
        load_examples(str(path), {"privileged_prompt": "teacher_prompt"})


def test_subset_picks_a_datasets_configuration(tmp_path):
    for subset, (prompt, context, answer) in zip(("first", "second"), PROBLEMS):
        (tmp_path / subset).mkdir()
        write_jsonl(
            tmp_path / subset / "train.jsonl",
            [{"prompt": prompt, "privileged_context": context, "answer": answer}],
        )
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: first\n  data_files:\n  - split: train\n    path: first/train.jsonl\n"
        "- config_name: second\n  data_files:\n  - split: train\n    path: second/train.jsonl\n"
        "---\n"
    )
    assert [e.prompt for e in load_examples(str(tmp_path), subset="second")] == [PROBLEMS[1][0]]
    assert [e.prompt for e in load_examples(f"{tmp_path}:train", subset="first")] == [
        PROBLEMS[0][0]
    ]
    with pytest.raises(DataError, match="cannot load as a dataset \\(subset 'third'\\)"):
        load_examples(str(tmp_path), subset="third")


# -- dopd eval ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verl_run(tmp_path_factory, chat_tokenizer_dir) -> tuple[Path, Path]:
    """A two-step run on verl parquet rows: (output_dir, the data file)."""
    folder = tmp_path_factory.mktemp("verl")
    data = _verl(folder)
    run = folder / "run"
    assert train(run, data, LAYOUTS["verl-parquet"].settings, chat_tokenizer_dir) == 0
    return run, data


def eval_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


def test_eval_of_a_checkpoint_folder_equals_eval_of_the_final_model(verl_run, tmp_path, capsys):
    run, data = verl_run
    checkpoint = run / "checkpoints" / "step-000002"
    # The checkpoint finds its run's config.yaml itself; the final model is given it.
    assert (
        main(
            ["eval", "--model", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "a")]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    args = ["--config", str(run / "config.yaml"), "--out", str(tmp_path / "b")]
    assert main(["eval", "--model", str(run / "model"), "--data", str(data), *args]) == 0
    a, b = eval_rows(tmp_path / "a"), eval_rows(tmp_path / "b")
    assert a == b and len(a) == len(PROBLEMS)
    # The run's columns applied: answers from reward_model.ground_truth, chat prompts as written.
    assert [row["answer"] for row in a] == [answer for _, _, answer in PROBLEMS]
    assert [row["prompt"] for row in a] == [[SYSTEM, user(p)] for p, _, _ in PROBLEMS]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary == printed
    assert summary["total"] == len(PROBLEMS) and summary["correct"] == sum(r["correct"] for r in a)
    assert summary["max_new_tokens"] == load_config(run / "config.yaml").eval.max_new_tokens


def test_eval_needs_no_privileged_context(verl_run, tmp_path):
    run, data = verl_run
    bare = _verl(tmp_path, hints=False, name="bare.parquet")
    for source, out in ((data, "with"), (bare, "without")):
        args = ["--config", str(run / "config.yaml"), "--out", str(tmp_path / out)]
        assert main(["eval", "--model", str(run / "model"), "--data", str(source), *args]) == 0
    # Evaluation decodes the plain prompt: the hints change nothing.
    assert eval_rows(tmp_path / "with") == eval_rows(tmp_path / "without")


def test_eval_uses_the_configs_chat_kwargs_and_verifier(verl_run, tmp_path):
    run, data = verl_run
    out = tmp_path / "eval"
    args = [
        "--config",
        str(run / "config.yaml"),
        "--set",
        "tokenizer.chat_template_kwargs.mode=zzz",
    ]
    args += ["--data", str(data), "--verifier", "math", "--max-examples", "3", "--out", str(out)]
    assert main(["eval", "--model", str(run / "checkpoints" / "step-000002"), *args]) == 0
    rows = eval_rows(out)
    tokenizer = chat_tokenizer()
    ids = [tokenize_prompt(row["prompt"], tokenizer, {"mode": "zzz"}) for row in rows]
    assert [row["prompt_tokens"] for row in rows] == [
        len(tokenize_prompt(row["prompt"], tokenizer)) + 3 for row in rows
    ]
    # The recorded completions are the greedy answers to the prompts with the kwargs applied.
    config = load_config(run / "config.yaml")
    model, loaded = load_eval_model(str(run / "model"), config)
    verifier = load_verifier("math")
    result = evaluate(
        model,
        loaded,
        ids,
        [row["answer"] for row in rows],
        verifier=verifier,
        max_new_tokens=config.eval.max_new_tokens,
    )
    assert [s["completion"] for s in result.samples] == [row["completion"] for row in rows]
    assert [row["correct"] for row in rows] == [
        verifier(r["completion"], r["answer"]) for r in rows
    ]
    assert json.loads((out / "summary.json").read_text())["verifier"] == "math"


def test_eval_errors_are_one_line(verl_run, tmp_path, capsys):
    run, data = verl_run
    shards = tmp_path / "runs" / "x" / "checkpoints" / "step-000002"
    shards.mkdir(parents=True)
    (shards / "trainer_state.json").write_text('{"step": 2, "shards": 2}')
    for rank in range(2):
        (shards / f"student.rank{rank:05d}.safetensors").write_bytes(b"")
    lonely = tmp_path / "lonely" / "step-000002"
    lonely.mkdir(parents=True)
    (lonely / "trainer_state.json").write_text('{"step": 2}')
    cases = {
        "sharded student": (
            ["--model", str(shards), "--data", str(data), "--config", str(run / "config.yaml")],
            "use|final export",
        ),
        "no run config": (["--model", str(lonely), "--data", str(data)], "--config"),
        "no data": (["--model", str(run / "model")], "--data"),
        "missing model": (
            ["--model", str(tmp_path / "nope"), "--data", str(TINY_DATA)],
            "no such directory",
        ),
        "offline hub id": (
            ["--model", "someone/absent-model", "--data", str(TINY_DATA)],
            "HF_HUB_OFFLINE",
        ),
        "set without config": (["--model", str(run / "model"), "--set", "seed=1"], "--config"),
    }
    for name, (args, needle) in cases.items():
        capsys.readouterr()
        assert main(["eval", *args]) == 2, name
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("dopd: error:"), (name, lines)
        assert any(part in lines[0] for part in needle.split("|")), (name, lines)


def test_eval_of_a_lora_checkpoint_equals_eval_of_its_merged_export(tmp_path):
    run = tmp_path / "run"
    sets = [f"output_dir={run}", "optim.max_steps=2", "data.eval=null", "loop.eval_every=0"]
    sets += [f"data.train={TINY_DATA}", "optim.lr=0.05"]  # a rate that moves the adapters
    config = ROOT / "configs" / "tiny-lora.yaml"
    assert main(["train", "--config", str(config), *(a for s in sets for a in ("--set", s))]) == 0
    common = ["--data", str(TINY_DATA), "--max-examples", "6", "--config", str(run / "config.yaml")]
    checkpoint = run / "checkpoints" / "step-000002"
    assert main(["eval", "--model", str(checkpoint), *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", "--model", str(run / "model"), *common, "--out", str(tmp_path / "b")]) == 0
    assert eval_rows(tmp_path / "a") == eval_rows(tmp_path / "b")
