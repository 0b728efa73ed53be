"""Tests of the ranking losses: hand-computed values, brute-force references, interface and registry."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import vsekit.losses.hinge
import vsekit.losses.infonce
import vsekit.losses.lseh
from vsekit.errors import ConfigError
from vsekit.losses import (
    LOSSES,
    HingeRankingLoss,
    InfoNCELoss,
    LSEHLoss,
    WarmupHingeLoss,
    build_loss,
    semantic_margins,
    semantic_similarity,
)
from vsekit.models.similarity import order_sim

# --------------------------------------------------------------------------------------------------
# Hinge (VSE0 / VSE++)
# --------------------------------------------------------------------------------------------------

# Row = image, column = caption; diagonal d = (0.9, 0.6, 0.7).
SIM3 = torch.tensor([[0.90, 0.50, 0.80],
                     [0.50, 0.60, 0.30],
                     [0.75, 0.65, 0.70]])


def test_hinge_hand_computed_sum_and_max():
    # margin 0.2. cost_s[i, j] = [0.2 + S_ij - d_i]_+ :
    #   row 0: j=1: 0.2+0.5-0.9  = -0.2 -> 0      j=2: 0.2+0.8-0.9  = 0.1
    #   row 1: j=0: 0.2+0.5-0.6  =  0.1           j=2: 0.2+0.3-0.6  = -0.1 -> 0
    #   row 2: j=0: 0.2+0.75-0.7 =  0.25          j=1: 0.2+0.65-0.7 = 0.15
    #   sum = 0.1+0.1+0.25+0.15 = 0.6;  row maxima 0.1+0.1+0.25 = 0.45
    # cost_im[i, j] = [0.2 + S_ij - d_j]_+ :
    #   col 0: i=1: 0.2+0.5-0.9  = -0.2 -> 0      i=2: 0.2+0.75-0.9 = 0.05
    #   col 1: i=0: 0.2+0.5-0.6  =  0.1           i=2: 0.2+0.65-0.6 = 0.25
    #   col 2: i=0: 0.2+0.8-0.7  =  0.3           i=1: 0.2+0.3-0.7  = -0.2 -> 0
    #   sum = 0.05+0.1+0.25+0.3 = 0.7;  column maxima 0.05+0.25+0.3 = 0.6
    ids = torch.tensor([0, 1, 2])
    vse0 = HingeRankingLoss(margin=0.2, reduction="sum")(SIM3, ids)
    vsepp = HingeRankingLoss(margin=0.2, reduction="max")(SIM3, ids)
    assert vse0.ndim == 0 and vse0.dtype == torch.float32
    assert vse0.item() == pytest.approx(0.6 + 0.7, abs=1e-6)
    assert vsepp.item() == pytest.approx(0.45 + 0.6, abs=1e-6)


def test_hinge_same_image_mask():
    # Slots 0 and 1 show the same image: pairs (0, 1) and (1, 0) are no longer negatives.
    # From the table above, the nonzero hinges on those pairs are cost_s[1, 0] = 0.1 and cost_im[0, 1] = 0.1.
    #   sum: cost_s 0.6 - 0.1 = 0.5, cost_im 0.7 - 0.1 = 0.6            -> 1.1
    #   max: rows (0.1, 0, 0.25) = 0.35, cols (0.05, 0.25, 0.3) = 0.6   -> 0.95
    ids = torch.tensor([7, 7, 3])
    assert HingeRankingLoss(reduction="sum", mask="same_image")(SIM3, ids).item() == pytest.approx(1.1, abs=1e-6)
    assert HingeRankingLoss(reduction="max", mask="same_image")(SIM3, ids).item() == pytest.approx(0.95, abs=1e-6)
    # The default (VSE++) mask ignores image ids: duplicates stay negatives.
    assert HingeRankingLoss(reduction="sum")(SIM3, ids).item() == pytest.approx(1.3, abs=1e-6)
    assert HingeRankingLoss(reduction="max")(SIM3, ids).item() == pytest.approx(1.05, abs=1e-6)


def test_order_similarity_and_hinge_on_it():
    images = torch.tensor([[4.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    captions = torch.tensor([[3.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    # S_ij = -|| max(0, c_j - v_i) ||_2
    #   i=0, v=(4,0): c0-v=(-1,0)->(0,0): 0   c1-v=(-4,4)->(0,4): -4   c2-v=(-3,1)->(0,1): -1
    #   i=1, v=(0,3): c0-v=(3,-3)->(3,0): -3  c1-v=(0,1): -1           c2-v=(1,-2)->(1,0): -1
    #   i=2, v=(1,1): c0-v=(2,-1)->(2,0): -2  c1-v=(-1,3)->(0,3): -3   c2-v=(0,0): 0
    expected = torch.tensor([[0.0, -4.0, -1.0], [-3.0, -1.0, -1.0], [-2.0, -3.0, 0.0]])
    sim = order_sim(images, captions, chunk=2)
    torch.testing.assert_close(sim, expected)
    # margin 1.5, d = (0, -1, 0)
    #   cost_s : row 0: j1 1.5-4-0 <0 ; j2 1.5-1-0 = 0.5 | row 1: j0 1.5-3+1 <0 ; j2 1.5-1+1 = 1.5
    #            row 2: j0 1.5-2 <0 ; j1 1.5-3 <0        -> sum 2.0, row maxima 0.5+1.5+0 = 2.0
    #   cost_im: col 0: i1 1.5-3 <0 ; i2 1.5-2 <0        | col 1: i0 1.5-4+1 <0 ; i2 1.5-3+1 <0
    #            col 2: i0 1.5-1 = 0.5 ; i1 1.5-1 = 0.5  -> sum 1.0, column maxima 0+0+0.5 = 0.5
    ids = torch.arange(3)
    assert HingeRankingLoss(margin=1.5, reduction="sum")(sim, ids).item() == pytest.approx(3.0)
    assert HingeRankingLoss(margin=1.5, reduction="max")(sim, ids).item() == pytest.approx(2.5)


def test_hinge_is_summed_not_averaged():
    # Two copies of the same 3-slot problem side by side (block diagonal, far-apart blocks): the loss doubles.
    sim6 = torch.full((6, 6), -10.0)
    sim6[:3, :3] = SIM3
    sim6[3:, 3:] = SIM3
    loss = HingeRankingLoss(reduction="max")(sim6, torch.arange(6))
    assert loss.item() == pytest.approx(2 * 1.05, abs=1e-5)


def test_warmup_schedule():
    ids = torch.arange(3)
    loss_fn = WarmupHingeLoss(margin=0.2, warmup_epochs=2)
    assert loss_fn(SIM3, ids).item() == pytest.approx(1.3, abs=1e-6)  # epoch 0 before any set_epoch
    for epoch, expected in [(0, 1.3), (1, 1.3), (2, 1.05), (5, 1.05)]:
        loss_fn.set_epoch(epoch)
        assert loss_fn(SIM3, ids).item() == pytest.approx(expected, abs=1e-6), epoch
    no_warmup = WarmupHingeLoss(warmup_epochs=0)
    assert no_warmup(SIM3, ids).item() == pytest.approx(1.05, abs=1e-6)


def test_bad_options_and_shapes():
    with pytest.raises(ValueError, match="reduction"):
        HingeRankingLoss(reduction="mean")
    with pytest.raises(ValueError, match="mask"):
        HingeRankingLoss(mask="all")
    with pytest.raises(ValueError, match="square"):
        HingeRankingLoss()(torch.zeros(3, 4), torch.arange(3))
    with pytest.raises(ValueError, match="image_ids"):
        HingeRankingLoss()(torch.zeros(3, 3), torch.arange(4))
    with pytest.raises(ValueError, match="semantic"):
        LSEHLoss(semantic="dot")
    with pytest.raises(ValueError, match="image_semantics"):
        LSEHLoss(image_semantics="mean")
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)


# --------------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------------


def _cross_entropy_by_hand(logit_rows: list[list[float]], allowed=None) -> float:
    """Mean over rows r of -log softmax(row r)[r], optionally over the allowed columns only."""
    total = 0.0
    for r, row in enumerate(logit_rows):
        cols = [c for c in range(len(row)) if allowed is None or allowed(r, c)]
        log_z = math.log(sum(math.exp(row[c]) for c in cols))
        total += log_z - row[r]
    return total / len(logit_rows)


def test_infonce_matches_hand_cross_entropy():
    tau = 0.5
    s = SIM3.tolist()
    logits = [[x / tau for x in row] for row in s]
    logits_t = [[s[i][j] / tau for i in range(3)] for j in range(3)]
    expected = 0.5 * (_cross_entropy_by_hand(logits) + _cross_entropy_by_hand(logits_t))
    # Spot check of one term written out: row 0 of logits = (1.8, 1.0, 1.6), target 0:
    #   e^1.8 + e^1.0 + e^1.6 = 6.0496 + 2.7183 + 4.9530 = 13.7209; ln 13.7209 = 2.6189; 2.6189 - 1.8 = 0.8189
    row0 = math.log(math.exp(1.8) + math.exp(1.0) + math.exp(1.6)) - 1.8
    assert row0 == pytest.approx(0.8189, abs=1e-4)
    assert _cross_entropy_by_hand([logits[0]]) == pytest.approx(row0)
    for learnable in (True, False):
        loss = InfoNCELoss(temperature=tau, learnable=learnable)(SIM3, torch.arange(3))
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_infonce_same_image_mask_removes_duplicates_from_softmax():
    tau = 0.25
    ids = [4, 4, 9]
    s = SIM3.tolist()
    logits = [[x / tau for x in row] for row in s]
    logits_t = [[s[i][j] / tau for i in range(3)] for j in range(3)]

    def allowed(r: int, c: int) -> bool:
        return r == c or ids[r] != ids[c]

    expected = 0.5 * (_cross_entropy_by_hand(logits, allowed) + _cross_entropy_by_hand(logits_t, allowed))
    plain = 0.5 * (_cross_entropy_by_hand(logits) + _cross_entropy_by_hand(logits_t))
    masked = InfoNCELoss(temperature=tau, mask="same_image")(SIM3, torch.tensor(ids))
    default = InfoNCELoss(temperature=tau)(SIM3, torch.tensor(ids))
    assert masked.item() == pytest.approx(expected, rel=1e-5)
    assert default.item() == pytest.approx(plain, rel=1e-5)
    assert expected < plain


def test_infonce_temperature_is_learned_and_clamped():
    loss_fn = InfoNCELoss(temperature=0.07)
    assert loss_fn.temperature == pytest.approx(0.07, rel=1e-5)
    assert [name for name, _ in loss_fn.named_parameters()] == ["logit_scale"]
    sim = F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    sim = (sim @ sim.roll(1, 0).T).requires_grad_()
    loss_fn(sim, torch.arange(5)).backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad.abs().item() > 0
    assert sim.grad is not None

    clamped = InfoNCELoss(temperature=1e-3, max_logit_scale=100.0)
    assert clamped.temperature == pytest.approx(0.01, rel=1e-5)  # 1/τ = 1000 clamped to 100
    clamped(sim.detach(), torch.arange(5)).backward()
    assert clamped.logit_scale.grad.item() == 0.0

    fixed = InfoNCELoss(temperature=0.1, learnable=False)
    assert list(fixed.parameters()) == [] and "logit_scale" in fixed.state_dict()


# --------------------------------------------------------------------------------------------------
# LSEH
# --------------------------------------------------------------------------------------------------

# Slots 0 and 1: two captions of the same image (id 10); l1 = 2·l0 (longer, same direction), so in row 0
# the max is C_01 = 2 > C_00 = 1 and S_00 = 0.5 < 1. l3 points against l0/l1: negative entries.
LSA4 = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
IDS4 = torch.tensor([10, 10, 20, 30])
SIM4 = torch.tensor([[0.80, 0.70, 0.50, 0.70],
                     [0.60, 0.90, 0.30, 0.85],
                     [0.10, 0.60, 0.70, 0.55],
                     [0.20, 0.30, 0.60, 0.50]])


def test_lseh_hand_computed_semantics_margins_and_loss():
    # C = L·Lᵀ = [[ 1,  2, 0, -1],
    #             [ 2,  4, 0, -2],
    #             [ 0,  0, 1,  1],
    #             [-1, -2, 1,  2]]      row maxima m = (2, 4, 1, 2)
    expected_s = torch.tensor([[0.5, 1.0, 0.0, -0.5],
                               [0.5, 1.0, 0.0, -0.5],
                               [0.0, 0.0, 1.0, 1.0],
                               [-0.5, -1.0, 0.5, 1.0]])
    sem = semantic_similarity(LSA4)
    torch.testing.assert_close(sem, expected_s)
    assert sem[2, 3] != sem[3, 2]  # asymmetric: 1.0 vs 0.5
    # alpha 0.2, lam 0.1: M_ij = (0.2 + 0.1·S_ij)·(1 - Z_ij); Z_01 = Z_10 = 1 (same image) and M_ii = 0
    expected_m = torch.tensor([[0.00, 0.00, 0.20, 0.15],
                               [0.00, 0.00, 0.20, 0.15],
                               [0.20, 0.20, 0.00, 0.30],
                               [0.15, 0.10, 0.25, 0.00]])
    torch.testing.assert_close(semantic_margins(sem, IDS4, 0.2, 0.1), expected_m)
    torch.testing.assert_close(LSEHLoss(alpha=0.2, lam=0.1).margins(IDS4, LSA4), expected_m)

    # d = diag(SIM4) = (0.8, 0.9, 0.7, 0.5)
    # i2t [M_ij + s_ij - d_i]_+ over j != i:
    #   row 0: j1 0+0.7-0.8 <0 ; j2 0.2+0.5-0.8 <0 ; j3 0.15+0.7-0.8 = 0.05            max 0.05
    #   row 1: j0 0+0.6-0.9 <0 ; j2 0.2+0.3-0.9 <0 ; j3 0.15+0.85-0.9 = 0.10           max 0.10
    #   row 2: j0 0.2+0.1-0.7 <0 ; j1 0.2+0.6-0.7 = 0.10 ; j3 0.3+0.55-0.7 = 0.15      max 0.15
    #          (with a flat margin 0.2, j1 (0.10) would beat j3 (0.05): the margin changes the hardest negative)
    #   row 3: j0 0.15+0.2-0.5 <0 ; j1 0.1+0.3-0.5 <0 ; j2 0.25+0.6-0.5 = 0.35         max 0.35
    #   i2t: sum of hinges 0.75, sum of maxima 0.65
    # t2i [M_ij + s_ij - d_j]_+ over i != j:
    #   col 0: i1 0+0.6-0.8 <0 ; i2 0.2+0.1-0.8 <0 ; i3 0.15+0.2-0.8 <0                max 0
    #   col 1: i0 0+0.7-0.9 <0 ; i2 0.2+0.6-0.9 <0 ; i3 0.1+0.3-0.9 <0                 max 0
    #   col 2: i0 0.2+0.5-0.7 = 0 ; i1 0.2+0.3-0.7 <0 ; i3 0.25+0.6-0.7 = 0.15         max 0.15
    #   col 3: i0 0.15+0.7-0.5 = 0.35 ; i1 0.15+0.85-0.5 = 0.50 ; i2 0.3+0.55-0.5 = 0.35  max 0.50
    #   t2i: sum of hinges 1.35, sum of maxima 0.65
    loss_max = LSEHLoss(alpha=0.2, lam=0.1, reduction="max")(SIM4, IDS4, caption_vectors=LSA4)
    loss_sum = LSEHLoss(alpha=0.2, lam=0.1, reduction="sum")(SIM4, IDS4, caption_vectors=LSA4)
    assert loss_max.item() == pytest.approx(0.65 + 0.65, abs=1e-6)
    assert loss_sum.item() == pytest.approx(0.75 + 1.35, abs=1e-6)


def test_lseh_lambda_zero_is_vsepp_without_duplicates():
    gen = torch.Generator().manual_seed(1)
    sim = torch.randn(8, 8, generator=gen) * 0.3
    lsa = torch.randn(8, 5, generator=gen)
    ids = torch.arange(8) * 3
    for reduction in ("max", "sum"):
        lseh = LSEHLoss(alpha=0.3, lam=0.0, reduction=reduction)(sim, ids, caption_vectors=lsa)
        hinge = HingeRankingLoss(margin=0.3, reduction=reduction)(sim, ids)
        torch.testing.assert_close(lseh, hinge)


def test_lseh_lambda_zero_differs_by_zeroed_same_image_margins():
    # Hand case: ids (0, 0, 1); alpha 0.2.
    sim = torch.tensor([[0.50, 0.45, 0.10],
                        [0.40, 0.50, 0.10],
                        [0.10, 0.10, 0.50]])
    ids = torch.tensor([0, 0, 1])
    lsa = torch.ones(3, 2)
    # VSE++ (margin 0.2 on the same-image pairs too):
    #   i2t row 0: j1 0.2+0.45-0.5 = 0.15 ; row 1: j0 0.2+0.4-0.5 = 0.1 ; row 2: all <0
    #   t2i col 0: i1 0.2+0.4-0.5 = 0.1  ; col 1: i0 0.2+0.45-0.5 = 0.15 ; col 2: all <0     -> 0.5
    # LSEH, lam 0: the same-image margin is 0: 0.45-0.5 <0, 0.4-0.5 <0, all others <0       -> 0
    assert HingeRankingLoss(margin=0.2)(sim, ids).item() == pytest.approx(0.5, abs=1e-6)
    assert LSEHLoss(alpha=0.2, lam=0.0)(sim, ids, caption_vectors=lsa).item() == pytest.approx(0.0, abs=1e-7)

    # Random case: LSEH(lam=0) == VSE++ hinges with margin alpha·(1 - Z), diagonal masked.
    gen = torch.Generator().manual_seed(2)
    sim = torch.randn(10, 10, generator=gen) * 0.3
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6])
    lsa = torch.randn(10, 4, generator=gen)
    alpha = 0.25
    z = ids[:, None] == ids[None, :]
    margin = alpha * (~z).float()
    d = sim.diagonal()
    cost_s = (margin + sim - d[:, None]).clamp_min(0).fill_diagonal_(0)
    cost_im = (margin + sim - d[None, :]).clamp_min(0).fill_diagonal_(0)
    expected = {"max": cost_s.max(1).values.sum() + cost_im.max(0).values.sum(),
                "sum": cost_s.sum() + cost_im.sum()}
    for reduction, value in expected.items():
        got = LSEHLoss(alpha=alpha, lam=0.0, reduction=reduction)(sim, ids, caption_vectors=lsa)
        torch.testing.assert_close(got, value)
        assert got <= HingeRankingLoss(margin=alpha, reduction=reduction)(sim, ids)


def test_lseh_gradients_reach_sim_only():
    gen = torch.Generator().manual_seed(3)
    sim = (torch.randn(6, 6, generator=gen) * 0.3).requires_grad_()
    lsa = torch.randn(6, 4, generator=gen).requires_grad_()
    loss = LSEHLoss(alpha=0.2, lam=0.5)(sim, torch.tensor([0, 0, 1, 2, 3, 4]), caption_vectors=lsa)
    assert loss.grad_fn is not None
    loss.backward()
    assert sim.grad is not None and sim.grad.abs().sum() > 0
    assert lsa.grad is None
    assert semantic_similarity(lsa).requires_grad is False


def test_lseh_zero_vectors_give_no_nan():
    lsa = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]])
    ids = torch.arange(4)
    for semantic in ("rowmax", "cosine"):
        sem = semantic_similarity(lsa, semantic=semantic)
        assert torch.isfinite(sem).all()
        assert (sem[0] == 0).all() and (sem[:, 2] == 0).all()  # m_0 = 0 -> 1, so the row stays 0
    all_zero = torch.zeros(4, 3)
    sim = torch.randn(4, 4, generator=torch.Generator().manual_seed(4)).requires_grad_()
    for vectors in (lsa, all_zero):
        for semantic in ("rowmax", "cosine"):
            loss = LSEHLoss(semantic=semantic)(sim, ids, caption_vectors=vectors)
            assert torch.isfinite(loss)
            loss.backward()
            assert torch.isfinite(sim.grad).all()


def test_lseh_needs_caption_vectors_of_the_batch():
    sim = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="caption_vectors"):
        LSEHLoss()(sim, torch.arange(3))
    with pytest.raises(ValueError, match="caption_vectors"):
        LSEHLoss()(sim, torch.arange(3), caption_vectors=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="caption_vectors"):
        LSEHLoss()(sim, torch.arange(3), caption_vectors=torch.zeros(3))


def _lseh_reference(sim, ids, vectors, alpha, lam, reduction, semantic, image_semantics):
    """Slow, loop-by-loop LSEH in float64, written from the paper's definition (Gong & Cosma 2023) and the option definitions."""
    s = sim.double().tolist()
    ids = ids.tolist()
    vecs = vectors.double().tolist()
    size, dim = len(ids), len(vecs[0])

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    rows = []
    for i in range(size):
        if image_semantics == "image_mean":
            members = [k for k in range(size) if ids[k] == ids[i]]
            rows.append([sum(vecs[k][t] for k in members) / len(members) for t in range(dim)])
        else:
            rows.append(vecs[i])
    sem = [[0.0] * size for _ in range(size)]
    for i in range(size):
        if semantic == "rowmax":
            c = [dot(rows[i], vecs[k]) for k in range(size)]
            m = max(c)
            m = 1.0 if m == 0 else m
            sem[i] = [c[j] / m for j in range(size)]
        else:
            for j in range(size):
                ni, nj = math.sqrt(dot(rows[i], rows[i])), math.sqrt(dot(vecs[j], vecs[j]))
                sem[i][j] = dot(rows[i], vecs[j]) / (ni * nj) if ni > 0 and nj > 0 else 0.0
    margin = [[0.0 if (i == j or ids[i] == ids[j]) else alpha + lam * sem[i][j] for j in range(size)]
              for i in range(size)]
    pick = max if reduction == "max" else sum
    total = 0.0
    for i in range(size):  # image i as query, captions j != i as negatives
        total += pick(max(0.0, margin[i][j] + s[i][j] - s[i][i]) for j in range(size) if j != i)
    for j in range(size):  # caption j as query, images i != j as negatives
        total += pick(max(0.0, margin[i][j] + s[i][j] - s[j][j]) for i in range(size) if i != j)
    return total, sem


