"""A self-contained HTML page of sampled rollouts, shown token by token and coloured by regime.

Each token is a ``<span>`` whose background is its regime's colour and whose hover text (the
``title`` attribute) reads ``regime=HT q_T=0.912 q_S=0.301 A=1.108`` (then ``p=0.250``, the
student's probability on the plain prompt, when the rollout has ``p_student``). The page has
inline CSS only: no script and no external resource, so it opens offline and can be attached to
a report.
Every string that came from a model or a dataset (prompt, tokens, answer, completion, regime
names, title, legend) is escaped with ``html.escape(..., quote=True)``, in text and attributes.

    write_rollouts_html(rollouts, "rollouts.html", title="dopd, step 200")
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from dopd.errors import DataError
from dopd.viz.plots import GROUP_PALETTE, REGIME_COLORS, assign_colors

# The routing table of docs/method.md §3, one line each: when a token lands in the regime, and
# what it learns.
DEFAULT_LEGEND = {
    "LH": "light teacher: small gap, both confident; distil lightly to the privileged teacher",
    "LL": "weak self-anchor: small gap, both unsure; anchor weakly to the privileged student",
    "HT": "deep teacher: large gap, teacher more confident; full-vocabulary JS to the teacher",
    "HS": "light self-anchor: large gap, student more confident; anchor lightly to itself",
}
PER_TOKEN_FIELDS = ("tokens", "regimes", "q_teacher", "q_student", "gap")
OPTIONAL_PER_TOKEN_FIELDS = ("p_student",)
REQUIRED_FIELDS = ("prompt", *PER_TOKEN_FIELDS)
NEWLINE_MARK = "\u21b5"  # ↵
# Regime names go into class names only when they are plainly safe there.
SAFE_CLASS_NAME = re.compile(r"[A-Za-z0-9]+")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
.legend { display: grid; grid-template-columns: max-content 1fr; gap: .3em 1em; }
.rollout { border-top: 1px solid #ccc; margin-top: 1.5em; padding-top: .5em; }
pre, .tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; }
pre { background: #f6f6f6; padding: .5em; }
.tokens { line-height: 1.9; }
.tok, .swatch { border-radius: 3px; padding: 1px 0; }
.swatch { padding: 1px 4px; font-family: ui-monospace, monospace; }
.tok { cursor: help; }
.tok:hover { outline: 2px solid #000; }
.tok:empty::before { content: "\\2205"; opacity: .5; }
.correct { color: #1a7f37; } .wrong { color: #cf222e; }
"""


def render_rollouts_html(
    rollouts: Sequence[Mapping[str, Any]],
    *,
    title: str,
    legend: Mapping[str, str] | None = None,
) -> str:
    """A complete HTML page showing ``rollouts`` token by token, coloured by regime.

    Args:
        rollouts: dicts with ``prompt`` (str) and per-token lists of one length: ``tokens``
            (str), ``regimes`` (regime or group name), ``q_teacher``, ``q_student`` and ``gap``
            (floats; NaN reads n/a); optionally ``answer`` (str), ``correct`` (bool),
            ``completion`` (str) and per-token ``p_student`` (floats).
        title: page title.
        legend: regime name -> description; DOPD's four regimes by default. Regimes that occur
            but are not described still get a colour and a legend row.
    """
    legend = DEFAULT_LEGEND if legend is None else legend
    for index, rollout in enumerate(rollouts):
        _check_rollout(index, rollout)
    occurring = [str(regime) for rollout in rollouts for regime in rollout["regimes"]]
    names = list(dict.fromkeys([*legend, *occurring]))
    colors = assign_colors(names, REGIME_COLORS, GROUP_PALETTE)
    classes = {name: _class_name(name, index) for index, name in enumerate(names)}
    body = [
        f"<h1>{escape(title)}</h1>",
        _legend_html(names, legend, classes),
        *(_rollout_html(index, rollout, classes) for index, rollout in enumerate(rollouts)),
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head><meta charset="utf-8">',
            f"<title>{escape(title)}</title>",
            f"<style>{STYLE}{_regime_style(names, classes, colors)}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
        ]
    )


