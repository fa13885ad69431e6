"""Text-to-motion evaluation metrics on embeddings, as the T2M protocol (Guo et al., CVPR 2022) computes them from
its evaluator's text and motion embeddings: R-precision, MM-Dist, FID and diversity.

Pure torch on [N, D] embedding tensors (row i of the text and motion tensors is one text-motion pair). A float64 input
stays float64 throughout, and every function is differentiable where its maths is (FID through a symmetric
eigendecomposition).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_pairs(text_emb: Tensor, motion_emb: Tensor, what: str) -> None:
    if text_emb.ndim != 2 or text_emb.shape != motion_emb.shape:
        raise ValueError(f"{what}: text and motion embeddings must both be [N, D] with the same shape (row i of each "
                         f"is one pair), got {list(text_emb.shape)} and {list(motion_emb.shape)}")


def distance_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances [..., N, M] between the rows of a [..., N, D] and b [..., M, D], from the differences
    (exact where the expanded |a|^2 + |b|^2 - 2ab form cancels), without materialising them."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")  # [..., N, M]


def r_precision(text_emb: Tensor, motion_emb: Tensor, batch: int = 32, top_k: int = 3) -> Tensor:
    """Top-1..top_k retrieval accuracy [top_k] of texts against motions, T2M's protocol: the pairs are split into
    consecutive batches of `batch` (the incomplete last batch is dropped, as the protocol's loader drops it); in each
    batch every text ranks the batch's motions by Euclidean distance, and entry k-1 is the fraction of texts whose own
    motion is among the k nearest. A motion tied with the match counts as farther (a tie never costs the match)."""
    _check_pairs(text_emb, motion_emb, "r_precision")
    count = text_emb.shape[0]
    if not 1 <= top_k <= batch:
        raise ValueError(f"r_precision: top_k must be in [1, batch={batch}], got {top_k}")
    if count < batch:
        raise ValueError(f"r_precision: needs at least one full batch of {batch} pairs, got {count}; "
                         f"pass more pairs or a smaller batch")
    used = count // batch * batch
    texts = text_emb[:used].reshape(-1, batch, text_emb.shape[1])  # [nb, batch, D]
    motions = motion_emb[:used].reshape(-1, batch, motion_emb.shape[1])  # [nb, batch, D]
    dist = distance_matrix(texts, motions)  # [nb, batch, batch]
    matching = dist.diagonal(dim1=1, dim2=2)  # [nb, batch]
    rank = (dist < matching[..., None]).sum(-1)  # [nb, batch]: motions strictly closer than the match
    ks = torch.arange(1, top_k + 1, device=rank.device)  # [top_k]
    hits = rank.reshape(-1, 1) < ks  # [used, top_k]
    return hits.to(text_emb.dtype).mean(0)  # [top_k]


def mm_dist(text_emb: Tensor, motion_emb: Tensor) -> Tensor:
    """Multimodal distance: the mean Euclidean distance between each text embedding and its motion's (a scalar)."""
    _check_pairs(text_emb, motion_emb, "mm_dist")
    return (text_emb - motion_emb).norm(dim=-1).mean()


def gaussian_fit(emb: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and sample covariance [D, D] (divided by N - 1, as numpy's cov) of embeddings [N, D]."""
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"gaussian_fit: needs embeddings [N, D] with N >= 2, got {list(emb.shape)}")
    mean = emb.mean(0)  # [D]
    centred = emb - mean  # [N, D]
    return mean, centred.T @ centred / (emb.shape[0] - 1)  # [D], [D, D]


def _sym_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues clamped to 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)  # [D], [D, D]
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T  # [D, D]


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2):
        |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2)).
    tr((cov1 cov2)^(1/2)) is the sum of the square roots of the eigenvalues of cov1^(1/2) cov2 cov1^(1/2), a symmetric
    matrix with the same spectrum, so no non-symmetric matrix square root (scipy's sqrtm) is needed."""
    dim = mu1.shape[-1]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(f"frechet_distance: means must be [D] and covariances [D, D] with one D, got "
                         f"{list(mu1.shape)}, {list(cov1.shape)}, {list(mu2.shape)}, {list(cov2.shape)}")
    root1 = _sym_sqrt(cov1)  # [D, D]
    middle = root1 @ cov2 @ root1  # [D, D], symmetric PSD
    trace_cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_cross


def fid(emb_a: Tensor, emb_b: Tensor) -> Tensor:
    """Fréchet distance between Gaussian fits (mean, N - 1 covariance) of two embedding sets [Na, D] and [Nb, D]."""
    return frechet_distance(*gaussian_fit(emb_a), *gaussian_fit(emb_b))


def diversity(emb: Tensor, pairs: int = 300, generator: torch.Generator | None = None) -> Tensor:
    """Mean Euclidean distance over `pairs` random pairs of embeddings [N, D], T2M's protocol: the first and the
    second members are two independent draws of `pairs` distinct rows (randperm(N)[:pairs] each, in that order from
    `generator`), so a row can be paired with itself."""
    if emb.ndim != 2:
        raise ValueError(f"diversity: needs embeddings [N, D], got {list(emb.shape)}")
    count = emb.shape[0]
    if not 1 <= pairs <= count:
        raise ValueError(f"diversity: pairs must be in [1, N={count}] (each side draws distinct rows), got {pairs}")
    first = torch.randperm(count, generator=generator)[:pairs].to(emb.device)  # [pairs]
    second = torch.randperm(count, generator=generator)[:pairs].to(emb.device)  # [pairs]
    return (emb[first] - emb[second]).norm(dim=-1).mean()
