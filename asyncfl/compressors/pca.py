"""PCA compressor: center the columns, keep the top-k principal components.

Paper: Section 3.1 (PCA: X~ = X - 1 1^T X / n, SVD X~ = U S V^T, keep the top k).

Notes
- Wire: u = U_k S_k (m, k), v = V_k (n, k) and the column mean (n,); decode u v^T + mean.
- "exact" is `torch.linalg.svd` of the centered matrix (optimal for the centered matrix, so
  its error is the optimal *centered* rank-k error, not the plain rank-k optimum).
- "randomized" is a randomized SVD (range finder with `power_iters` subspace iterations,
  `oversample` extra columns), batched over same-shaped matrices, on the tensor's device.
- The adaptive rank measures energy against ||X~||_F^2, the centered matrix's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Compressor
from .linalg import choose_ranks, exact_svd, randomized_svd


class PCACompressor(Compressor):
    """Column-centered truncated SVD (principal components) of each delta matrix."""

    name = "pca"

    def factorize(self, x: Tensor, gen: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
        o = self.options
        mean = x.mean(1)  # (b, n) column means
        centered = x - mean[:, None, :]  # (b, m, n)
        if o.method == "exact":
            u, s, v = exact_svd(centered, o.rank)
        else:
            u, s, v = randomized_svd(centered, o.rank, o.oversample, o.power_iters, gen)
        total = centered.square().sum((1, 2))  # (b,)
        ranks = choose_ranks(s, s.square(), total, o.energy)
        return {"u": u * s[:, None, :], "v": v, "mean": mean}, ranks
