"""QRCP compressor: QR with column pivoting of S^T, truncated to k (row-based).

Paper: Section 3.2 (S^T P = Q R, keep Q_k and R_k, S_approx = (Q_k R_k P^T)^T, k = min(10,
rank(R))).

Notes
- Wire: q = Q_k (n, k) and rt = (R_k P^T)^T (m, k): the permutation is folded into R_k, so
  no pivot indices travel and the size is (m + n) k; decode rt q^T.
- "exact" runs scipy's QRCP (LAPACK geqp3) on the CPU: torch has no pivoted QR.
- "randomized" picks the k pivots on a small sketch (Xiao, Gu, Langou 2017): the rows of S
  expressed in an l-dimensional basis of its dominant row space (range finder on S^T, l = k +
  oversample), greedy pivoting there, then Q from a Householder QR of the k chosen rows and
  R = Q^T S^T, all on the tensor's device. Q_k Q_k^T S^T projects onto the chosen rows' span,
  exactly what truncated QRCP with those pivots produces.
- Trailing components weaker than RTOL x the strongest are dropped (numerical rank).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from .base import Compressor
from .linalg import choose_ranks, greedy_pivots, row_basis, row_sketch


def scipy_qrcp(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact truncated QRCP of each x_i^T on the CPU: q (b, n, k), rt (b, m, k)."""
    qs, rts = [], []
    for mat in x.cpu().numpy():  # (m, n)
        q, r, piv = scipy.linalg.qr(mat.T, mode="economic", pivoting=True, check_finite=False)
        rt = np.empty((mat.shape[0], k), dtype=mat.dtype)
        rt[piv] = r[:k].T  # (R_k P^T)^T: row piv[j] of rt is column j of R_k
        qs.append(q[:, :k])
        rts.append(rt)
    return (
        torch.from_numpy(np.stack(qs)).to(device=x.device, dtype=x.dtype),
        torch.from_numpy(np.stack(rts)).to(device=x.device, dtype=x.dtype),
    )


class QRCPCompressor(Compressor):
    """Truncated QR with column pivoting of each transposed delta matrix."""

    name = "qrcp"

    def factorize(self, x: Tensor, gen: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
        o = self.options
        if o.method == "exact":
            q, rt = scipy_qrcp(x, o.rank)
        else:
            width = min(o.rank + o.oversample, *x.shape[1:])
            idx = greedy_pivots(row_sketch(x, width, o.power_iters, gen), o.rank)
            _, q, _, rt = row_basis(x, idx)  # rt = x q = (Q_k^T S^T)^T
        captured = rt.square().sum(1)  # (b, k) energy of each component
        ranks = choose_ranks(captured.sqrt(), captured, x.square().sum((1, 2)), o.energy)
        return {"rt": rt, "q": q}, ranks
