"""DOPD's two routing controls (``DOPDConfig.routing``): ``shuffled`` deals the gap rule's regime
labels to the tokens at random, ``oracle`` reads them off the tokens' true classes. Both are
checked against the numpy reference DOPD of reference.py with the regimes applied by hand."""

import numpy as np
import pytest
import torch

from dopd import DOPDConfig, dopd_loss
from dopd.config import load_config
from dopd.errors import ConfigError
from dopd.objectives.dopd import DEFAULT_ORACLE_REGIMES, DOPD
from dopd.objectives.registry import build_objective, get_spec
from dopd.objectives.routing import HS, HT, LH, LL, REGIMES
from dopd.objectives.views import TokenViews
from tests.objectives import reference
from tests.objectives.batches import batch_loss, cyclic_classes, random_batch
from tests.tolerance import ANALYTIC, assert_close

BETAS = {"beta_light": 0.7, "beta_weak": 0.2, "beta_deep": 1.3}
REQUIRED = ["student.path=student-model", "teacher.path=teacher-model", "data.train=train.jsonl"]


def _all_regimes_batch():
    """4 sequences (one empty) whose 14 valid tokens fall in every regime (4 LH, 4 LL, 2 HT,
    4 HS)."""
    batch = random_batch(4, 6, 11, seed=2, lengths=[6, 3, 0, 5])
    batch.student.requires_grad_(True)
    return batch


def _reference(config: DOPDConfig) -> reference.DOPDReference:
    return reference.DOPDReference(top_k=config.top_k, reduction=config.reduction, **BETAS)


def _by_hand(config: DOPDConfig, batch, regimes: np.ndarray):
    """``(loss, [B, T, V] grad, [B, T] per-token loss)`` of the reference DOPD terms applied to
    the given ``[B, T]`` regimes (-1 at padding)."""
    student, priv, teacher, _, mask = batch.numpy()
    model = _reference(config)
    per_token, token_grads = np.zeros(mask.shape), np.zeros(student.shape)
    for b, t in zip(*np.nonzero(mask)):
        per_token[b, t], token_grads[b, t] = model.token(
            student[b, t], priv[b, t], teacher[b, t], int(regimes[b, t])
        )
    reduce = (
        reference.sequence_mean if config.reduction == "sequence_mean" else reference.token_mean
    )
    grad = token_grads * reference.reduction_weights(mask, config.reduction)[..., None]
    return reduce(per_token, mask), grad, per_token


def _assert_matches_by_hand(out, batch, config: DOPDConfig, regimes: np.ndarray) -> None:
    """Loss, gradient and per-token loss of ``out`` (after ``backward``) equal the reference's
    with ``regimes`` imposed."""
    loss, grad, per_token = _by_hand(config, batch, regimes)
    assert_close(out.loss, loss, ulps=ANALYTIC)
    assert_close(batch.student.grad, grad, ulps=ANALYTIC)
    assert_close(out.per_token_loss, per_token, ulps=ANALYTIC)


def _run(batch, config, **kwargs):
    return dopd_loss(
        batch.student, batch.priv_student, batch.teacher, batch.ids, batch.mask, config, **kwargs
    )


# -- shuffled ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffled_routing_keeps_the_gap_rules_regime_counts(seed):
    batch = _all_regimes_batch()
    gap = _run(batch, DOPDConfig(top_k=4))
    torch.manual_seed(seed)
    shuffled = _run(batch, DOPDConfig(top_k=4, routing="shuffled"))
    mask = batch.mask
    assert torch.equal(
        torch.bincount(shuffled.regimes[mask], minlength=4),
        torch.bincount(gap.regimes[mask], minlength=4),
    )
    assert (shuffled.regimes[~mask] == -1).all()
    for regime in REGIMES:
        assert shuffled.metrics[f"fraction/{regime}"] == gap.metrics[f"fraction/{regime}"]
    # The statistics and thresholds are the gap rule's; only the labels moved.
    assert shuffled.metrics["threshold/A"] == gap.metrics["threshold/A"]


