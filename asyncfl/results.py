"""Run outputs: the event log, running totals, summary.json, results.md, plot.png, comparisons.

`RunRecorder` is the server loop's one way to write into `<results-dir>/<run-name>/`:
`events.jsonl` gets one JSON line per call, flushed at once (a crash or Ctrl-C keeps what was
logged); `finish()` writes `summary.json`, `results.md` and `plot.png` from the running totals.
`python -m asyncfl.results compare RUN_DIR ...` tabulates and plots finished runs side by side;
`python -m asyncfl.results show RUN_DIR` prints a run's results.md.

Notes
-----
- Totals are a pure function of the event lines (`Totals.add`), so `resume` rebuilds them by
  replaying the log, and tests can recompute them independently from the file.
- Staleness and decode+apply statistics cover applied updates only; drops are counted by reason.
- Non-finite floats are written as null (strict JSON); numpy/torch scalars as Python numbers.
- On resume `t` continues from the last logged value: the downtime is not counted as run time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncfl.config import AppConfig

EVENTS_FILE, SUMMARY_FILE = "events.jsonl", "summary.json"
RESULTS_FILE, PLOT_FILE = "results.md", "plot.png"
_RESERVED = ("event", "t", "time")  # set by the recorder; a caller field may not override them
_COMPARE_KEYS = (
    "mode",
    "rule",
    "compressor",
    "updates_applied",
    "wall_clock_s",
    "initial_eval_ppl",
    "final_eval_ppl",
    "best_eval_ppl",
    "time_to_target_s",
    "bytes_uploaded",
    "compression_ratio",
)


class RunDataError(ValueError):
    """A run folder or one of its files is missing or malformed; the message names the path."""


# ---------------------------------------------------------------------------------------------
# Event log: JSON-safe values, reading, and the queries the benchmark uses
# ---------------------------------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """Return `value` (nested freely) with JSON types only: NaN/inf -> None, numpy/torch -> Python.

    The result is what `json.dumps(..., allow_nan=False)` accepts; unknown objects become text.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors on any device
        return json_safe(value.tolist())
    return str(value)  # Path, enums...: readable text beats a crash in the middle of a run


def read_events(path: Path | str) -> list[dict[str, Any]]:
    """Parse an events.jsonl file into its events, in file order.

    A torn last line (no newline: the process died mid-write) is ignored. Raises `RunDataError`
    naming `path:line` if the file is unreadable or a complete line is not an event object.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise RunDataError(f"{path}: cannot read the event log ({exc.strerror or exc})") from None
    events = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines):  # the text after the last newline: a torn write
                break
            raise RunDataError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
        if not isinstance(event, dict) or "event" not in event:
            raise RunDataError(f'{path}:{lineno}: expected a JSON object with an "event" key')
        events.append(event)
    return events


def _evals(events: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The eval events that carry a time."""
    return [e for e in events if e.get("event") == "eval" and e.get("t") is not None]


def ppl_at(events: Sequence[Mapping[str, Any]], t: float) -> float | None:
    """Perplexity of the last evaluation logged at or before wall-clock `t` seconds.

    Returns None if there is none yet, or if that evaluation's perplexity was not finite.
    """
    best_t, ppl = -math.inf, None
    for e in _evals(events):
        if best_t <= e["t"] <= t:  # ties go to the later line
            best_t, ppl = e["t"], e.get("ppl")
    return ppl


def time_to_ppl(events: Sequence[Mapping[str, Any]], target: float) -> float | None:
    """Wall-clock seconds of the first evaluation with perplexity <= `target` (None: never)."""
    hits = [e["t"] for e in _evals(events) if e.get("ppl") is not None and e["ppl"] <= target]
    return min(hits, default=None)