@pytest.mark.parametrize("semantic", ["rowmax", "cosine"])
@pytest.mark.parametrize("image_semantics", ["caption", "image_mean"])
@pytest.mark.parametrize("reduction", ["max", "sum"])
def test_lseh_matches_loop_reference_on_random_batches(semantic, image_semantics, reduction):
    gen = torch.Generator().manual_seed(5)
    for trial in range(3):
        size = 9 + trial
        ids = torch.randint(0, 5, (size,), generator=gen)
        vectors = torch.randn(size, 6, generator=gen)
        vectors[0] = 0.0  # a zero LSA vector in every batch
        sim = F.normalize(torch.randn(size, 8, generator=gen), dim=1) @ F.normalize(
            torch.randn(size, 8, generator=gen), dim=1).T
        loss_fn = LSEHLoss(alpha=0.185, lam=0.4, reduction=reduction, semantic=semantic,
                           image_semantics=image_semantics)
        expected, expected_sem = _lseh_reference(sim, ids, vectors, 0.185, 0.4, reduction, semantic,
                                                 image_semantics)
        got_sem = semantic_similarity(vectors, ids, semantic=semantic, image_semantics=image_semantics)
        torch.testing.assert_close(got_sem, torch.tensor(expected_sem, dtype=torch.float32),
                                   rtol=1e-5, atol=1e-5)
        assert loss_fn(sim, ids, caption_vectors=vectors).item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_lseh_image_mean_by_hand():
    # Slots 0 and 1 share image 10: the image side of rows 0 and 1 is r = ((1,0) + (2,0)) / 2 = (1.5, 0).
    #   row 0 and row 1: C = r·l_k = (1.5, 3, 0, -1.5), m = 3 -> S = (0.5, 1, 0, -0.5)  (same as before here)
    #   rows 2, 3: single caption, unchanged.
    # cosine + image_mean: row 0: cos((1.5,0), l_k) = (1, 1, 0, -1/sqrt(2)).
    sem = semantic_similarity(LSA4, IDS4, image_semantics="image_mean")
    torch.testing.assert_close(sem[0], torch.tensor([0.5, 1.0, 0.0, -0.5]))
    torch.testing.assert_close(sem[3], torch.tensor([-0.5, -1.0, 0.5, 1.0]))
    ids = torch.tensor([10, 20, 10, 30])
    lsa = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [3.0, 4.0]])
    # image 10 = slots 0 and 2: r_0 = r_2 = ((1,0) + (0,2)) / 2 = (0.5, 1)
    #   C row 0 = r·l_k = (0.5, 1, 2, 5.5), m = 5.5 -> S_0 = (1/11, 2/11, 4/11, 1)
    #   cosine row 0: |r| = sqrt(1.25); cos = (0.5, 1, 2, 5.5) / (|r| · (1, 1, 2, 5))
    sem = semantic_similarity(lsa, ids, image_semantics="image_mean")
    torch.testing.assert_close(sem[0], torch.tensor([1 / 11, 2 / 11, 4 / 11, 1.0]))
    torch.testing.assert_close(sem[2], sem[0])
    torch.testing.assert_close(sem[1], torch.tensor([0.0, 1.0, 2.0, 4.0]) / 4.0)  # its own caption (0,1)
    r_norm = math.sqrt(1.25)
    cos = semantic_similarity(lsa, ids, semantic="cosine", image_semantics="image_mean")
    torch.testing.assert_close(cos[0], torch.tensor([0.5, 1.0, 1.0, 1.1]) / r_norm)