def test_shuffled_routing_moves_labels_between_tokens():
    batch = _all_regimes_batch()
    gap = _run(batch, DOPDConfig(top_k=4)).regimes
    torch.manual_seed(0)
    first = _run(batch, DOPDConfig(top_k=4, routing="shuffled")).regimes
    torch.manual_seed(0)
    again = _run(batch, DOPDConfig(top_k=4, routing="shuffled")).regimes
    assert set(gap[batch.mask].tolist()) == {LH, LL, HT, HS}
    assert not torch.equal(first, gap)
    assert torch.equal(first, again)  # the global RNG's seed fixes the draw


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_shuffled_routing_loss_is_the_reference_with_the_permuted_regimes(reduction):
    batch = _all_regimes_batch()
    config = DOPDConfig(top_k=4, routing="shuffled", reduction=reduction, **BETAS)
    torch.manual_seed(3)
    out = _run(batch, config)
    out.loss.backward()
    # By hand: the reference's gap-rule regimes of the valid tokens (row-major), permuted by the
    # draw the same seed gives.
    _, _, gap_regimes, _ = _reference(config)(*batch.numpy())
    valid = batch.mask.numpy()
    torch.manual_seed(3)
    permutation = torch.randperm(int(valid.sum())).numpy()
    regimes = np.full(valid.shape, -1)
    regimes[valid] = gap_regimes[valid][permutation]
    assert not np.array_equal(regimes, gap_regimes)
    np.testing.assert_array_equal(out.regimes.numpy(), regimes)
    _assert_matches_by_hand(out, batch, config, regimes)


def test_shuffled_routing_registry_entry():
    spec = get_spec("dopd_shuffled_routing")
    assert spec.objective_class is DOPD and spec.teacher_view == "privileged"
    assert build_objective("dopd_shuffled_routing").config.routing == "shuffled"
    assert not build_objective("dopd_shuffled_routing").uses_token_classes


# -- oracle -----------------------------------------------------------------------------------


def test_oracle_assign_returns_each_class_regime():
    objective = build_objective("dopd_oracle_routing")
    names = objective.token_class_names
    assert names == tuple(DEFAULT_ORACLE_REGIMES)
    classes = ["capability", "format", "unavailable_info", "skill", "capability"]
    classes += ["learnable_info", "order_forced"]
    token_classes = torch.tensor([names.index(name) for name in classes])  # [N]
    views = TokenViews({}, torch.zeros(len(classes), dtype=torch.long), token_classes)
    regimes = objective.assign(views, {}, None)
    assert regimes.dtype == torch.long
    assert regimes.tolist() == [HT, LH, HS, LH, HT, LH, LH]


def test_oracle_regimes_map_any_classes_to_any_regimes():
    config = DOPDConfig(
        top_k=4, routing="oracle", oracle_regimes={"plan": "LL", "result": "HT", "x": "HS"}
    )
    batch = _all_regimes_batch()
    classes = torch.tensor(
        [[0, 1, 2, 0, 1, 2], [2, 2, 1, -1, -1, -1], [-1] * 6, [0, 0, 1, 1, 2, -1]]
    )  # [B, T]
    out = _run(batch, config, token_classes=classes)
    expected = torch.tensor([LL, HT, HS]).index_select(0, classes.clamp_min(0).flatten())
    expected = expected.view_as(classes).masked_fill(~batch.mask, -1)
    assert torch.equal(out.regimes, expected)
    count = batch.mask.sum().item()
    for regime, index in zip(REGIMES, range(4)):
        share = (expected == index).sum().item() / count
        # A fraction is a float32 division, like every objective's.
        assert_close(out.metrics[f"fraction/{regime}"], share, ulps=1, dtype=torch.float32)


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_oracle_routing_loss_is_the_reference_with_the_class_regimes(reduction):
    batch = _all_regimes_batch()
    config = DOPDConfig(top_k=4, routing="oracle", reduction=reduction, **BETAS)
    classes = cyclic_classes(batch.mask, len(DEFAULT_ORACLE_REGIMES))
    out = _run(batch, config, token_classes=classes)
    out.loss.backward()
    table = [REGIMES.index(regime) for regime in DEFAULT_ORACLE_REGIMES.values()]
    regimes = np.array([[table[c] if c >= 0 else -1 for c in row] for row in classes.tolist()])
    np.testing.assert_array_equal(out.regimes.numpy(), regimes)
    _assert_matches_by_hand(out, batch, config, regimes)