@dataclass
class Totals:
    """Running totals of one run, a pure function of its event lines (see `add`)."""

    target_ppl: float | None = None
    updates: int = 0
    drops: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    bytes_uploaded: int = 0
    bytes_dense: int = 0
    bytes_down: int = 0  # bytes of the task messages whose replies were applied
    encode_sum_s: float = 0.0  # client encode time, over the updates that report it
    encode_n: int = 0
    staleness_sum: float = 0.0
    staleness_n: int = 0
    staleness_max: float | None = None
    decode_apply_sum_s: float = 0.0
    decode_apply_n: int = 0
    evals: list[dict[str, Any]] = field(default_factory=list)
    time_to_target_s: float | None = None
    last_t: float = 0.0

    def add(self, event: Mapping[str, Any]) -> None:
        """Fold one event (as written to events.jsonl) into the totals."""
        self.last_t = max(self.last_t, event.get("t") or 0.0)
        kind = event.get("event")
        if kind == "update":
            self.updates += 1
            self.bytes_uploaded += event.get("bytes") or 0
            self.bytes_dense += event.get("dense_bytes") or 0
            self.bytes_down += event.get("bytes_down") or 0
            if (enc := event.get("encode_s")) is not None:
                self.encode_n += 1
                self.encode_sum_s += enc
            if (s := event.get("staleness")) is not None:
                self.staleness_n += 1
                self.staleness_sum += s
                self.staleness_max = s if self.staleness_max is None else max(self.staleness_max, s)
            if (d := event.get("decode_apply_s")) is not None:
                self.decode_apply_n += 1
                self.decode_apply_sum_s += d
        elif kind == "drop":
            self.drops += 1
            reason = str(event.get("reason"))
            self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + 1
        elif kind == "eval":
            self.evals.append(dict(event))
            ppl = event.get("ppl")
            hit = self.target_ppl is not None and ppl is not None and ppl <= self.target_ppl
            if hit and self.time_to_target_s is None:
                self.time_to_target_s = event.get("t")


