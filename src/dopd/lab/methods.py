"""The methods the lab compares, as named config variations, grouped into suites.

A method is a registry objective plus the config keys that make it that method (views, options),
and the hint form its privileged context uses. Suites mirror the paper's analyses (docs/method.md
§7–§8); ``main`` is the default benchmark, ``demo`` its fast subset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dopd.lab.task import Task


@dataclass(frozen=True)
class Method:
    """One trained configuration: ``name`` (report label), ``objective`` (registry name),
    ``options`` (objective keys), ``views`` (views keys) and the privileged ``hint_form``."""

    name: str
    objective: str
    options: dict[str, Any] = field(default_factory=dict)
    views: dict[str, Any] = field(default_factory=dict)
    hint_form: str | None = None


def _same(*names: str) -> list[Method]:
    return [Method(name, name) for name in names]


SUITES: dict[str, list[Method] | Callable[[Task], list[Method]]] = {
    # gkd is the positive control: the one objective of the zoo that closes a large part of the
    # gap on the gated testbeds (docs/lab-results.md), so a demo that shows no movement is broken.
    "demo": _same("vanilla_opd", "priv_teacher_opd", "self_distillation", "dopd", "gkd"),
    "main": _same(
        "vanilla_opd",
        "priv_teacher_opd",
        "self_distillation",
        "opsd",
        "sdpo",
        "gkd",
        "opcd",
        "eopd",
        "tip",
        "exopd",
        "dopd",
    )
    # Controls: does the gap carry routing information (shuffled: the same regime fractions,
    # dealt at random; oracle: the task's true classes), and what do one dense term from the
    # privileged or the plain teacher, or one fixed divergence, do alone.
    + [
        Method("shuffled_routing", "dopd_shuffled_routing"),
        Method("oracle_routing", "dopd_oracle_routing"),
        Method("no_routing", "dopd_no_routing"),
        Method("fixed_objective", "dopd_fixed_objective"),
        Method("js_full", "js_full"),
        Method("js_full/plain", "js_full", views={"teacher": "plain"}),
    ],
    # Privilege-illusion diagnostic: who teaches whom, with or without the hint.
    "illusion": [
        Method("T->S", "vanilla_opd"),
        Method("Priv.T->S", "priv_teacher_opd"),
        Method(
            "Priv.S->S",
            "uniform",
            {"target": "priv_student", "divergence": "reverse_kl", "granularity": "sampled"},
        ),
        Method("Priv.T->Priv.S", "priv_teacher_opd", views={"student_input": "privileged"}),
    ],
    # Token pruning: drop 20% of Priv.T->S tokens by privilege gap.
    "pruning": [
        Method("Priv.T->S", "priv_teacher_opd"),
        *[
            Method(f"drop_{rule}", "pruned_opd", {"prune": rule})
            for rule in ("high_gap", "low_gap", "random")
        ],
    ],
    # DOPD with regime subsets (the paper's Table 6) and its other ablations.
    "regimes": [
        Method("dopd", "dopd"),
        Method("teacher_regimes_only", "dopd_no_student_term"),
        Method("student_regimes_only", "dopd_no_teacher_term"),
        *[
            Method(
                f"without_{r}", "dopd", {"regimes": [x for x in ("LH", "LL", "HT", "HS") if x != r]}
            )
            for r in ("LH", "LL", "HT", "HS")
        ],
        Method("fixed_objective", "dopd_fixed_objective"),
        Method("no_routing", "dopd_no_routing"),
        Method("no_privilege", "dopd_no_privilege"),
    ],
    # Divergence x granularity grid with uniform routing (the paper's Table 7).
    "grid": [
        Method(f"{d}_{g}", f"{d}_{g}")
        for d in ("forward_kl", "reverse_kl", "js")
        for g in ("sampled", "topk", "full")
    ],
    # Privileged-input forms (the paper's Tables 4-5): one run per hint form of the task.
    "hints": lambda task: [
        Method(f"{name}/{form}", name, hint_form=form)
        for name in ("dopd", "priv_teacher_opd")
        for form in task.hint_forms
    ],
}


def suite_methods(name: str, task: Task) -> list[Method]:
    """The methods of suite ``name`` on ``task`` (a suite may depend on the task's hint forms)."""
    suite = SUITES[name]
    return suite(task) if callable(suite) else list(suite)
