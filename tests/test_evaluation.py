"""Tests of dopd.training.evaluation: answer extraction, the built-in and file verifiers, and greedy
held-out accuracy on a tiny model."""

from __future__ import annotations

import pytest
import torch

from dopd.errors import ConfigError
from dopd.training.evaluation import (
    EvalResult,
    evaluate,
    exact_match,
    extract_answer,
    load_verifier,
    numeric_match,
)

PROMPTS = ["1+2=", "12*34+5=", "7=", "99*9=", "3*3*3+1=", "8*8="]
MAX_NEW_TOKENS = 10


# -- extraction and matching --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{ 7 }\nfinal line", "7"),  # the last box wins, stripped
        ("work\n  x = 5  \n\n", "x = 5"),  # last non-empty line, stripped
        ("single", "single"),
        ("", ""),
        ("  \n \n", ""),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("\\boxed{30}", "30", True),
        ("steps\n30", " 30\n", True),  # the reference is stripped too
        ("\\boxed{30}", "30.0", False),  # exact is textual
        ("steps\n31", "30", False),
        ("", "", True),
        ("", "0", False),
    ],
)
def test_exact_match(completion, answer, expected):
    assert exact_match(completion, answer) is expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("\\boxed{-3}", "-3", True),
        ("\\boxed{-3}", "3", False),
        ("the total is 2.50", "2.5", True),
        ("\\boxed{1e3}", "1000", True),
        ("\\boxed{2.5E-2}", "0.025", True),
        ("x = 4 or x = 7", "7", True),  # the last number of the extracted answer
        ("7\nthe answer is 4", "7", False),  # only the extracted (last) line counts
        ("\\boxed{seven}", "7", False),  # no number in the completion
        ("\\boxed{7}", "seven", False),  # no number in the reference
        ("\\boxed{100}", "100.0000001", True),  # within rel_tol 1e-6
        ("\\boxed{100}", "100.001", False),
    ],
)
def test_numeric_match(completion, answer, expected):
    assert numeric_match(completion, answer) is expected


# -- load_verifier ------------------------------------------------------------------------------


def test_load_verifier_built_ins():
    assert load_verifier("exact") is exact_match
    assert load_verifier("numeric") is numeric_match


def test_load_verifier_from_file(tmp_path):
    path = tmp_path / "my_verifier.py"
    path.write_text("def ends_with(completion, answer):\n    return completion.endswith(answer)\n")
    verifier = load_verifier(f"{path}:ends_with")
    assert verifier("abc42", "42") is True
    assert verifier("abc42", "4") is False


@pytest.mark.parametrize("spec", ["exactt", "verifier.txt:f", "file.py", "file.py:", ":f"])
def test_load_verifier_rejects_bad_forms(spec):
    with pytest.raises(ConfigError, match="eval.verifier"):
        load_verifier(spec)


def test_load_verifier_missing_function(tmp_path):
    path = tmp_path / "verifier.py"
    path.write_text("def other(completion, answer):\n    return True\n")
    with pytest.raises(ConfigError, match="has no function 'check'"):
        load_verifier(f"{path}:check")


def test_load_verifier_missing_file(tmp_path):
    path = tmp_path / "absent.py"
    with pytest.raises(ConfigError, match="absent.py"):
        load_verifier(f"{path}:check")


# -- evaluate -----------------------------------------------------------------------------------


# ``tokenizer`` and ``tiny_model`` are conftest.py's (tests.tiny_models).


@pytest.fixture(scope="module")
def model(tiny_model):
    # The wide initialisation of tiny_model keeps greedy margins far above float rounding.
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def greedy_texts(model, tokenizer):
    """Greedy completions decoded without special tokens, by a manual uncached argmax loop."""
    texts = []
    model.eval()
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])  # [1, L]
            completion = []
            for _ in range(MAX_NEW_TOKENS):
                token = int(model(input_ids=ids).logits[0, -1].argmax())
                completion.append(token)
                if token == tokenizer.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            texts.append(tokenizer.decode(completion, skip_special_tokens=True))
    return texts


def same_text(completion: str, answer: str) -> bool:
    return completion == answer


def run_evaluate(model, tokenizer, answers, batch_size):
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    return evaluate(
        model,
        tokenizer,
        prompt_ids,
        answers,
        verifier=same_text,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=batch_size,
    )


@pytest.mark.parametrize("batch_size", [16, 4, 1])
def test_evaluate_scores_the_greedy_completions(model, tokenizer, greedy_texts, batch_size):
    model.train()
    result = run_evaluate(model, tokenizer, greedy_texts, batch_size)
    assert model.training, "evaluate must restore the training mode"
    assert (result.correct, result.total, result.accuracy) == (len(PROMPTS), len(PROMPTS), 1.0)
    assert [sample["completion"] for sample in result.samples] == greedy_texts
    assert all(sample["correct"] for sample in result.samples)


def test_evaluate_counts_only_matching_answers(model, tokenizer, greedy_texts):
    shuffled = greedy_texts[1:] + greedy_texts[:1]
    expected = sum(text == answer for text, answer in zip(greedy_texts, shuffled))
    assert expected < len(PROMPTS), "the shuffle must break some answers"
    result = run_evaluate(model, tokenizer, shuffled, batch_size=4)
    assert (result.correct, result.total) == (expected, len(PROMPTS))
    assert result.accuracy == expected / len(PROMPTS) < 1.0
    assert [sample["answer"] for sample in result.samples] == shuffled
    assert [s["correct"] for s in result.samples] == [
        t == a for t, a in zip(greedy_texts, shuffled)
    ]


def test_eval_result_accuracy():
    assert EvalResult(0, 0).accuracy == 0.0
    assert EvalResult(3, 4).accuracy == 0.75
