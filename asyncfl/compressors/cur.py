"""CUR / row-ID compressor: k actual rows of S plus a least-squares interpolation matrix.

Paper: Section 3.3 (R = k rows of S; Z = argmin ||S - Z R||_F = S R^+; S_approx = Z R).

Notes
- Wire: idx (k,) int64, rows = S[idx] (k, n) (actual rows: bit-exact with fp32 wire) and
  z (m, k); decode z rows.
- Row selection (`row_select`): "uniform" is the paper's sampling without replacement.
  "greedy" (default, chosen by measurement on GPT-2 deltas, see bench/README.md: 1.15x the
  optimal rank-k error vs 1.18x uniform, 1.20x pivoted, 1.53x leverage) is greedy column
  subset selection on a sketch of the row space (Farahat, Ghodsi, Kamel 2011): each step
  takes the row whose direction holds the most energy of all remaining rows. "pivoted" is
  QRCP's norm pivoting on the same sketch (the randomized QRCP pivots) or, with method
  "exact", scipy's QRCP pivots of S^T. "leverage" takes the k largest rank-k leverage scores.
  With method "exact" the sketch is the exact top singular subspace.
- Z = S R^+ is solved through the QR of R^T: R^T = Q T gives Z = (S Q) T^{-T} (one k x k
  triangular solve, batched, on the tensor's device). Uniform and leverage picks are first
  reordered by greedy pivoting so that rows nearly in the span of earlier ones come last and
  are dropped (numerical rank), which keeps the solve well conditioned.
- With the same rows, the reconstruction equals truncated QRCP's (both project S onto the
  chosen rows' span); CUR sends k indices more but its R holds real rows.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from .base import Compressor
from .linalg import choose_ranks, greedy_energy_pivots, greedy_pivots, row_basis, row_sketch


class CURCompressor(Compressor):
    """Row interpolative decomposition: Z R with R = k chosen rows of each delta matrix."""

    name = "cur"

    def factorize(self, x: Tensor, gen: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
        o, k = self.options, self.options.rank
        idx = self._select(x, gen)
        if o.row_select in ("uniform", "leverage"):  # order the picks: dependent rows last
            rows = x.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))
            idx = idx.gather(1, greedy_pivots(rows.mT, k))
        rows, _, tri, w = row_basis(x, idx)  # rows^T = Q tri, w = x Q
        captured = w.square().sum(1)  # (b, k)
        strength = tri.diagonal(dim1=1, dim2=2).abs()
        ranks = choose_ranks(strength, captured, x.square().sum((1, 2)), o.energy)
        keep = torch.arange(k, device=x.device) < ranks[:, None]  # (b, k)
        # components past the rank: identity in tri, zero in w, hence zero columns in z
        tri = tri * (keep[:, :, None] & keep[:, None, :]) + torch.diag_embed((~keep).float())
        z = torch.linalg.solve_triangular(tri, (w * keep[:, None, :]).mT, upper=True).mT
        return {"z": z, "rows": rows, "idx": idx}, ranks

    def _select(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Indices (b, k) of the k rows to keep."""
        o, (b, m, _) = self.options, x.shape
        if o.row_select == "uniform":
            keys = torch.rand(b, m, generator=gen, device=x.device)
            return keys.topk(o.rank, dim=1).indices
        if o.row_select == "pivoted" and o.method == "exact":
            return _scipy_pivots(x, o.rank)
        width = min(o.rank + o.oversample, *x.shape[1:])
        exact = o.method == "exact"
        sketch = row_sketch(x, width, o.power_iters, None if exact else gen)  # (b, l, m)
        if o.row_select == "greedy":
            return greedy_energy_pivots(sketch, o.rank)
        if o.row_select == "pivoted":
            return greedy_pivots(sketch, o.rank)
        return leverage_top(sketch, o.rank)


def leverage_top(sketch: Tensor, k: int) -> Tensor:
    """Rows (b, k) with the largest rank-k leverage scores ||U_k[i]||^2, from a row sketch.

    With sketch y (b, l, m) and y y^T = E diag(lam) E^T, ||U_k[i]||^2 = sum over the top k
    eigenpairs of (E_j^T y_i)^2 / lam_j (any basis of the dominant row space gives the same).
    """
    yd = sketch.double()
    lam, e = torch.linalg.eigh(yd @ yd.mT)  # ascending
    lam, e = lam[:, -k:], e[..., -k:]
    inv = torch.where(lam > 1e-13 * lam[:, -1:], 1.0 / lam.clamp_min(1e-300), 0.0)
    scores = ((e.mT @ yd).square() * inv[..., None]).sum(1)  # (b, m)
    return scores.topk(k, dim=1).indices


def _scipy_pivots(x: Tensor, k: int) -> Tensor:
    """First k QRCP pivots of each x_i^T (deterministic, CPU, LAPACK geqp3)."""
    pivots = [scipy.linalg.qr(mat.T, mode="r", pivoting=True, check_finite=False)[1][:k] for mat in x.cpu().numpy()]
    return torch.from_numpy(np.stack(pivots).astype(np.int64)).to(x.device)
