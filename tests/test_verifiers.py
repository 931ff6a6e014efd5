"""Tests of the answer verifiers: the boxed-answer extractor on nested braces, and the math-verify
backed ``math`` verifier (equivalent forms accepted, wrong answers refused)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dopd.config import load_config
from dopd.errors import ConfigError, DOPDError
from dopd.training.evaluation import (
    exact_match,
    extract_answer,
    last_boxed,
    load_verifier,
    math_match,
    numeric_match,
)

ROOT = Path(__file__).resolve().parents[1]

# -- the boxed extractor ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} done", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{1} then \boxed{7}", "7"),  # the last box wins
        (r"\boxed{1} then \fbox{7}", "7"),  # \fbox counts as a box
        (r"\boxed{\boxed{7}}", "7"),  # a box that is the whole content is unwrapped
        (r"\boxed{\boxed{1}+\boxed{2}}", r"\boxed{1}+\boxed{2}"),  # the outer box is the answer
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are literal
        (r"\boxed {4}", "4"),
        (r"so $\boxed 5$.", "5"),
        (r"\boxed{}", ""),
        (r"\boxed{1} and then \boxed{2", "1"),  # an unclosed box (cut-off completion) is skipped
        (r"\boxed{2", None),
        (r"\boxedx{3}", None),  # another command
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# Balanced strings over text, LaTeX commands and escaped braces; no box command of their own.
_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="{}\\", blacklist_categories=("Cs",)), max_size=6
)
_COMMAND = st.sampled_from([r"\frac", r"\sqrt", r"\{", r"\}", r"\,", r"\\", r"\cdot "])
BALANCED = st.recursive(
    st.one_of(_TEXT, _COMMAND),
    lambda inner: st.one_of(
        st.builds(lambda body: "{" + body + "}", inner),
        st.lists(inner, max_size=4).map("".join),
    ),
    max_leaves=20,
)


@given(BALANCED)
def test_any_balanced_string_round_trips_through_a_box(body):
    assert last_boxed(r"\boxed{" + body + "}") == body
    assert last_boxed(r"work \fbox{x} more \boxed{" + body + "} end") == body


@given(BALANCED, BALANCED)
def test_the_last_of_two_boxes_wins(first, second):
    assert last_boxed(r"\boxed{" + first + r"} and \boxed{" + second + "}") == second


def test_exact_and_numeric_use_the_nested_extractor():
    assert extract_answer(r"thus \boxed{\frac{1}{2}}" + "\nmore text") == r"\frac{1}{2}"
    assert exact_match(r"\boxed{ \frac{1}{2} }", r"\frac{1}{2}")
    assert not exact_match(r"\boxed{\frac{1}{2}}", "0.5")  # exact is textual
    assert numeric_match(r"\boxed{x^{2} = 49}", "49")  # the last number of the nested content


# -- the math verifier --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        (r"so \boxed{\frac{1}{2}}", "0.5", True),  # fraction vs decimal
        (r"so \boxed{0.5}", r"\frac{1}{2}", True),
        (r"\boxed{\dfrac{2}{4}}", r"\frac12", True),
        (r"\boxed{1+2x}", "2x+1", True),  # equivalent forms
        (r"\boxed{2x+1}", "1+2x", True),
        (r"\boxed{\sqrt{4}}", "2", True),
        (r"the answer is \boxed{\boxed{7}}", "7", True),  # nested boxes
        (r"\fbox{\frac{3}{4}}", "0.75", True),
        (r"\boxed{1} so finally \boxed{7}", "7", True),  # the last box wins
        (r"\boxed{1} so finally \boxed{7}", "1", False),
        (r"\boxed{3}", "4", False),  # a wrong answer
        (r"\boxed{2x+2}", "2x+1", False),
        ("the answer is 1/2", "$0.5$", True),  # no box: math-verify's own extraction
        ("", "1", False),
        (r"\boxed{0.25} then \boxed{\frac{1}{2}", "1/4", True),  # an unclosed box is skipped
    ],
)
def test_math_verifier(completion, answer, expected):
    assert math_match(completion, answer) is expected


def test_math_verifier_works_outside_the_main_thread():
    # math-verify's timeouts need signal.alarm, which only the main thread may set.
    results = []
    thread = threading.Thread(target=lambda: results.append(math_match(r"\boxed{0.5}", "1/2")))
    thread.start()
    thread.join()
    assert results == [True]


def test_math_verifier_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify now fails
    with pytest.raises(DOPDError, match=r"pip install 'dopd\[math\]'") as error:
        load_verifier("math")
    assert "\n" not in str(error.value)
    with pytest.raises(DOPDError, match="math-verify"):
        math_match(r"\boxed{1}", "1")


def test_config_accepts_the_math_verifier():
    config = load_config(ROOT / "configs" / "tiny.yaml", ["eval.verifier=math"])
    assert config.eval.verifier == "math"
    assert load_verifier(config.eval.verifier) is math_match
    with pytest.raises(ConfigError, match="eval.verifier"):
        load_config(ROOT / "configs" / "tiny.yaml", ["eval.verifier=maths"])
