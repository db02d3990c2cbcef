"""asyncfl's server loop as a Flower strategy for your own ServerApp.

    from asyncfl.strategies import AsyncStrategy, SyncFedAvg

    strategy = AsyncStrategy.from_config(trainable, rule="fedbuff", buffer_size=2, min_nodes=2)
    result = strategy.start(grid, initial_arrays=ArrayRecord(trainable), num_rounds=10,
                            evaluate_fn=my_eval)

`from_config` takes the tensors that travel (name -> tensor, or an ArrayRecord) and run-config
keys (`asyncfl.config.KEYS`, the README's "Run config" table), as a `key=value ...` string
and/or keyword arguments in snake_case (`buffer_size=2` is the key `buffer-size`), validated by
`AppConfig` (a `ConfigError` names an unknown key or a bad value). It builds the rule, the
client selector and a `RunRecorder` writing `<results-dir>/<run-name>/` (keys `results-dir`,
default "results", and `run-name`, default `<mode>-<rule>-<compressor>-<time>`). `start()` is
Flower's (`ServerLoop.start`); when it returns, the run folder holds `events.jsonl`,
`summary.json`, `results.md` and `plot.png`, and `strategy.run_summary` is the summary. The
strategy keeps its own copy of the tensors; `evaluate_fn` receives them as an ArrayRecord.
One run per strategy object.

What the ClientApp must do
--------------------------
The strategy talks to nodes as asyncfl's own ClientApp (`asyncfl.client.app`) expects, and a
ClientApp of yours must answer the same way (`asyncfl.client.app.handle_train` is the reference):

Training task (`MessageType.TRAIN`, `@app.train()`), content:

* `"config"` (ConfigRecord): `version` (int, the global version of the weights sent),
  `repeat` (int, > 0 when the node already got a task of this version: draw other batches),
  `run-key` (str, names this run), `rule` (str), `downlink` ("full" or "log"), `pack` (bool),
  `local-steps` (int, only with `dylu`), and every entry of `start()`'s `train_config`.
* `"arrays"` (ArrayRecord): the global trainable tensors, under the names given to
  `from_config` (fp32, or fp16 with `download-dtype="fp16"`). With `pack` true the record is
  one wire Array (safetensors bytes, `asyncfl.wire`), else one Flower Array per tensor: read
  either with `asyncfl.wire.arrays_of`.
* With `downlink` "log" (deployment with a compressor and a linear rule; `downlink="full"`
  turns it off) there is no `"arrays"`: `base-version`, `log-coefs`, `log-n` in the config and
  records `"log-0"`... hold the payloads applied since the node's previous task, each as its
  client sent it (`asyncfl.protocol.UpdateLog`); a node holding no weights of `base-version`
  answers with metrics `{"need-full": 1}` and gets the full weights next.

Its reply (content):

* `"arrays"` (ArrayRecord): the delta `trained - received` of every tensor, encoded by
  `asyncfl.compressors.get_compressor(name, rank=...).encode_state(delta)` (`"none"` sends it
  dense); the server checks names, shapes and ranks (`decode_state`) and rejects anything else
  before touching the global model. That record is one wire Array (`asyncfl.wire`), whatever
  `pack` says.
* `"metrics"` (MetricRecord): `num-examples` (the weight in the sync mean; 1 if absent) and
  `train-loss` (loss-biased selection, histories); optionally `partition-id`, `steps`,
  `client-s` (the handler's seconds: task times, prefetch, DyLU), `bytes`, `dense-bytes`,
  `rec-error`, `fro-error` (the bound stopping rule), `encode-s`, `train-s`, `tokens-per-s`,
  `idle-poll-s`. Every numeric metric also goes into `Result.train_metrics_clientapp`.

An error reply (the ClientApp raised) re-dispatches the node, or retires it after
`max-node-failures` in a row. With `warmup` on (the default) each node first gets a
`query.warmup` message (config `run-key`, `pack`, `version`; with the update-log downlink also
the weights); `@app.query("warmup")` answers with metrics, and a ClientApp without that handler
should be run with `warmup=False` (its error replies are only logged, but cost a round trip).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from asyncfl.config import AppConfig, ConfigError, parse_overrides
from asyncfl.model import resolve_device
from asyncfl.results import RunRecorder
from asyncfl.strategies.async_loop import AsyncLoop
from asyncfl.strategies.build import build_rule, build_selector, run_dir_for
from asyncfl.strategies.loop import EvaluateFn, ServerLoop
from asyncfl.strategies.server_state import Checkpointer, Clock, ServerState, load_checkpoint
from asyncfl.strategies.sync_loop import SyncLoop
from asyncfl.wire import arrays_of

Tensors = Mapping[str, torch.Tensor] | Mapping[str, np.ndarray] | ArrayRecord


def run_config_of(run_config: str | Mapping[str, Any], keys: Mapping[str, Any], mode: str) -> AppConfig:
    """The validated config: `run_config` (a `key=value ...` string as `flwr run --run-config`
    takes it, or a mapping of kebab-case keys), then `keys` (snake_case keyword arguments), in
    `mode`. Raises ConfigError naming an unknown key, a bad value, or another mode."""
    values = parse_overrides(run_config) if isinstance(run_config, str) else dict(run_config)
    values.update({k.replace("_", "-"): v for k, v in keys.items()})
    if values.setdefault("mode", mode) != mode:
        raise ConfigError(
            f'run config key `mode` is "{mode}" for this strategy, got '
            f'"{values["mode"]}" (AsyncStrategy runs "async", SyncFedAvg "sync")'
        )
    return AppConfig.from_run_config(values)


def own_tensors(state: Tensors, device: torch.device) -> dict[str, torch.Tensor]:
    """Copies of the tensors of `state` on `device` (their dtypes kept)."""
    items = arrays_of(state) if isinstance(state, ArrayRecord) else state
    out = {}
    for name, value in items.items():
        if isinstance(value, np.ndarray):
            tensor = torch.from_numpy(np.array(value))  # a writable copy
        else:
            tensor = torch.as_tensor(value).detach().clone()
        out[name] = tensor.to(device)
    if not out:
        raise ValueError("the model state is empty: give the trainable tensors that travel")
    return out


class _OwnRun(ServerLoop):
    """A loop that builds its own state from run-config keys (`from_config`) and writes the
    run's outputs when `start()` returns; the mode comes from the concrete class."""

    mode: ClassVar[str]

    def __init__(self, state: ServerState, clock: Clock | None = None) -> None:
        super().__init__(state, clock=clock)
        self.run_summary: dict[str, Any] | None = None  # summary.json, once start() has run
        self._started = False

    @classmethod
    def from_config(
        cls, model_state: Tensors, run_config: str | Mapping[str, Any] = "", *, clock: Clock | None = None, **keys: Any
    ) -> Self:
        """A strategy over the tensors `model_state` (name -> tensor or array, or an
        ArrayRecord: the names and shapes that travel) with the run-config keys of
        `run_config` and `keys` (see `run_config_of`). The tensors are copied to the `device`
        key's device ("auto": CUDA when available). `clock` (default: real time) times the run."""
        cfg = run_config_of(run_config, keys, cls.mode)
        clock = clock or Clock()
        device = resolve_device(cfg)
        x = own_tensors(model_state, device)
        run_dir = run_dir_for(cfg)
        ckpt = load_checkpoint(cfg.output.resume_from) if cfg.output.resume_from else None
        recorder = RunRecorder.for_run(
            cfg, run_dir, eval_split="evaluate_fn", train_split="clientapp", clock=clock.now, resume=ckpt is not None
        )
        state = ServerState(
            cfg=cfg,
            x=x,
            device=device,
            rule_factory=lambda n: build_rule(cfg, n),
            selector=build_selector(cfg),
            recorder=recorder,
            evaluate_fn=lambda: {},  # no evaluator of its own: start()'s evaluate_fn evaluates
            run_key=run_dir.name,
            run_dir=run_dir,
            resume=ckpt,
        )
        return cls(state, clock=clock)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | Mapping[str, Any] | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """`ServerLoop.start`, then the run's outputs: a last checkpoint (with
        `checkpoint-every`), summary.json, results.md and plot.png (`run_summary`)."""
        if self._started:
            raise RuntimeError("this strategy has run once; build a new one with from_config")
        self._started = True
        result = super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)
        if self.cfg.output.checkpoint_every:
            Checkpointer(self.s).save(self.s)
        self.run_summary = self.s.recorder.finish(stop_reason=self.s.final_reason, extra=self.run_extras())
        return result


class AsyncStrategy(_OwnRun, AsyncLoop):
    """asyncfl's asynchronous server loop (each update applied on arrival through `rule`) as a
    Flower strategy; build it with `from_config`. See the module docstring for what the tasks
    and replies carry."""

    mode: ClassVar[str] = "async"


class SyncFedAvg(_OwnRun, SyncLoop):
    """FedAvg (FedAvgM with `server-momentum`) over the same dispatch code: a barrier per round
    and the `num-examples`-weighted mean of the decoded deltas; build it with `from_config`."""

    mode: ClassVar[str] = "sync"
