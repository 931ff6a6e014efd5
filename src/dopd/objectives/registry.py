"""Every objective by name: the config's ``objective.name`` picks an entry, the remaining keys of
``objective`` override its defaults.

Each entry also says which input the teacher sees by default (``teacher_view``) and whether the
privileged student sees the privileged context (``priv_student_view``); the trainer uses them
unless its own config says otherwise.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any

from dopd.errors import ConfigError
from dopd.objectives.base import Objective, ObjectiveOptions
from dopd.objectives.dopd import DOPD, DOPDConfig
from dopd.objectives.zoo import (
    EOPD,
    TIP,
    EOPDConfig,
    ExOPD,
    ExOPDConfig,
    Pruned,
    PrunedConfig,
    TIPConfig,
    Uniform,
    UniformConfig,
)


@dataclass(frozen=True)
class ObjectiveSpec:
    """A named objective: its class, its config class and the defaults the name implies."""

    name: str
    objective_class: type[Objective]
    config_class: type[ObjectiveOptions]
    defaults: dict[str, Any] = field(default_factory=dict)
    teacher_view: str = "privileged"
    priv_student_view: str = "privileged"
    summary: str = ""

    def config_keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.config_class))

    def build(self, **overrides: Any) -> Objective:
        """The objective with ``overrides`` applied to this entry's defaults."""
        keys = self.config_keys()
        for key in overrides:
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = (
                    f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(keys)}"
                )
                raise ConfigError(
                    f"objective.{key} is not an option of objective {self.name!r}{hint}"
                )
        return self.objective_class(self.config_class(**{**self.defaults, **overrides}))


def _uniform(
    name: str,
    target: str,
    divergence: str,
    granularity: str,
    teacher_view: str,
    summary: str,
    **extra: Any,
) -> ObjectiveSpec:
    defaults = {"target": target, "divergence": divergence, "granularity": granularity, **extra}
    return ObjectiveSpec(name, Uniform, UniformConfig, defaults, teacher_view, summary=summary)


def _grid() -> list[ObjectiveSpec]:
    return [
        _uniform(
            f"{div}_{gran}",
            "teacher",
            div,
            gran,
            "privileged",
            f"uniform {div} over {gran} support, privileged teacher",
        )
        for div in ("forward_kl", "reverse_kl", "js")
        for gran in ("sampled", "topk", "full")
    ]


_SPECS = [
    ObjectiveSpec(
        "dopd", DOPD, DOPDConfig, summary="DOPD: four-regime routing by the privilege advantage gap"
    ),
    ObjectiveSpec(
        "dopd_no_teacher_term",
        DOPD,
        DOPDConfig,
        {"regimes": ("LL", "HS")},
        summary="DOPD ablation: self-anchor regimes only",
    ),
    ObjectiveSpec(
        "dopd_no_student_term",
        DOPD,
        DOPDConfig,
        {"regimes": ("LH", "HT")},
        summary="DOPD ablation: teacher regimes only",
    ),
    ObjectiveSpec(
        "dopd_fixed_objective",
        DOPD,
        DOPDConfig,
        {"fixed_divergence": "js", "fixed_granularity": "topk"},
        summary="DOPD ablation: no adaptive objectives (one divergence for every regime)",
    ),
    ObjectiveSpec(
        "dopd_shuffled_routing",
        DOPD,
        DOPDConfig,
        {"routing": "shuffled"},
        summary="DOPD control: regime labels permuted at random among tokens (same fractions)",
    ),
    ObjectiveSpec(
        "dopd_oracle_routing",
        DOPD,
        DOPDConfig,
        {"routing": "oracle"},
        summary="DOPD control: regimes from the task's true token classes",
    ),
    ObjectiveSpec(
        "dopd_no_privilege",
        DOPD,
        DOPDConfig,
        teacher_view="plain",
        priv_student_view="plain",
        summary="DOPD ablation: no privileged input for the teacher or the privileged student",
    ),
    _uniform(
        "dopd_no_routing",
        "teacher",
        "js",
        "topk",
        "privileged",
        "DOPD ablation: uniform JS top-K from the privileged teacher",
    ),
    _uniform(
        "vanilla_opd",
        "teacher",
        "reverse_kl",
        "sampled",
        "plain",
        "vanilla OPD: sampled-token reverse-KL policy gradient",
    ),
    _uniform(
        "priv_teacher_opd",
        "teacher",
        "reverse_kl",
        "sampled",
        "privileged",
        "Priv.T->S: vanilla OPD with the privileged teacher",
    ),
    _uniform(
        "self_distillation",
        "priv_student",
        "reverse_kl",
        "topk",
        "privileged",
        "self-distillation to the privileged student",
    ),
    _uniform(
        "opsd",
        "priv_student",
        "js",
        "full",
        "privileged",
        "OPSD: full-vocabulary JSD to the privileged student",
    ),
    _uniform(
        "sdpo",
        "priv_student",
        "js",
        "topk",
        "privileged",
        "SDPO-style: top-100 JSD with tail to the privileged student",
        top_k=100,
        topk_tail=True,
    ),
    _uniform(
        "gkd",
        "teacher",
        "gjsd",
        "full",
        "plain",
        "GKD: generalized JSD_beta, full vocabulary",
        jsd_beta=0.5,
    ),
    _uniform(
        "opcd",
        "teacher",
        "reverse_kl",
        "topk",
        "privileged",
        "OPCD: top-K reverse KL to the teacher with context",
    ),
    ObjectiveSpec(
        "eopd",
        EOPD,
        EOPDConfig,
        teacher_view="plain",
        summary="EOPD: reverse KL + forward KL on high teacher-entropy tokens",
    ),
    ObjectiveSpec(
        "tip",
        TIP,
        TIPConfig,
        teacher_view="plain",
        summary="TIP: train only on kept student-entropy x gap quadrants",
    ),
    ObjectiveSpec(
        "exopd",
        ExOPD,
        ExOPDConfig,
        teacher_view="plain",
        summary="ExOPD: reverse KL to the reward-extrapolated target",
    ),
    ObjectiveSpec(
        "pruned_opd",
        Pruned,
        PrunedConfig,
        {"target": "teacher", "divergence": "reverse_kl", "granularity": "sampled"},
        summary="Priv.T->S with 20% of tokens dropped by privilege gap (high, low or random)",
    ),
    ObjectiveSpec(
        "uniform", Uniform, UniformConfig, summary="one configurable term for every token"
    ),
    *_grid(),
]

OBJECTIVES: dict[str, ObjectiveSpec] = {spec.name: spec for spec in _SPECS}


def get_spec(name: str) -> ObjectiveSpec:
    """The registry entry ``name``; a ``ConfigError`` with a suggestion if there is none."""
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, OBJECTIVES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(OBJECTIVES)}"
        raise ConfigError(f"objective.name={name!r} is not a known objective; {hint}")
    return OBJECTIVES[name]


def build_objective(name: str, **overrides: Any) -> Objective:
    """The objective registered as ``name`` with config ``overrides``."""
    return get_spec(name).build(**overrides)
