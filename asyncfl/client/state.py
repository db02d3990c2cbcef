"""Client-side state: error feedback (keep what compression dropped, add it to the next delta)
and the `shifted` rule's client shift h_i (`ClientShift`, at the end).

Classic error feedback (Seide et al. 2014, 1-bit SGD; Karimireddy et al. 2019, EF-SGD), per
client i and its tasks t = 0, 1, ...::

    e_0 = 0
    s_t = r_t + e_t                 r_t: what the client would send without EF
    send C(s_t)                     (the low-rank payload)
    e_{t+1} = s_t - D(C(s_t))       D: decoded exactly as the server decodes it

`D(C(s))` is the payload decoded from its wire values (fp16 rounding included), so the
residual is exactly what the server did not get. Summing over tasks,
`sum_t D_t + e_T = sum_t r_t`: the decoded updates track the dense ones within the last
residual, instead of losing ~60-75 % of every rank-10 update for good. The server sees an
ordinary payload, so this works with every rule and in both modes.

With the `shifted` rule `r_t = delta_t - h_i` (the shift is taken first, then the residual is
added), and both h_i and e use the same decoded payload: `h_i += shift_alpha * D`,
`e = s - D`. A payload the server drops (stale, invalid, node retired) is lost to the
client's bookkeeping exactly as it is without EF: the residual assumes delivery.

Where the residual lives, per (run key, partition):

* In the node's persistent worker (deployment, `asyncfl.client.node_worker`): in that process's
  memory, on the model's device. It is never written to disk (a 124M residual is 500 MB). A
  small marker file under `ASYNCFL_NODE_DIR` records that one was held; a restarted worker
  finds the marker without the residual, starts again from e = 0, logs a warning and reports
  `ef-reset` = 1.
* Anywhere else (simulation: Ray actors are not pinned to partitions; or a ClientApp process
  per message): a file under `ASYNCFL_NODE_DIR`, replaced atomically after every task.

Each residual is stamped with the (version, repeat) of the task that made it; the server gives
a node strictly increasing (version, repeat). A residual whose stamp is not older than the task
(a run that reused the run key, a replayed task) or whose tensors do not match the delta is
dropped with a warning (`ef-reset` = 1); an unreadable file likewise. Nothing here raises
during a task: the worst case is a restart from e = 0, said in the log and the metrics.

`ef-norm` in the reply metrics is ||e_{t+1}|| / ||delta_t|| over all tensors: the share of
this task's delta that is still owed to the server.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from asyncfl.client import node
from asyncfl.tensors import State, Tensors, aligned, check_real, copy_state

if TYPE_CHECKING:
    from asyncfl.config import AppConfig

log = logging.getLogger("asyncfl")

Stamp = tuple[int, int]  # (version, repeat) of the task that produced a residual

_IN_MEMORY = False  # forced on by `keep_in_memory`; the node worker process is always in memory
_MEMORY: dict[tuple[str, int], tuple[Stamp, State]] = {}
_MARKED: set[tuple[str, int]] = set()  # keys whose marker file this process has written


def keep_in_memory(on: bool = True) -> None:
    """Keep residuals in this process's memory (a long-lived worker that owns its partition)."""
    global _IN_MEMORY
    _IN_MEMORY = on
    if not on:
        _MEMORY.clear()
        _MARKED.clear()


def in_memory() -> bool:
    """Whether residuals stay in this process's memory (the node's persistent worker)."""
    return _IN_MEMORY or node.SERVING


def _safe(run_key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_key) or "run"


def _node_dir() -> Path:
    return node.node_state_dir()


def residual_path(run_key: str, partition_id: int) -> Path:
    """The node-local file of a residual kept on disk."""
    return _node_dir() / f"{_safe(run_key)}-p{partition_id}-ef.pt"


def marker_path(run_key: str, partition_id: int) -> Path:
    """The file that says a worker held this residual in memory."""
    return _node_dir() / f"{_safe(run_key)}-p{partition_id}-ef.mem"


def _norm(tensors: Mapping[str, Tensor]) -> float:
    """||.||_F over all tensors, accumulated in fp64 (an fp32 norm of the 6.4M-entry embedding
    delta was off by 1e-3 relative on CPU), with one host sync."""
    if not tensors:
        return 0.0
    norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors.values()]
    return math.sqrt(float(torch.stack([n.to(norms[0].device) for n in norms]).square().sum()))