def write_rollouts_html(
    rollouts: Sequence[Mapping[str, Any]], path: str | Path, **options: Any
) -> Path:
    """Write ``render_rollouts_html(rollouts, **options)`` to ``path`` (UTF-8); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_rollouts_html(rollouts, **options), encoding="utf-8")
    return path


def hover_text(
    regime: str, q_teacher: float, q_student: float, gap: float, p_student: float | None = None
) -> str:
    """The (unescaped) hover text of one token, e.g. ``regime=HT q_T=0.912 q_S=0.301 A=1.108``,
    then `` p=0.250`` when ``p_student`` is given; a value that is NaN (not recorded) reads
    ``n/a``."""
    text = f"regime={regime} q_T={_value(q_teacher)} q_S={_value(q_student)} A={_value(gap)}"
    return text if p_student is None else f"{text} p={_value(p_student)}"


def _value(value: float) -> str:
    value = float(value)
    return f"{value:.3f}" if not math.isnan(value) else "n/a"


def _check_rollout(index: int, rollout: Mapping[str, Any]) -> None:
    missing = [field for field in REQUIRED_FIELDS if field not in rollout]
    if missing:
        raise DataError(
            f"rollout {index} lacks {', '.join(missing)}; each rollout needs "
            f"{', '.join(REQUIRED_FIELDS)}"
        )
    present = [field for field in OPTIONAL_PER_TOKEN_FIELDS if field in rollout]
    lengths = {field: len(rollout[field]) for field in (*PER_TOKEN_FIELDS, *present)}
    if len(set(lengths.values())) > 1:
        raise DataError(
            f"rollout {index} has per-token lists of different lengths {lengths}; "
            "give one entry per token in each"
        )


def _class_name(name: str, index: int) -> str:
    # "_" is not alphanumeric, so the fallback can never equal another regime's class.
    return f"regime-{name}" if SAFE_CLASS_NAME.fullmatch(name) else f"regime-_{index}"


def _text_color(background: str) -> str:
    red, green, blue = (int(background[i : i + 2], 16) for i in (1, 3, 5))
    # Rec. 601 luma: dark backgrounds (HT's deep blue) need white text to stay readable.
    return "#000" if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else "#fff"


def _regime_style(names: list[str], classes: dict[str, str], colors: dict[str, str]) -> str:
    return "".join(
        f".{classes[name]} {{ background: {colors[name]}; color: {_text_color(colors[name])}; }}\n"
        for name in names
    )


def _legend_html(names: list[str], legend: Mapping[str, str], classes: dict[str, str]) -> str:
    rows = "".join(
        f'<span class="swatch {classes[name]}">{escape(name)}</span>'
        f"<span>{escape(legend.get(name, ''))}</span>"
        for name in names
    )
    return f'<h2>Regimes</h2>\n<div class="legend">{rows}</div>'


def _rollout_html(index: int, rollout: Mapping[str, Any], classes: dict[str, str]) -> str:
    parts = [f"<h2>Rollout {index}</h2>", f"<pre>{escape(str(rollout['prompt']))}</pre>"]
    if "answer" in rollout:
        parts.append(f"<p>answer: <code>{escape(str(rollout['answer']))}</code></p>")
    if "correct" in rollout:
        parts.append(_verdict_html(bool(rollout["correct"])))
    values = zip(*(rollout[field] for field in PER_TOKEN_FIELDS))
    p_student = rollout.get("p_student") or [None] * len(rollout["tokens"])
    spans = "".join(
        _token_span(str(token), str(regime), (q_teacher, q_student, gap, p), classes[str(regime)])
        for (token, regime, q_teacher, q_student, gap), p in zip(values, p_student)
    )
    parts.append(f'<div class="tokens">{spans}</div>')
    if "completion" in rollout:
        completion = escape(str(rollout["completion"]))
        parts.append(
            f"<details><summary>decoded completion</summary><pre>{completion}</pre></details>"
        )
    return f'<section class="rollout">{"".join(parts)}</section>'


def _verdict_html(correct: bool) -> str:
    return (
        '<p class="correct">\u2713 correct</p>' if correct else '<p class="wrong">\u2717 wrong</p>'
    )


def _token_span(token: str, regime: str, values: tuple, class_name: str) -> str:
    """One token's span; ``values``: its ``(q_teacher, q_student, gap, p_student or None)``."""
    hover = escape(hover_text(regime, *values), quote=True)
    # A newline token stays visible as ↵ and still breaks the line where the model broke it.
    text = f"{NEWLINE_MARK}<br>".join(escape(part) for part in token.split("\n"))
    return f'<span class="tok {class_name}" title="{hover}">{text}</span>'
