"""Stale updates that repeat the progress already applied since they started (`stale-align`).

A node whose task started from version b of the global weights trains on ``x_b``; by the time
its delta ``u`` arrives the others have moved the model by ``p = x - x_b``. Early in training
much of ``u`` is what ``p`` already did (every node first learns the same token statistics), so
adding it again overshoots: at the 124M shape the slow nodes' first, from-initialisation
updates set the perplexity back by a factor of two or more (bench/README, "The asgd step 0.4 at
124M with fixed task lengths"). Two remedies, both exact least-squares fits and both no-ops at
staleness 0 (``p = 0``):

- ``"project"``: per tensor, ``u_k - (<u_k, p_k> / <p_k, p_k>) p_k``: the part of the update
  orthogonal to the progress since its base. The applied step is no longer a multiple of the
  client's payload, so the update-log downlink cannot replay it (the config then sends full
  weights, or rejects ``downlink = "log"``).
- ``"scale"``: one factor ``s = 1 - cos^2(u, p)`` over all tensors, the scalar ``s`` that brings
  ``s u`` closest to that orthogonal part (``argmin_s ||s u - u_perp||`` with
  ``u_perp = u - (<u,p>/<p,p>) p`` is ``<u, u_perp> / <u, u> = 1 - cos^2``). It only changes the
  update's weight, so it works with the update-log downlink.

This is the delay compensation idea of DC-ASGD (Zheng et al. 2017, "Asynchronous Stochastic
Gradient Descent with Delay Compensation", ICML) read for multi-step local training: there the
stale gradient is corrected with a first-order term in ``x - x_b``; here the component of the
stale delta along ``x - x_b`` is taken out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from asyncfl.choices import StaleAlign, check_choice, choices
from asyncfl.tensors import Tensors


@dataclass(frozen=True)
class Aligned:
    """What `align` hands the rule: the update to apply and the factor on its weight."""

    update: Tensors  # what the rule applies (new tensors unless nothing changed)
    scale: float  # update = scale * the input ("scale": 1 - cos^2; 1 otherwise)
    cos: float  # cos(u, x - base) over all tensors (0 when either is zero)


def progress_cosine(update: Mapping[str, torch.Tensor], x: Mapping[str, torch.Tensor], base: Tensors) -> float:
    """cos(u, x - base) over all tensors together (0 when either vector is zero)."""
    dot = uu = pp = 0.0
    with torch.no_grad():
        for k, u in update.items():
            p = x[k] - base[k]
            dot += float(torch.sum(u.double() * p.double()))
            uu += float(torch.sum(u.double() ** 2))
            pp += float(torch.sum(p.double() ** 2))
    return dot / math.sqrt(uu * pp) if uu > 0 and pp > 0 else 0.0


def align(mode: StaleAlign, update: Tensors, x: Mapping[str, torch.Tensor], base: Tensors | None) -> Aligned:
    """Apply `mode` to a stale `update` given the global state `x` and the state `base` the
    update started from (None: base == x, nothing to remove). Never mutates its inputs."""
    check_choice("stale-align", mode, choices(StaleAlign))
    missing = sorted((set(update) - set(x)) | (set(update) - set(base) if base is not None else set()))
    if missing:
        raise ValueError(f"stale-align: update tensors {missing[:5]} are not in the global state or its base")
    if mode == "off" or base is None:
        return Aligned(update, 1.0, 0.0)
    cos = progress_cosine(update, x, base)
    if mode == "scale":
        f = 1.0 - cos * cos
        with torch.no_grad():
            return Aligned({k: u * f for k, u in update.items()}, f, cos)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for k, u in update.items():
            p = x[k] - base[k]
            pp = float(torch.sum(p.double() ** 2))
            if pp > 0:
                c = float(torch.sum(u.double() * p.double())) / pp
                out[k] = u - c * p.to(u.dtype)
            else:
                out[k] = u
    return Aligned(out, 1.0, cos)
