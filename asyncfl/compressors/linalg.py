"""Batched randomized linear algebra shared by the compressors (range finder, SVD, pivots).

References: Halko, Martinsson, Tropp 2011 "Finding structure with randomness" (range finder,
power iterations); Xiao, Gu, Langou 2017 "Fast parallel randomized QR with column pivoting"
(pivots chosen on a small sketch instead of the full matrix).

Notes
- Every kernel takes a batch x of shape (b, m, n), fp32, on any device, and never syncs with
  the host: no `.item()`, no data-dependent shapes, so a whole GPT-2 delta is launched at once.
- Orthonormalisation is shifted Cholesky-QR with the l x l Gram matrix in fp64, not
  Householder QR: on an H100, batched `torch.linalg.qr` loops over the batch and took 33 of
  39 ms of GPU time for the 124M delta. The shift keeps rank-deficient or zero sketches safe.
- The small SVD of the randomized SVD is an fp64 eigendecomposition of the l x l matrix B B^T
  (l = rank + oversample); singular values are then re-measured as column norms of B^T U_B,
  which stay accurate where the Gram matrix squares the condition number.
- Householder QR remains for the k chosen rows of QRCP/CUR (one batched call per shape),
  whose triangular factor CUR's least-squares solve needs.
- Greedy pivoting (QRCP's norm rule) and greedy energy selection run as k batched steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

RTOL = 1e-5  # components weaker than RTOL x the strongest one are numerical noise: dropped
SHIFT = 1e-12  # Cholesky-QR shift, relative to the Gram trace (fp64: cond up to ~1e12 is fine)


def orthonormalize(y: Tensor, passes: int = 2) -> Tensor:
    """Orthonormal basis (b, m, l) of the columns of y (b, m, l), without Householder QR.

    Shifted Cholesky-QR, twice (Fukaya et al. 2020): R = chol(y^T y + shift I) with the small
    Gram matrix in fp64, then y <- y R^-1. The shift (SHIFT x trace) keeps the factorization
    defined for rank-deficient or zero input (those directions come out as small arbitrary
    columns, harmless in a range finder); the second pass restores orthonormality (one pass
    is enough inside power iterations, where only the span matters). A batched l x l
    Cholesky is far cheaper on a GPU than a loop of tall Householder QRs.
    """
    eye = torch.eye(y.shape[-1], dtype=torch.float64, device=y.device)
    for _ in range(passes):
        yd = y.double()
        gram = yd.mT @ yd  # (b, l, l)
        trace = gram.diagonal(dim1=1, dim2=2).sum(-1)  # (b,)
        shift = torch.where(trace > 0, SHIFT * trace, 1.0)  # zero input: R = I, y stays 0
        chol, _ = torch.linalg.cholesky_ex(gram + shift[:, None, None] * eye)  # no host sync
        r_inv = torch.linalg.solve_triangular(chol.mT, eye.expand_as(chol), upper=True)
        y = y @ r_inv.to(y.dtype)
    return y


def range_finder(x: Tensor, width: int, power_iters: int, gen: torch.Generator) -> Tensor:
    """Orthonormal basis (b, m, width) of the dominant column space of x (b, m, n)."""
    b, _, n = x.shape
    omega = torch.randn(b, n, width, generator=gen, device=x.device, dtype=x.dtype)
    q = orthonormalize(x @ omega, passes=1 if power_iters else 2)  # (b, m, w)
    for i in range(power_iters):  # subspace iteration, re-orthonormalised every half step
        p = orthonormalize(x.mT @ q, passes=1)  # (b, n, w)
        q = orthonormalize(x @ p, passes=2 if i == power_iters - 1 else 1)
    return q


def randomized_svd(
    x: Tensor, rank: int, oversample: int, power_iters: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` SVD of x (b, m, n): U (b, m, k), s (b, k), V (b, n, k)."""
    width = min(rank + oversample, *x.shape[1:])
    q = range_finder(x, width, power_iters, gen)  # (b, m, l)
    bt = x.mT @ q  # B^T = x^T q, (b, n, l)
    btd = bt.double()
    _, ub = torch.linalg.eigh(btd.mT @ btd)  # B B^T = ub diag(s^2) ub^T (ascending)
    ub = ub.flip(-1)[..., :rank].to(x.dtype)  # (b, l, k) leading eigenvectors
    w = bt @ ub  # (b, n, k) = V diag(s); its column norms are accurate even where s is tiny
    s = w.norm(dim=1)  # (b, k)
    v = w / s.clamp_min(torch.finfo(x.dtype).tiny)[:, None, :]
    return q @ ub, s, v


