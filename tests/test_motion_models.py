"""Text-motion evaluation: the T2M metrics against closed forms and hand-computed cases, and the learned text-motion
rewards (TMR, the T2M evaluator) on tiny random weights: the published formulas recomputed by hand from the
modules, gradients to the features, exact save -> load round trips, and clear failures."""

from __future__ import annotations

import math

import pytest
import torch

from diffrl.motion.metrics import diversity, fid, frechet_distance, gaussian_fit, mm_dist, r_precision

F64 = torch.float64


# ---- metrics ----------------------------------------------------------------------------------------------------
def test_r_precision_hand_computed_4x4():
    # 1-d embeddings; distances |t_i - m_j|. Ranks of the matches (motions strictly closer than the match):
    # t0=0: match 0.1, none closer -> 0; t1=1: match 1.2, m0 (0.9) and m2 (0.0) closer -> 2;
    # t2=2: match 1.0, m1 (0.2) closer -> 1; t3=3: match 0.5, none closer -> 0.
    text = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=F64)
    motion = torch.tensor([[0.1], [2.2], [1.0], [3.5]], dtype=F64)
    got = r_precision(text, motion, batch=4, top_k=3)
    assert got.dtype == F64
    torch.testing.assert_close(got, torch.tensor([2 / 4, 3 / 4, 4 / 4], dtype=F64), rtol=0, atol=1e-15)
    # a second batch of perfect pairs averages in; an incomplete last batch is dropped, as the protocol's loader does
    shifted = torch.cat([text, text + 100, torch.tensor([[500.0]], dtype=F64)])
    motions = torch.cat([motion, text + 100, torch.tensor([[-500.0]], dtype=F64)])
    torch.testing.assert_close(r_precision(shifted, motions, batch=4, top_k=3),
                               torch.tensor([6 / 8, 7 / 8, 8 / 8], dtype=F64), rtol=0, atol=1e-15)


def test_r_precision_is_one_for_identical_well_separated_embeddings():
    g = torch.Generator().manual_seed(0)
    emb = 10 * torch.randn(96, 16, generator=g, dtype=F64)
    torch.testing.assert_close(r_precision(emb, emb.clone()), torch.ones(3, dtype=F64), rtol=0, atol=0)


def test_r_precision_rejects_too_few_pairs_and_mismatched_shapes():
    emb = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="at least one full batch of 32 pairs, got 10"):
        r_precision(emb, emb)
    with pytest.raises(ValueError, match=r"same shape.*\[10, 4\] and \[10, 5\]"):
        r_precision(emb, torch.zeros(10, 5), batch=4)


def test_mm_dist_is_the_mean_pair_distance():
    text = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]], dtype=F64)
    motion = torch.tensor([[3.0, 4.0], [1.0, 2.0], [2.0, -1.0]], dtype=F64)
    got = mm_dist(text, motion)  # distances 5, 1, 0
    assert got.dtype == F64
    assert got.item() == pytest.approx(2.0, abs=1e-15)


def test_frechet_distance_closed_forms():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0], dtype=F64), torch.tensor([0.5, -1.0, 0.0], dtype=F64)
    s1, s2 = torch.tensor([1.0, 4.0, 0.25], dtype=F64), torch.tensor([9.0, 1.0, 0.25], dtype=F64)
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    expected = (0.25 + 4 + 4) + (4 + 1 + 0)  # sum (mu1 - mu2)^2 + sum (sqrt s1 - sqrt s2)^2
    assert got.dtype == F64
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # non-commuting 2 x 2 covariances: tr sqrt(A B) = sqrt(tr(AB) + 2 sqrt(det(AB))) (eigenvalues l1, l2 of AB:
    # (sqrt l1 + sqrt l2)^2 = l1 + l2 + 2 sqrt(l1 l2))
    a = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=F64)
    b = torch.tensor([[0.5, -0.3], [-0.3, 3.0]], dtype=F64)
    ab = a @ b
    trace_root = math.sqrt(ab.trace().item() + 2 * math.sqrt(torch.linalg.det(ab).item()))
    m1, m2 = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([-1.0, 0.5], dtype=F64)
    expected = (4 + 2.25) + a.trace().item() + b.trace().item() - 2 * trace_root
    assert frechet_distance(m1, a, m2, b).item() == pytest.approx(expected, abs=1e-12)


def _with_moments(z: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Samples whose sample mean and (N - 1) covariance are exactly `mean` and `cov`: whiten, then colour."""
    z = z - z.mean(0)
    whiten = torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (z.shape[0] - 1)))
    return z @ whiten.T @ torch.linalg.cholesky(cov).T + mean


def test_fid_zero_for_identical_sets_and_closed_form_for_known_gaussians():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(200, 6, generator=g, dtype=F64) @ torch.randn(6, 6, generator=g, dtype=F64)
    assert abs(fid(emb, emb.clone()).item()) < 1e-10
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=F64), torch.tensor([1.0, 1.0, -1.0], dtype=F64)
    s1, s2 = torch.tensor([1.0, 4.0, 2.0], dtype=F64), torch.tensor([0.25, 1.0, 8.0], dtype=F64)
    a = _with_moments(torch.randn(300, 3, generator=g, dtype=F64), mu1, torch.diag(s1))
    b = _with_moments(torch.randn(250, 3, generator=g, dtype=F64), mu2, torch.diag(s2))
    mean_a, cov_a = gaussian_fit(a)
    torch.testing.assert_close(cov_a, torch.diag(s1), rtol=0, atol=1e-12)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum()  # 10 + (0.25 + 1 + 2)
    assert fid(a, b).item() == pytest.approx(expected.item(), abs=1e-10)


def test_diversity_follows_the_protocol_draws():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 5, generator=g, dtype=F64)
    got = diversity(emb, pairs=25, generator=torch.Generator().manual_seed(3))
    draws = torch.Generator().manual_seed(3)  # the documented draws: randperm(N)[:pairs], first then second
    first, second = torch.randperm(40, generator=draws)[:25], torch.randperm(40, generator=draws)[:25]
    expected = sum(math.sqrt(sum((emb[i, d].item() - emb[j, d].item()) ** 2 for d in range(5)))
                   for i, j in zip(first.tolist(), second.tolist())) / 25
    assert got.dtype == F64
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert diversity(torch.ones(30, 4, dtype=F64), pairs=30).item() == 0.0  # one point: no spread
    with pytest.raises(ValueError, match=r"pairs must be in \[1, N=40\]"):
        diversity(emb)  # 300 pairs of distinct rows need N >= 300