class ErrorFeedback:
    """One client's residual e: `add` it to what would be sent, `keep` what was dropped.

    Pure bookkeeping, no I/O (`open_error_feedback` and `StoredErrorFeedback.close` store it).
    `e` is None while it is zero; it is kept in at least fp32.
    """

    def __init__(self, e: State | None = None) -> None:
        self.e = e

    def add(self, r: Mapping[str, Tensor]) -> State:
        """`r + e` as new tensors (`r`'s own tensors while e is zero)."""
        if self.e is None:
            return dict(r)
        with torch.no_grad():
            return {k: v + self.e[k].to(v.dtype) for k, v in r.items()}

    def keep(self, sent: Mapping[str, Tensor], decoded: Mapping[str, Tensor]) -> State:
        """e <- sent - decoded: what the server will not get of `sent` (= r + e)."""
        missing = sorted(set(sent) ^ set(decoded))
        if missing:
            raise ValueError(f"decoded payload and sent state differ in tensors {missing[:5]}")
        with torch.no_grad():
            self.e = {
                k: v.detach().to(torch.promote_types(v.dtype, torch.float32))
                - decoded[k].to(device=v.device, dtype=torch.promote_types(v.dtype, torch.float32))
                for k, v in sent.items()
            }
        return self.e

    def norm(self) -> float:
        """||e||_F over all tensors (0 while e is zero)."""
        return 0.0 if self.e is None else _norm(self.e)

    def matches(self, r: Mapping[str, Tensor]) -> bool:
        """Whether e has exactly `r`'s tensor names and shapes."""
        return self.e is None or (set(self.e) == set(r) and all(self.e[k].shape == r[k].shape for k in r))


class StoredErrorFeedback(ErrorFeedback):
    """An `ErrorFeedback` tied to one (run key, partition) and task: loaded by
    `open_error_feedback`, stored again by `close`."""

    def __init__(
        self, run_key: str, partition_id: int, stamp: Stamp, device: torch.device, e: State | None, reset: str = ""
    ) -> None:
        super().__init__(e)
        self.run_key, self.partition_id, self.stamp, self.device = run_key, partition_id, stamp, device
        self.reset = reset  # why a residual that should exist was dropped ("" = none)

    def add(self, r: Mapping[str, Tensor]) -> State:  # noqa: D102
        if not self.matches(r):
            self._drop("its tensors do not match this task's delta (model changed?)")
        return super().add(r)

    def close(
        self, sent: Mapping[str, Tensor], decoded: Mapping[str, Tensor], delta: Mapping[str, Tensor]
    ) -> dict[str, Any]:
        """Keep `sent - decoded`, store it, and return the reply metrics `ef-norm`, `ef-reset`."""
        self.keep(sent, decoded)
        dn = _norm(delta)
        metrics = {"ef-norm": self.norm() / dn if dn > 0 else 0.0, "ef-reset": int(bool(self.reset))}
        _store(self.run_key, self.partition_id, self.stamp, self.e)
        return metrics

    def _drop(self, why: str) -> None:
        log.warning(
            "asyncfl: error feedback (run %s, partition %d): dropping the residual, %s; starting again from e = 0",
            self.run_key,
            self.partition_id,
            why,
        )
        self.e, self.reset = None, why


def open_error_feedback(
    cfg: AppConfig, run_key: str, partition_id: int, version: int, repeat: int, device: torch.device
) -> StoredErrorFeedback | None:
    """This client's residual for a task, or None when `error-feedback` is not "ef" or the
    compressor is lossless ("none": nothing is ever dropped)."""
    if cfg.compress.error_feedback != "ef" or cfg.compress.compressor == "none":
        return None
    stamp = (int(version), int(repeat))
    loaded, reset = _load(run_key, partition_id, device, stamp)
    e = None
    if loaded is not None:
        old, e = loaded
        if tuple(old) >= stamp:
            reset = (
                f"it was made by task (version, repeat) = {tuple(old)}, not older than this "
                f"task's {stamp} (another run under the same run key, or a replayed task)"
            )
            e = None
    if reset:
        log.warning(
            "asyncfl: error feedback (run %s, partition %d): %s; starting again from e = 0",
            run_key,
            partition_id,
            reset,
        )
    return StoredErrorFeedback(run_key, partition_id, stamp, device, e, reset)


