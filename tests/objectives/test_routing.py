"""DOPD's four-regime routing (dopd.objectives.routing) on hand-built cases: every branch, every
tie."""

import math

import pytest
import torch

from dopd import DOPDConfig, Thresholds, dopd_loss
from dopd.objectives.routing import HS, HT, LH, LL, assign_regimes

INF = float("inf")

# Thresholds A_bar = 1, q_S_bar + q_T_bar = 0.5 + 0.5 = 1 (exact in binary floating point).
UNIT = Thresholds(
    A=torch.tensor(1.0, dtype=torch.float64),
    q_student=torch.tensor(0.5, dtype=torch.float64),
    q_teacher=torch.tensor(0.5, dtype=torch.float64),
)

ROUTING_CASES = {
    # name: (gap, q_student, q_teacher, regime)
    "LH: low gap, confident": (0.5, 0.6, 0.6, LH),
    "LL: low gap, unsure": (0.5, 0.2, 0.3, LL),
    "HT: high gap, teacher more confident": (2.0, 0.1, 0.9, HT),
    "HS: high gap, student more confident": (2.0, 0.9, 0.1, HS),
    "tie A == A_bar goes high gap (HT)": (1.0, 0.1, 0.9, HT),
    "tie A == A_bar goes high gap (HS)": (1.0, 0.9, 0.1, HS),
    "tie q_S + q_T == sum of thresholds goes LH": (0.5, 0.25, 0.75, LH),
    "just below the sum goes LL": (0.5, 0.25, math.nextafter(0.75, 0.0), LL),
    "just below A_bar stays low gap": (math.nextafter(1.0, 0.0), 0.9, 0.1, LH),
    "tie q_T == q_S goes HT": (2.0, 0.4, 0.4, HT),
}


def test_assign_regimes_every_branch_and_tie():
    gap, q_student, q_teacher, expected = (
        torch.tensor(column, dtype=torch.float64) for column in zip(*ROUTING_CASES.values())
    )
    statistics = {"advantage_gap": gap, "q_student": q_student, "q_teacher": q_teacher}
    regimes = assign_regimes(statistics, UNIT)
    assert regimes.dtype == torch.long
    for name, got, want in zip(ROUTING_CASES, regimes.tolist(), expected.long().tolist()):
        assert got == want, name


def _row(probability_of_token_0: float) -> list[float]:
    """Logits of a 4-way distribution giving token 0 the probability shown."""
    rest = (1.0 - probability_of_token_0) / 3
    return [math.log(probability_of_token_0)] + [math.log(rest)] * 3


def _route(priv_row, teacher_row, thresholds: Thresholds | None) -> int:
    """Regime dopd_loss assigns to one token (id 0) followed by one padding position."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(1, 2, 4, generator=generator, dtype=torch.float64)  # [B, T, V]
    priv = torch.tensor([[priv_row, [0.0] * 4]], dtype=torch.float64)  # [B, T, V]
    teacher = torch.tensor([[teacher_row, [0.0] * 4]], dtype=torch.float64)  # [B, T, V]
    ids = torch.zeros(1, 2, dtype=torch.long)
    mask = torch.tensor([[True, False]])
    regimes = dopd_loss(student, priv, teacher, ids, mask, DOPDConfig(top_k=2), thresholds).regimes
    assert regimes[0, 1] == -1
    return int(regimes[0, 0])


@pytest.mark.parametrize(
    "priv_p,teacher_p,regime",
    [(0.6, 0.7, LH), (0.2, 0.25, LL), (0.1, 0.9, HT), (0.9, 0.1, HS)],
    ids=["LH", "LL", "HT", "HS"],
)
def test_dopd_loss_routes_every_branch(priv_p, teacher_p, regime):
    assert _route(_row(priv_p), _row(teacher_p), UNIT) == regime


# Rows with an exactly known sampled-token log-prob: one finite entry gives log q = 0 (q = 1);
# two equal finite entries give log q = -log 2, taken from torch's own log_softmax of that row.
CERTAIN = [0.0, -INF, -INF, -INF]
COIN = [0.0, 0.0, -INF, -INF]
LOG_TWO = -torch.tensor(COIN, dtype=torch.float64).log_softmax(-1)[0]


def _thresholds(gap, q_student, q_teacher) -> Thresholds:
    return Thresholds(
        *(torch.as_tensor(v, dtype=torch.float64) for v in (gap, q_student, q_teacher))
    )


def test_gap_tie_goes_high_gap_student_side():
    # q_S = 1, q_T = 1/2: A = log 2 = A_bar exactly, q_T < q_S -> HS (low gap would give LH).
    assert _route(CERTAIN, COIN, _thresholds(LOG_TWO, 0.0, 0.0)) == HS


def test_gap_tie_goes_high_gap_teacher_side():
    assert _route(COIN, CERTAIN, _thresholds(LOG_TWO, 0.0, 0.0)) == HT


def test_probability_sum_tie_goes_light_teacher():
    # q_S = q_T = 1, A = 0 < 1: LH iff 2 >= q_S_bar + q_T_bar = 0.5 + 1.5.
    assert _route(CERTAIN, CERTAIN, _thresholds(1.0, 0.5, 1.5)) == LH
    assert _route(CERTAIN, CERTAIN, _thresholds(1.0, 0.5, 1.5 + 1e-12)) == LL


def test_equal_probabilities_go_deep_teacher():
    # Identical rows: q_T == q_S and A = 0 = A_bar, so high gap and the HT side of the tie.
    row = [1.0, 0.5, -0.3, 2.0]
    assert _route(row, row, _thresholds(0.0, 0.0, 0.0)) == HT


def test_single_token_meets_its_own_thresholds():
    # With one valid token every threshold equals its own statistic: A == A_bar -> high gap.
    assert _route(_row(0.6), _row(0.7), None) == HT
    assert _route(_row(0.7), _row(0.6), None) == HS


def test_thresholds_may_be_python_floats():
    floats = Thresholds(A=1.0, q_student=0.5, q_teacher=0.5)
    for priv_p, teacher_p in ((0.6, 0.7), (0.2, 0.25), (0.1, 0.9), (0.9, 0.1)):
        assert _route(_row(priv_p), _row(teacher_p), floats) == _route(
            _row(priv_p), _row(teacher_p), UNIT
        )