def test_lseh_half_precision_input_and_autocast_give_float32():
    gen = torch.Generator().manual_seed(6)
    sim = torch.randn(6, 6, generator=gen) * 0.3
    lsa = torch.randn(6, 5, generator=gen)
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    loss_fn = LSEHLoss(lam=0.5)
    half = loss_fn(sim.half(), ids, caption_vectors=lsa.half())
    assert half.dtype == torch.float32
    reference = loss_fn(sim.half().float(), ids, caption_vectors=lsa.half().float())
    torch.testing.assert_close(half, reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss_fn(sim, ids, caption_vectors=lsa)
        sem_inside = semantic_similarity(lsa)
    assert inside.dtype == torch.float32 and sem_inside.dtype == torch.float32
    torch.testing.assert_close(sem_inside, semantic_similarity(lsa))
    torch.testing.assert_close(inside, loss_fn(sim, ids, caption_vectors=lsa))
    for other in (HingeRankingLoss(), InfoNCELoss()):
        assert other(sim.half(), ids).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Registry: every loss, same interface
# --------------------------------------------------------------------------------------------------


def test_registered_names():
    assert set(LOSSES.names()) >= {"hinge", "hinge_warmup", "infonce", "lseh"}
    assert isinstance(build_loss("hinge"), HingeRankingLoss)
    assert isinstance(build_loss({"name": "lseh", "alpha": 0.2}), LSEHLoss)
    with pytest.raises(KeyError):
        build_loss("triplet")
    with pytest.raises(ConfigError, match="temperature"):
        build_loss({"name": "hinge", "temperature": 0.1})


@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("similarity", ["cosine", "order"])
def test_every_registered_loss_builds_runs_and_backpropagates(name, similarity):
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(6, 8, generator=gen).abs().requires_grad_()
    captions = torch.randn(6, 8, generator=gen).abs().requires_grad_()
    image_ids = torch.tensor([0, 1, 1, 2, 3, 4])
    if similarity == "order":
        sim = order_sim(images, captions)
    else:
        sim = F.normalize(images, dim=1) @ F.normalize(captions, dim=1).T
    loss_fn = build_loss({"name": name})
    assert isinstance(loss_fn, torch.nn.Module)
    assert isinstance(type(loss_fn).requires_caption_vectors, bool)
    loss_fn.set_epoch(0)
    extra = {"caption_vectors": torch.randn(6, 10, generator=gen)} if loss_fn.requires_caption_vectors else {}
    loss = loss_fn(sim, image_ids, **extra)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert images.grad is not None and captions.grad is not None
    assert torch.isfinite(images.grad).all() and torch.isfinite(captions.grad).all()


@pytest.mark.parametrize("module", [vsekit.losses.hinge, vsekit.losses.infonce, vsekit.losses.lseh])
def test_docstring_examples_run(module):
    torch.manual_seed(0)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_lseh_warmup_is_sum_then_max():
    from vsekit.losses import LSEHLoss

    torch.manual_seed(0)
    sim = torch.randn(5, 5)
    ids = torch.arange(5)
    vecs = torch.randn(5, 7)
    warm = LSEHLoss(warmup_epochs=1)
    summed, maxed = LSEHLoss(reduction="sum"), LSEHLoss(reduction="max")
    warm.set_epoch(0)
    assert torch.allclose(warm(sim, ids, caption_vectors=vecs), summed(sim, ids, caption_vectors=vecs))
    warm.set_epoch(1)
    assert torch.allclose(warm(sim, ids, caption_vectors=vecs), maxed(sim, ids, caption_vectors=vecs))