# ---- storage ---------------------------------------------------------------------------------
def _load(
    run_key: str, partition_id: int, device: torch.device, stamp: Stamp
) -> tuple[tuple[Stamp, State | None] | None, str]:
    """(stamp, residual; None if empty) or None, and why a residual that should exist is missing ("")."""
    key = (run_key, partition_id)
    if in_memory():
        if key in _MEMORY:
            held, e = _MEMORY[key]
            return (held, {k: v.to(device) for k, v in e.items()}), ""
        marked = _read_marker(run_key, partition_id)
        if marked is not None and marked < stamp and key not in _MARKED:
            # a marker older than this task: a worker held the residual, this one has not
            # (a marker not older is an earlier run under the same run key: nothing is owed)
            return None, (
                f"a worker held its residual up to task {marked} and this one has none (the node worker restarted)"
            )
        return None, ""
    path = residual_path(run_key, partition_id)
    if not path.exists():
        return None, ""
    try:
        d = torch.load(path, map_location=device, weights_only=True)
        held = (int(d["stamp"][0]), int(d["stamp"][1]))
        e = {str(k): v for k, v in d["e"].items()}
        if not all(isinstance(v, Tensor) and v.is_floating_point() for v in e.values()):
            raise ValueError("not floating-point tensors")
        return (held, e or None), ""
    except Exception as exc:  # noqa: BLE001 - an unreadable file means e = 0, never a crash
        return None, f"its file {path} is unreadable ({type(exc).__name__}: {exc})"


def _read_marker(run_key: str, partition_id: int) -> Stamp | None:
    """The stamp in the marker file, or None without a (readable) marker."""
    try:
        v, r, _ = marker_path(run_key, partition_id).read_text().split()
        return int(v), int(r)
    except (OSError, ValueError):
        return None


def _store(run_key: str, partition_id: int, stamp: Stamp, e: State | None) -> None:
    key = (run_key, partition_id)
    if in_memory():
        for other in [k for k in _MEMORY if k[1] == partition_id and k[0] != run_key]:
            del _MEMORY[other]  # one run at a time per partition: free the older run's residual
            log.info(
                "asyncfl: error feedback: dropped the residual of run %s (partition %d) for run %s",
                other[0],
                partition_id,
                run_key,
            )
        if e is None:
            _MEMORY.pop(key, None)
            return
        _MEMORY[key] = (stamp, e)
        path = marker_path(run_key, partition_id)
        try:  # a few bytes per task: the stamp of the residual this process holds
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{stamp[0]} {stamp[1]} {os.getpid()}\n")
            _MARKED.add(key)
        except OSError as exc:
            log.warning("asyncfl: error feedback: cannot write marker %s: %s", path, exc)
        return
    path = residual_path(run_key, partition_id)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"stamp": list(stamp), "e": {k: v.detach().cpu() for k, v in (e or {}).items()}}, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves half a residual
    except OSError as exc:
        # an older file must not be taken for this task's residual later
        log.warning(
            "asyncfl: error feedback: cannot store the residual in %s (%s); the next task starts from e = 0", path, exc
        )
        for p in (tmp, path):
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass


# ---- the shifted rule's client half (its h_i is stored by `asyncfl.client.worker`) ----------------
class ClientShift:
    """Client half of the ``shifted`` rule (``asyncfl.strategies.rules.Shifted``): send
    ``C(residual(delta))``, then ``update(D)``.

    ``update`` must get ``D = decode(encode(residual))``, the same lossy D the server
    applies, so the client's h_i and the server's follow one recursion h_i += alpha D.
    """

    def __init__(self, shift_alpha: float) -> None:
        self.shift_alpha = check_real("shift_alpha", shift_alpha, 0.0, 1.0, open_low=False)
        self.h: State | None = None  # h_i; None while it is zero

    def residual(self, delta: Tensors) -> State:
        """``delta - h_i`` as new tensors (``delta``'s tensors while h_i is zero)."""
        if self.h is None:
            return dict(delta)
        hs = aligned(delta, self.h, "client shift")
        return {k: delta[k] - h for k, h in zip(delta, hs)}

    def update(self, decoded: Tensors) -> None:
        """``h_i += shift_alpha * decoded`` (kept in at least fp32)."""
        if self.shift_alpha == 0.0:
            return
        if self.h is None:
            self.h = {
                k: v.detach().to(torch.promote_types(v.dtype, torch.float32)) * self.shift_alpha
                for k, v in decoded.items()
            }
            return
        ds = aligned(self.h, decoded, "decoded update")
        with torch.no_grad():
            torch._foreach_add_(list(self.h.values()), ds, alpha=self.shift_alpha)

    def state_dict(self) -> State:
        """``{name: h_i}``, empty while h_i is zero."""
        return dict(self.h or {})

    def load_state_dict(self, d: Tensors) -> None:
        """Restore ``state_dict()`` output (copied)."""
        self.h = copy_state(d) if d else None

    def save(self, path: str | Path) -> None:
        """``torch.save`` the shift tensors (CPU) to node-local ``path``."""
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, path)

    def load(self, path: str | Path, missing_ok: bool = False) -> bool:
        """Load a ``save`` file (weights_only); False if absent and ``missing_ok``."""
        if missing_ok and not Path(path).exists():
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True