def test_oracle_routing_needs_valid_token_classes():
    batch = _all_regimes_batch()
    objective = build_objective("dopd_oracle_routing", top_k=4)
    with pytest.raises(ValueError, match="pass token_classes"):
        batch_loss(objective, batch, token_classes=None)
    too_large = cyclic_classes(batch.mask, 6).masked_fill(batch.mask, 6)
    with pytest.raises(ValueError, match=r"must lie in 0 \.\. 5"):
        batch_loss(objective, batch, token_classes=too_large)
    # Padding is never read: a class of -1 at a valid position is refused.
    with pytest.raises(ValueError, match="must lie in"):
        batch_loss(objective, batch, token_classes=torch.full(batch.mask.shape, -1))
    with pytest.raises(ValueError, match="must be long of shape"):
        batch_loss(objective, batch, token_classes=torch.zeros(2, 2, dtype=torch.long))


def test_gap_routing_ignores_token_classes():
    batch = _all_regimes_batch()
    plain = batch_loss(build_objective("dopd", top_k=4), batch)
    given = batch_loss(
        build_objective("dopd", top_k=4), batch, token_classes=torch.zeros(2, 2, dtype=torch.long)
    )
    assert torch.equal(plain.groups, given.groups)
    assert plain.loss.item() == given.loss.item()


def test_oracle_routing_registry_entry():
    spec = get_spec("dopd_oracle_routing")
    assert spec.objective_class is DOPD and spec.teacher_view == "privileged"
    objective = build_objective("dopd_oracle_routing", oracle_regimes={"a": "LL"})
    assert objective.uses_token_classes and objective.token_class_names == ("a",)
    assert not build_objective("dopd").uses_token_classes
    assert build_objective("dopd", oracle_regimes={"a": "LL"}).token_class_names == ()


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,message",
    [
        ({"routing": "random"}, "routing='random' is not allowed; use one of 'gap', 'shuffled'"),
        ({"oracle_regimes": {"capability": "HX"}}, "oracle_regimes.capability='HX'"),
        ({"oracle_regimes": {"skill": "LH", "format": None}}, "oracle_regimes.format=None"),
        ({"oracle_regimes": ["LH"]}, "must be a mapping of token class names"),
        ({"oracle_regimes": {}}, "maps no token class"),
        ({"oracle_regimes": {3: "LH"}}, "must be a non-empty token class name"),
    ],
)
def test_bad_routing_options_raise_config_error_naming_the_key(options, message):
    with pytest.raises(ConfigError, match=message):
        DOPDConfig(**options)


@pytest.mark.parametrize(
    "override,message",
    [
        ("objective.routing=oracles", r"objective\.routing='oracles' is not allowed"),
        ("objective.oracle_regimes={capability: XX}", r"objective\.oracle_regimes\.capability="),
        ("objective.oracle_regimes.skill=1", r"objective\.oracle_regimes\.skill: expected str"),
    ],
)
def test_bad_routing_overrides_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*REQUIRED, override])


def test_oracle_regimes_load_from_yaml_and_replace_the_default(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "objective:\n  name: dopd_oracle_routing\n  oracle_regimes: {plan: LL, result: HT}\n"
    )
    config = load_config(path, REQUIRED)
    objective = config.objective.build()
    assert objective.config.oracle_regimes == {"plan": "LL", "result": "HT"}
    assert objective.token_class_names == ("plan", "result")
    assert DOPDConfig().oracle_regimes == DEFAULT_ORACLE_REGIMES
    assert DOPDConfig().oracle_regimes is not DOPDConfig().oracle_regimes
