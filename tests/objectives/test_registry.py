"""The objective registry (dopd.objectives.registry): every entry runs, presets compute what their
names say, and bad names or keys raise ConfigError with a suggestion."""

import math

import numpy as np
import pytest
import torch

from dopd.errors import ConfigError
from dopd.objectives.base import GRANULARITIES, TERM_KERNELS, objective_loss
from dopd.objectives.registry import OBJECTIVES, build_objective, get_spec
from dopd.objectives.routing import HT, LH, REGIMES
from tests.objectives import reference, tokenwise
from tests.objectives.batches import batch_loss, cyclic_classes, random_batch
from tests.tolerance import ANALYTIC, REORDERED, assert_close

DIVERGENCE_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "js": 0.5}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_entry_runs_forward_and_backward(name):
    batch = random_batch(3, 5, 12, seed=11, lengths=[5, 2, 0])
    batch.student.requires_grad_(True)
    out = batch_loss(get_spec(name).build(top_k=4), batch)
    out.loss.backward()
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert torch.isfinite(batch.student.grad).all() and batch.student.grad.abs().sum() > 0
    assert torch.isfinite(out.per_token_loss).all() and (out.per_token_loss[~batch.mask] == 0).all()
    assert (out.groups[~batch.mask] == -1).all() and (out.groups[batch.mask] >= 0).all()
    assert all(isinstance(value, float) and math.isfinite(value) for value in out.metrics.values())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_entry_runs_without_the_views_it_does_not_use(name):
    batch = random_batch(2, 3, 8, seed=12)
    objective = build_objective(name)
    out = objective_loss(
        objective,
        batch.student,
        batch.priv_student if objective.uses_priv_student else None,
        batch.teacher if objective.uses_teacher else None,
        batch.ids,
        batch.mask,
        reference_logits=batch.reference if objective.uses_reference else None,
        token_classes=cyclic_classes(batch.mask, len(objective.token_class_names))
        if objective.uses_token_classes
        else None,
    )
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_constant_views_are_exactly_the_views_the_loss_reads(name):
    """Each view outside ``constant_views`` can change without changing the loss; each view in
    it is refused when missing."""
    batch = random_batch(2, 4, 9, seed=13)
    objective = build_objective(name)
    classes = (
        cyclic_classes(batch.mask, len(objective.token_class_names))
        if objective.uses_token_classes
        else None
    )
    views = {
        "priv_student": batch.priv_student,
        "teacher": batch.teacher,
        "reference": batch.reference,
    }

    def loss(**replaced):
        given = {**views, **replaced}
        torch.manual_seed(0)  # shuffled routing deals its labels from the global generator
        return objective_loss(
            objective,
            batch.student,
            given["priv_student"],
            given["teacher"],
            batch.ids,
            batch.mask,
            reference_logits=given["reference"],
            token_classes=classes,
        ).loss

    expected = loss()
    for view in views:
        if view in objective.constant_views:
            with pytest.raises(ValueError, match=f"needs {view}_logits"):
                loss(**{view: None})
        else:
            other = random_batch(2, 4, 9, seed=99)
            assert torch.equal(loss(**{view: getattr(other, view)}), expected), view


def test_entries_declare_their_views():
    for spec in OBJECTIVES.values():
        assert spec.teacher_view in ("privileged", "plain") and spec.priv_student_view in (
            "privileged",
            "plain",
        )
        assert {"top_k", "topk_support", "topk_tail", "reduction", "temperature"} <= set(
            spec.config_keys()
        )
    assert (
        get_spec("vanilla_opd").teacher_view == "plain"
        and get_spec("priv_teacher_opd").teacher_view == "privileged"
    )
    assert get_spec("dopd_no_privilege").priv_student_view == "plain"


@pytest.mark.parametrize("divergence", sorted(DIVERGENCE_BETA))
@pytest.mark.parametrize("granularity", ["sampled", "topk", "full"])
def test_grid_entries_compute_the_divergence_they_name(divergence, granularity):
    batch = random_batch(3, 4, 10, seed=13)
    out = batch_loss(build_objective(f"{divergence}_{granularity}", top_k=4), batch)
    beta = DIVERGENCE_BETA[divergence]
    value = {
        "sampled": tokenwise.sampled_surrogate(beta),
        "topk": tokenwise.support_divergence(beta, 4),
        "full": tokenwise.full_divergence(beta),
    }[granularity]
    assert_close(out.per_token_loss, tokenwise.per_token(batch, value), ulps=REORDERED)