# ---------------------------------------------------------------------------------------------
# The recorder
# ---------------------------------------------------------------------------------------------
class RunRecorder:
    """Writes one run's event log and, at the end, its summary, results table and plot.

    Parameters
    ----------
    run_dir : Path
        `<results-dir>/<run-name>`; created if missing.
    config : Mapping[str, Any]
        The resolved run config (`AppConfig.to_dict()`; an `AppConfig` is also accepted).
    mode, compressor, rule : str
        What ran; shown in titles and copied into summary.json.
    num_clients : int
        Number of client nodes.
    eval_split, train_split : str
        The split the server evaluates on and the one clients train on.
    target_ppl : float or None
        Perplexity target for `time_to_target_s`; None or <= 0 means no target.
    clock : Callable[[], float], default time.monotonic
        Seconds from any origin; tests inject a fake one.
    resume : bool, default False
        Append to an existing events.jsonl, rebuild the totals from it and continue `t` from
        its last value. False starts a new log (an existing one is overwritten).
    """

    def __init__(
        self,
        run_dir: Path | str,
        *,
        config: Mapping[str, Any],
        mode: str,
        compressor: str,
        rule: str,
        num_clients: int,
        eval_split: str,
        train_split: str,
        target_ppl: float | None,
        clock: Callable[[], float] = time.monotonic,
        resume: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        target = float(target_ppl) if target_ppl and target_ppl > 0 else None  # config: 0 = off
        self.meta: dict[str, Any] = {
            "mode": mode,
            "compressor": compressor,
            "rule": rule,
            "num_clients": int(num_clients),
            "train_split": train_split,
            "eval_split": eval_split,
            "target_ppl": target,
        }
        to_dict = getattr(config, "to_dict", None)
        self.config = json_safe(to_dict() if callable(to_dict) else dict(config))
        self.totals = Totals(target_ppl=target)
        self._clock, self._t0 = clock, clock()
        resumed = self._open_log(resume)
        self._t_offset = self.totals.last_t  # 0.0 for a new log
        if not resumed:
            self.log_event("start", **self.meta, config=self.config)

    @classmethod
    def for_run(
        cls,
        cfg: AppConfig,
        run_dir: Path,
        *,
        eval_split: str,
        train_split: str,
        clock: Callable[[], float],
        resume: bool,
    ) -> RunRecorder:
        """The recorder of a server run of `cfg` (mode, compressor, rule, target from it)."""
        return cls(
            run_dir,
            config=cfg.to_dict(),
            mode=cfg.server.mode,
            compressor=cfg.compress.compressor,
            rule=cfg.server.rule if cfg.server.mode == "async" else "fedavg",
            num_clients=0,
            eval_split=eval_split,
            train_split=train_split,
            target_ppl=cfg.stop.target_ppl or None,
            clock=clock,
            resume=resume,
        )

    @classmethod
    def resume(cls, run_dir: Path | str, **kwargs: Any) -> RunRecorder:
        """Reopen a run's log after a restart; same keyword arguments as the constructor."""
        return cls(run_dir, resume=True, **kwargs)

    def _open_log(self, resume: bool) -> bool:
        """Open events.jsonl (on resume: replay it into the totals); return whether it resumed."""
        path = self.run_dir / EVENTS_FILE
        if not (resume and path.exists()):
            self._fh = path.open("w", encoding="utf-8")
            return False
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):  # cut a line torn by a crash, or the next append would join it
            with path.open("r+b") as f:
                f.truncate(keep)
        for event in read_events(path):
            self.totals.add(event)
        self._fh = path.open("a", encoding="utf-8")
        return True

    def restart_clock(self) -> None:
        """Run time goes back to where it stood when the log was opened (0, or the last `t` of a
        resumed log): what happened since, the start-up before training, is not counted."""
        self._t0 = self._clock()

    @property
    def elapsed_s(self) -> float:
        """Seconds of run time so far (continues across resumes)."""
        return self._t_offset + self._clock() - self._t0

    def _log(self, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Append one event line, flush it, fold it into the totals; return it as written."""
        clash = [k for k in _RESERVED if k in fields]
        if clash:
            raise ValueError(f"event field(s) {clash} are set by the recorder; rename them")
        if self._fh.closed:
            raise RuntimeError(f"the recorder of {self.run_dir} is finished; cannot log {kind!r}")
        event = json_safe({"event": kind, "t": round(self.elapsed_s, 6), "time": time.time(), **fields})
        self._fh.write(json.dumps(event, allow_nan=False) + "\n")
        self._fh.flush()
        self.totals.add(event)
        return event

    def log_update(
        self,
        *,
        version: int,
        node: int,
        staleness: int,
        bytes: int,  # noqa: A002
        dense_bytes: int,
        partition: int | None = None,
        weight: float | None = None,
        train_loss: float | None = None,
        rec_error: float | None = None,
        decode_apply_s: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Log one applied client update (`bytes` as uploaded, `dense_bytes` uncompressed)."""
        return self._log(
            "update",
            {
                "version": version,
                "node": node,
                "partition": partition,
                "staleness": staleness,
                "weight": weight,
                "train_loss": train_loss,
                "bytes": bytes,
                "dense_bytes": dense_bytes,
                "rec_error": rec_error,
                "decode_apply_s": decode_apply_s,
                **extra,
            },
        )

    def log_drop(
        self, *, node: int, reason: str, partition: int | None = None, staleness: int | None = None, **extra: Any
    ) -> dict[str, Any]:
        """Log one rejected update (too stale, invalid payload, error reply)."""
        return self._log(
            "drop", {"node": node, "partition": partition, "staleness": staleness, "reason": reason, **extra}
        )

    def log_eval(
        self,
        *,
        version: int,
        loss: float | None = None,
        ppl: float | None = None,
        round: int | None = None,  # noqa: A002 - the name the server loop uses
        top1: float | None = None,
        top5: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Log one evaluation; `updates` (applied so far) is added unless given."""
        return self._log(
            "eval",
            {
                "version": version,
                "round": round,
                "updates": self.totals.updates,
                "loss": loss,
                "ppl": ppl,
                "top1": top1,
                "top5": top5,
                **extra,
            },
        )

    def log_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Log anything else: node retired, checkpoint, resume, stop reason, ..."""
        return self._log(kind, fields)

    def summary(self, *, stop_reason: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The summary as it stands now (what `finish` writes to summary.json)."""
        return self._summary(stop_reason, extra, round(self.elapsed_s, 6))

    def _summary(self, stop_reason: str | None, extra: Mapping[str, Any] | None, wall_clock_s: float) -> dict[str, Any]:
        """Build the summary dict from the totals."""
        tot, m = self.totals, self.meta
        ppls = [e["ppl"] for e in tot.evals if e.get("ppl") is not None]
        first, last = (tot.evals[0], tot.evals[-1]) if tot.evals else ({}, {})
        return json_safe(
            {
                **{k: m[k] for k in ("mode", "compressor", "rule", "num_clients")},
                "updates_applied": tot.updates,
                "updates_dropped": tot.drops,
                "drop_reasons": dict(tot.drop_reasons),
                "num_evals": len(tot.evals),
                "wall_clock_s": wall_clock_s,
                "initial_eval_ppl": first.get("ppl"),
                "final_eval_ppl": last.get("ppl"),
                "final_eval_loss": last.get("loss"),
                "final_eval_top1": last.get("top1"),
                "final_eval_top5": last.get("top5"),
                "best_eval_ppl": min(ppls, default=None),
                "bytes_uploaded": tot.bytes_uploaded,
                "bytes_uploaded_dense_equiv": tot.bytes_dense,
                "compression_ratio": (tot.bytes_dense / tot.bytes_uploaded if tot.bytes_uploaded else None),
                "bytes_down_total": tot.bytes_down,
                "mean_encode_s": tot.encode_sum_s / tot.encode_n if tot.encode_n else None,
                "mean_staleness": tot.staleness_sum / tot.staleness_n if tot.staleness_n else None,
                "max_staleness": tot.staleness_max,
                "mean_decode_apply_ms": (
                    1e3 * tot.decode_apply_sum_s / tot.decode_apply_n if tot.decode_apply_n else None
                ),
                "time_to_target_s": tot.time_to_target_s,
                "target_ppl": m["target_ppl"],
                "train_split": m["train_split"],
                "eval_split": m["eval_split"],
                "stop_reason": stop_reason,
                "config": self.config,
                "extra": dict(extra or {}),
            }
        )

    def finish(self, *, stop_reason: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Log a "finish" event, close the log, write summary.json, results.md and plot.png.

        `stop_reason` says why the run ended (max-updates, time-budget, target-ppl, ...);
        `extra` is stored under the summary's "extra" key. Returns the summary as written.
        """
        event = self._log("finish", {"stop_reason": stop_reason})
        self.close()
        summary = self._summary(stop_reason, extra, event["t"])
        _write_atomic(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n")
        _write_atomic(self.run_dir / RESULTS_FILE, results_markdown(summary, self.totals.evals))
        try:
            plot_runs(
                self.run_dir / PLOT_FILE,
                [("", self.totals.evals)],
                title=_title(summary),
                target_ppl=summary["target_ppl"],
            )
        except Exception as exc:  # noqa: BLE001 - a plot problem must not fail a finished run
            logging.getLogger(__name__).warning("could not write %s: %s", PLOT_FILE, exc)
        return summary

    def close(self) -> None:
        """Close the event log without writing the summary (finish does this itself)."""
        self._fh.close()


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Rendering: results.md and plots
# ---------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    scale, unit = next(((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")) if n >= s), (1, "B"))
    return f"{n / scale:.2f} {unit}" if scale > 1 else f"{n} B"


def _title(summary: Mapping[str, Any]) -> str:
    return f"{summary['mode']} / {summary['rule']} / {summary['compressor']}"


def results_markdown(summary: Mapping[str, Any], evals: Sequence[Mapping[str, Any]]) -> str:
    """Render results.md: title, data splits, one table row per evaluation, then totals."""
    lines = [
        f"# {_title(summary)} ({summary['num_clients']} clients)",
        "",
        f"Clients train on the `{summary['train_split']}` split; the server evaluates on `{summary['eval_split']}`.",
    ]
    if summary["train_split"] == "validation":
        lines[-1] += (
            " Offline run: training used the validation split (no train file), so "
            "numbers are not directly comparable to runs trained on `train`."
        )
    lines += [
        "",
        "| round | updates | elapsed s | eval loss | eval ppl | top-1 acc | top-5 acc |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, e in enumerate(evals):  # no round given (async): number the evaluations from 0
        rnd = e["round"] if e.get("round") is not None else i
        lines.append(
            f"| {rnd} | {_fmt(e.get('updates'))} | {_fmt(e.get('t'), '.1f')} | "
            f"{_fmt(e.get('loss'), '.4f')} | {_fmt(e.get('ppl'), '.2f')} | "
            f"{_fmt(e.get('top1'), '.4f')} | {_fmt(e.get('top5'), '.4f')} |"
        )
    return "\n".join(lines + [""] + _totals_lines(summary)) + "\n"


def _totals_lines(s: Mapping[str, Any]) -> list[str]:
    """The totals block under the results table."""
    reasons = sorted(s.get("drop_reasons", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    drops = ", ".join(f"{k}: {v}" for k, v in reasons[:5])  # reasons carry details: keep it short
    drops += f", {len(reasons) - 5} other reasons" if len(reasons) > 5 else ""
    ratio = "-" if s["compression_ratio"] is None else f"{s['compression_ratio']:.1f}x"
    enc_ms = None if s.get("mean_encode_s") is None else 1e3 * s["mean_encode_s"]
    target = "no target"
    if s["target_ppl"] is not None:
        tts = s["time_to_target_s"]
        reached = "not reached" if tts is None else f"{tts:.1f} s"
        target = f"{reached} (ppl <= {s['target_ppl']:g})"
    return [
        "## Totals",
        "",
        f"- updates applied: {s['updates_applied']}; dropped: {s['updates_dropped']}"
        + (f" ({drops})" if drops else ""),
        f"- bytes uploaded: {_fmt_bytes(s['bytes_uploaded'])} vs "
        f"{_fmt_bytes(s['bytes_uploaded_dense_equiv'])} dense (compression ratio {ratio})",
        f"- bytes downloaded (tasks of the applied updates): {_fmt_bytes(s.get('bytes_down_total'))}",
        f"- staleness: mean {_fmt(s['mean_staleness'], '.2f')}, max {_fmt(s['max_staleness'])}",
        f"- client encode: mean {_fmt(enc_ms, '.2f')} ms per update",
        f"- decode+apply: mean {_fmt(s['mean_decode_apply_ms'], '.2f')} ms per update",
        f"- wall-clock: {s['wall_clock_s']:.1f} s; time to target: {target}",
        f"- stop reason: {s['stop_reason']}",
    ]


def plot_runs(
    path: Path | str,
    runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
    *,
    title: str,
    target_ppl: float | None = None,
) -> None:
    """Plot eval perplexity vs wall-clock seconds for (label, eval events) pairs into a PNG."""
    from matplotlib.figure import Figure  # not pyplot: no global backend state; PNG uses Agg

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    values: list[float] = []
    for label, events in runs:
        points = [(e["t"], e["ppl"]) for e in _evals(events) if e.get("ppl") is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=4, label=label or None)
            values += [p for _, p in points]
    if not values:
        ax.text(0.5, 0.5, "no evaluations", transform=ax.transAxes, ha="center")
    if target_ppl:
        ax.axhline(target_ppl, linestyle="--", color="gray", label=f"target ppl {target_ppl:g}")
        values.append(target_ppl)
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set(xlabel="wall-clock s", ylabel="eval perplexity", title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------
# Comparing finished runs (CLI)
# ---------------------------------------------------------------------------------------------
def load_run(run_dir: Path | str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a finished run's summary.json and events.jsonl; RunDataError names a bad path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDataError(f"{run_dir}: no such run directory")
    path = run_dir / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDataError(f"{path}: missing (did the run finish? events.jsonl keeps what it logged)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDataError(f"{path}: unreadable or not JSON ({exc})") from None
    missing = [k for k in _COMPARE_KEYS if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise RunDataError(f"{path}: not a run summary, missing key(s) {', '.join(missing)}")
    return summary, read_events(run_dir / EVENTS_FILE)


def comparison_markdown(runs: Sequence[tuple[str, Mapping[str, Any], Sequence[Mapping]]]) -> str:
    """One table row per (label, summary, events); adds ppl at the shortest run's wall-clock."""
    t_equal = min(s["wall_clock_s"] for _, s, _ in runs)
    header = [
        "run",
        "mode",
        "rule",
        "compressor",
        "updates",
        "wall-clock s",
        "initial ppl",
        "final ppl",
        "best ppl",
        "time to target s",
        "bytes uploaded",
        "compression ratio",
        f"ppl @ {t_equal:.1f} s",
    ]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, s, events in runs:
        ratio = "-" if s["compression_ratio"] is None else f"{s['compression_ratio']:.1f}x"
        cells = [
            label,
            s["mode"],
            s["rule"],
            s["compressor"],
            _fmt(s["updates_applied"]),
            _fmt(s["wall_clock_s"], ".1f"),
            _fmt(s["initial_eval_ppl"], ".2f"),
            _fmt(s["final_eval_ppl"], ".2f"),
            _fmt(s["best_eval_ppl"], ".2f"),
            _fmt(s["time_to_target_s"], ".1f"),
            _fmt_bytes(s["bytes_uploaded"]),
            ratio,
            _fmt(ppl_at(events, t_equal), ".2f"),
        ]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows) + "\n"


def compare(run_dirs: Sequence[Path | str], out: Path | str = ".") -> str:
    """Write comparison.md and comparison.png for finished runs into `out`; return the table."""
    loaded = [(Path(d).resolve().name, *load_run(d)) for d in run_dirs]  # all checked first
    table = comparison_markdown(loaded)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table, encoding="utf-8")
    targets = {s["target_ppl"] for _, s, _ in loaded}
    plot_runs(
        out / "comparison.png",
        [(label, ev) for label, _, ev in loaded],
        title="eval perplexity vs wall-clock",
        target_ppl=targets.pop() if len(targets) == 1 else None,
    )
    return table


def _read_results(run_dir: Path | str) -> str:
    """The text of a run's results.md; RunDataError names a missing folder or file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDataError(f"{run_dir}: no such run directory")
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        raise RunDataError(f"{path}: missing (did the run finish?)")
    return path.read_text(encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: `compare RUN_DIR ... [--out DIR]` or `show RUN_DIR`; returns exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m asyncfl.results", description="Inspect and compare asyncfl run outputs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmp_ = sub.add_parser("compare", help="tabulate and plot finished runs side by side")
    cmp_.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cmp_.add_argument("--out", default=".", help="folder for comparison.md/.png (default: .)")
    show = sub.add_parser("show", help="print a run's results.md")
    show.add_argument("run_dir", metavar="RUN_DIR")
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            print(compare(args.run_dirs, args.out), end="")
        else:
            print(_read_results(args.run_dir), end="")
    except RunDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --out not writable, results.md deleted
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
