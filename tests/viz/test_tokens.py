"""Tests of dopd.viz.tokens: the rollout page escapes every model and dataset string, shows each
token once with its regime's colour and hover values, and reaches for nothing outside itself."""

from __future__ import annotations

import re
from html import escape
from html.parser import HTMLParser

import pytest

from dopd.errors import DataError
from dopd.viz.plots import REGIME_COLORS
from dopd.viz.tokens import DEFAULT_LEGEND, render_rollouts_html, write_rollouts_html

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
PAYLOADS = (SCRIPT, IMG)
# (token, regime, q_T, q_S, A, expected hover text): values pinned so the rounding is checked.
TOKENS = [
    ("The", "LH", 0.9124, 0.8, 0.05, "regime=LH q_T=0.912 q_S=0.800 A=0.050"),
    (SCRIPT, "HT", 0.5, 0.3014, 1.1076, "regime=HT q_T=0.500 q_S=0.301 A=1.108"),
    ("\n", "LL", 0.01, 0.02, 0.0, "regime=LL q_T=0.010 q_S=0.020 A=0.000"),
    (IMG, "HS", 0.2, 0.9, 0.7, "regime=HS q_T=0.200 q_S=0.900 A=0.700"),
    ("end", IMG, 0.3, 0.3, 0.3, f"regime={IMG} q_T=0.300 q_S=0.300 A=0.300"),
]


class Page(HTMLParser):
    """Every start tag with its attributes, and the text of each ``span`` (nested ones too)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.spans: list[dict] = []
        self.open_spans: list[dict] = []
        self.text: list[str] = []
        self.style = ""
        self.in_style = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        self.in_style = tag == "style"
        if tag == "span":
            span = {
                "class": attributes.get("class", "").split(),
                "title": attributes.get("title"),
                "text": "",
                "children": [],
            }
            self.spans.append(span)
            self.open_spans.append(span)
        elif self.open_spans:
            self.open_spans[-1]["children"].append(tag)

    def handle_endtag(self, tag):
        self.in_style = False
        if tag == "span":
            self.open_spans.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self.in_style:
            self.style += data
        for span in self.open_spans:
            span["text"] += data


def rollout(**overrides):
    tokens, regimes, q_teacher, q_student, gap, _ = zip(*TOKENS)
    base = {
        "prompt": f"What is 1+2? {SCRIPT} {IMG}",
        "tokens": list(tokens),
        "regimes": list(regimes),
        "q_teacher": list(q_teacher),
        "q_student": list(q_student),
        "gap": list(gap),
        "answer": IMG,
        "correct": False,
        "completion": SCRIPT + IMG,
    }
    return base | overrides


@pytest.fixture
def page() -> Page:
    return Page(render_rollouts_html([rollout()], title=f"run {SCRIPT}{IMG}"))


def css_backgrounds(style: str) -> dict[str, str]:
    return dict(re.findall(r"\.(regime-\S+) \{ background: (#[0-9a-f]{6});", style))


def test_payloads_are_text_never_elements(page):
    html = render_rollouts_html([rollout()], title=f"run {SCRIPT}{IMG}")
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"script", "img", "iframe", "object"}
    assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs)
    text = "".join(page.text)
    # Title (twice), prompt, token, answer, completion, and legend / hover for the regime name.
    assert text.count(SCRIPT) >= 5 and text.count(IMG) >= 5
    assert SCRIPT not in html and "<img" not in html
    assert escape(SCRIPT, quote=True) in html and escape(IMG, quote=True) in html


def test_each_token_is_one_span_with_its_regime_colour_and_hover_values(page):
    token_spans = [span for span in page.spans if "tok" in span["class"]]
    assert len(token_spans) == len(TOKENS)
    swatches = {span["text"]: span["class"][1] for span in page.spans if "swatch" in span["class"]}
    backgrounds = css_backgrounds(page.style)
    for span, (token, regime, *_, hover) in zip(token_spans, TOKENS):
        assert span["text"] == token.replace("\n", "\u21b5")
        assert span["title"] == hover
        (regime_class,) = [name for name in span["class"] if name.startswith("regime-")]
        assert swatches[regime] == regime_class
        if regime in REGIME_COLORS:
            assert backgrounds[regime_class] == REGIME_COLORS[regime]
    assert len(set(backgrounds.values())) == len(backgrounds), "two regimes share a colour"


def test_newline_tokens_show_a_mark_and_break_the_line(page):
    (newline,) = [span for span in page.spans if (span["title"] or "").startswith("regime=LL")]
    assert newline["children"] == ["br"]
    assert sum(span["children"] == ["br"] for span in page.spans) == 1


def test_header_and_legend(page):
    text = "".join(page.text)
    assert "\u2717 wrong" in text and "\u2713 correct" not in text
    assert "answer: " + IMG in text
    legend = [span["text"] for span in page.spans if "swatch" in span["class"]]
    assert legend == ["LH", "LL", "HT", "HS", IMG]
    assert all(description in text for description in DEFAULT_LEGEND.values())
    correct = Page(render_rollouts_html([rollout(correct=True)], title="t"))
    assert "\u2713 correct" in "".join(correct.text)


def test_custom_legend_and_plain_group_names():
    groups = rollout(regimes=["high", "low", "high", "low", "mid"])
    page = Page(render_rollouts_html([groups], title="t", legend={"high": "big gap"}))
    legend = [span["text"] for span in page.spans if "swatch" in span["class"]]
    assert legend == ["high", "low", "mid"]
    assert "big gap" in "".join(page.text)
    backgrounds = css_backgrounds(page.style)
    assert set(backgrounds) == {"regime-high", "regime-low", "regime-mid"}
    assert len(set(backgrounds.values())) == 3


def test_page_is_self_contained(page):
    html = render_rollouts_html([rollout()], title="t")
    for _, attrs in page.tags:
        assert "src" not in attrs and "href" not in attrs
    assert "url(" not in html and "@import" not in html and "http" not in page.style
    assert html.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in html


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (rollout(gap=[0.1]), "different lengths"),
        ({k: v for k, v in rollout().items() if k != "q_student"}, "lacks q_student"),
    ],
)
def test_malformed_rollouts_are_refused(broken, message):
    with pytest.raises(DataError, match=message):
        render_rollouts_html([rollout(), broken], title="t")


def test_write_rollouts_html(tmp_path):
    path = write_rollouts_html([rollout()], tmp_path / "pages" / "r.html", title="t")
    assert path.read_text(encoding="utf-8") == render_rollouts_html([rollout()], title="t")