@pytest.mark.parametrize(
    "name,target,value",
    [
        ("self_distillation", "priv_student", tokenwise.support_divergence(1.0, 128)),
        ("opsd", "priv_student", tokenwise.full_divergence(0.5)),
        ("sdpo", "priv_student", tokenwise.support_divergence(0.5, 100, tail=True)),
        ("opcd", "teacher", tokenwise.support_divergence(1.0, 128)),
        ("dopd_no_routing", "teacher", tokenwise.support_divergence(0.5, 128)),
        ("priv_teacher_opd", "teacher", tokenwise.sampled_surrogate(1.0)),
        ("gkd", "teacher", tokenwise.full_divergence(0.5)),
    ],
)
def test_baseline_presets_match_their_formulas(name, target, value):
    batch = random_batch(2, 4, 150, seed=14)
    out = batch_loss(build_objective(name), batch)
    expected = tokenwise.per_token(batch, value, target)
    assert_close(out.per_token_loss, expected, ulps=REORDERED)


@pytest.mark.parametrize(
    "jsd_beta,divergence", [(0.0, "forward KL(T||S)"), (1.0, "reverse KL(S||T)"), (0.3, "JSD_0.3")]
)
def test_gkd_beta_end_points_are_forward_and_reverse_kl(jsd_beta, divergence):
    batch = random_batch(3, 4, 9, seed=15)
    out = batch_loss(build_objective("gkd", jsd_beta=jsd_beta), batch)

    def by_hand(student, teacher, token):
        s, t = reference.softmax(student), reference.softmax(teacher)
        if jsd_beta == 0.0:
            return sum(t_v * math.log(t_v / s_v) for s_v, t_v in zip(s, t))
        if jsd_beta == 1.0:
            return sum(s_v * math.log(s_v / t_v) for s_v, t_v in zip(s, t))
        return reference.gjsd(s, t, jsd_beta)

    assert_close(
        out.per_token_loss, tokenwise.per_token(batch, by_hand), ulps=REORDERED, msg=divergence
    )


def test_dopd_ablation_presets():
    batch = random_batch(4, 6, 11, seed=2, lengths=[6, 3, 0, 5])
    full = batch_loss(build_objective("dopd", top_k=4), batch)
    for name, enabled in (
        ("dopd_no_teacher_term", {"LL", "HS"}),
        ("dopd_no_student_term", {"LH", "HT"}),
    ):
        out = batch_loss(build_objective(name, top_k=4), batch)
        assert torch.equal(out.groups, full.groups)
        kept = torch.tensor(
            [REGIMES[g] in enabled if g >= 0 else False for g in out.groups.flatten().tolist()]
        ).view_as(out.groups)
        assert torch.equal(
            out.per_token_loss,
            torch.where(kept, full.per_token_loss, torch.zeros_like(full.per_token_loss)),
        )

    fixed = batch_loss(build_objective("dopd_fixed_objective", top_k=4), batch)
    student, priv, teacher, _, mask = batch.numpy()
    weights = [0.6, 0.3, 1.0, 0.6]
    for b, t in zip(*np.nonzero(mask)):
        regime = int(fixed.groups[b, t])
        target = teacher[b, t] if regime in (LH, HT) else priv[b, t]
        support = reference.topk_ids(student[b, t], 4)
        js, _ = reference.support_divergence(student[b, t], target, support, False, reference.JS)
        assert_close(fixed.per_token_loss[b, t], weights[regime] * js, ulps=ANALYTIC)


def test_unknown_objective_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'vanilla_opd'"):
        get_spec("vanila_opd")
    with pytest.raises(ConfigError, match="objective.name='zzz'"):
        build_objective("zzz")


def test_unknown_objective_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="objective.betta_light.*did you mean 'beta_light'"):
        build_objective("dopd", betta_light=0.5)
    with pytest.raises(ConfigError, match="objective.qqq.*valid keys"):
        build_objective("eopd", qqq=1)


@pytest.mark.parametrize(
    "name,overrides,key",
    [
        ("gkd", {"jsd_beta": 1.5}, "jsd_beta"),
        ("uniform", {"target": "reference"}, "target"),
        ("uniform", {"granularity": "dense"}, "granularity"),
        ("eopd", {"entropy_threshold": -1.0}, "entropy_threshold"),
        ("tip", {"keep": ("nope",)}, "keep"),
        ("tip", {"split_quantile": 2.0}, "split_quantile"),
        ("exopd", {"extrapolation": -0.5}, "extrapolation"),
        ("dopd", {"beta_weak": 0.9}, "beta_weak"),
    ],
)
def test_bad_override_values_raise_config_error_naming_the_key(name, overrides, key):
    with pytest.raises(ConfigError, match=key):
        build_objective(name, **overrides)


def test_every_granularity_has_one_kernel():
    assert tuple(TERM_KERNELS) == GRANULARITIES