def exact_svd(x: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` SVD of x (b, m, n) by a full thin SVD (the reference path)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh.mT[..., :rank]


def row_sketch(x: Tensor, width: int, power_iters: int, gen: torch.Generator | None) -> Tensor:
    """Rows of x (b, m, n) in a `width`-dim basis of its dominant row space: (b, width, m).

    gen None = the exact basis (top right singular vectors, by a full SVD).
    """
    if gen is None:
        u, s, _ = exact_svd(x, width)
        return (u * s[:, None, :]).mT
    return (x @ range_finder(x.mT, width, power_iters, gen)).mT


def _pick_columns(y: Tensor, k: int, score: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Shared greedy loop: k times, take the column with the best `score(y, taken)` (b, c),
    then project it out of every column of y (b, d, c). Returns indices (b, k)."""
    y = y.clone()
    b, _, c = y.shape
    taken = torch.zeros(b, c, dtype=torch.bool, device=y.device)
    batch = torch.arange(b, device=y.device)
    picks = []
    for _ in range(k):
        p = score(y, taken).argmax(1)  # (b,)
        taken[batch, p] = True
        col = y[batch, :, p]  # (b, d)
        col = col / col.norm(dim=1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
        y -= col[:, :, None] * (col[:, None, :] @ y)  # project the pivot out of every column
        picks.append(p)
    return torch.stack(picks, 1)


def greedy_pivots(y: Tensor, k: int) -> Tensor:
    """Indices (b, k) of k columns of y (b, d, c) picked by QRCP's greedy pivot rule."""
    # remaining column norms^2; taken columns can never win
    return _pick_columns(y, k, lambda y, taken: y.square().sum(1).masked_fill(taken, -1.0))


def row_basis(x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows x[idx] (b, k, n), their QR rows^T = Q R (b, n, k), (b, k, k), and W = x Q (b, m, k).

    W Q^T = x Q Q^T is the projection of every row of x onto the span of the chosen rows:
    the truncated QRCP of x^T with those pivots, and also the CUR/row-ID reconstruction.
    """
    rows = x.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))
    q, r = torch.linalg.qr(rows.mT)
    return rows, q, r, x @ q


def choose_ranks(strength: Tensor, captured: Tensor, total: Tensor, energy: float | None) -> Tensor:
    """Per-matrix rank (b,) from component strengths and captured energies, both (b, k).

    Keeps the leading components stronger than RTOL x the strongest (numerical rank, the
    paper's k = min(10, rank(R))); with `energy`, then the fewest components whose captured
    energy reaches `energy` x `total` (b,), or all k if they never do.
    """
    k = strength.shape[-1]
    keep = strength > RTOL * strength.amax(-1, keepdim=True)
    ranks = keep.long().cumprod(-1).sum(-1)  # leading run of strong components
    if energy is not None:
        short = captured.cumsum(-1) < energy * total[:, None]
        ranks = torch.minimum(ranks, (short.sum(-1) + 1).clamp(max=k))
    return ranks


def greedy_energy_pivots(y: Tensor, k: int) -> Tensor:
    """Indices (b, k) of k columns of y (b, d, c) chosen greedily to capture the most energy.

    Greedy column subset selection (Farahat, Ghodsi, Kamel 2011): each step takes the column
    whose direction holds the most energy of all remaining columns, y_i^T (y y^T) y_i /
    ||y_i||^2, then projects it out. Unlike QRCP's norm rule it prefers a direction shared
    by many small columns over one large outlier.
    """
    tiny = torch.finfo(y.dtype).tiny

    def score(y: Tensor, taken: Tensor) -> Tensor:
        norms = y.square().sum(1)  # (b, c)
        held = (y * ((y @ y.mT) @ y)).sum(1)  # (b, c) energy along each column's direction
        live = (norms > RTOL * norms.amax(1, keepdim=True)) & ~taken
        score = torch.where(live, held / norms.clamp_min(tiny), -1.0)
        return score.masked_fill(taken, -2.0)  # a dead column only after every live one

    return _pick_columns(y, k, score)
