"""The run config: one table of keys, one validated frozen object built from it.

Every key of `[tool.flwr.app.config]` is declared once in `KEYS` with its default, its type,
what it means and how it is checked. `AppConfig.from_run_config` builds the typed object from
`context.run_config` (server and client call the same function) and raises one `ConfigError`
naming the key, the bad value and what is accepted, before any work starts.

`python -m asyncfl.config` prints the keys as the markdown table used in the README, and
`python -m asyncfl.config --toml` prints them as the `[tool.flwr.app.config]` block; a test
checks that both files agree with this module.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from asyncfl.stopping import BoundStopRule


class ConfigError(ValueError):
    """A run-config value is missing, unknown, of the wrong type or out of range."""


# --------------------------------------------------------------------------------------------
# Checks: each returns None when the value is fine, else the text "what is accepted".
# --------------------------------------------------------------------------------------------
def one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else "one of " + ", ".join(repr(c) for c in choices)


def at_least(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"a number >= {lo}"


def above(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v > lo else f"a number > {lo}"


def in_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"a number in [{lo}, {hi}]"


def speed_list(v: str) -> str | None:
    """`client-speeds`: '' or a comma list of factors >= 1 (by partition id)."""
    if v.strip() == "":
        return None
    try:
        factors = [float(p) for p in v.split(",")]
    except ValueError:
        return "a comma-separated list of numbers >= 1, e.g. \"1,1,2,4\""
    ok = all(math.isfinite(f) and f >= 1 for f in factors)
    return None if ok else "a comma-separated list of numbers >= 1, e.g. \"1,1,2,4\""


@dataclass(frozen=True)
class Key:
    name: str  # kebab-case key as written in pyproject.toml / --run-config
    default: Any  # its type (bool, int, float, str) is the key's type
    help: str  # one line for the README table
    check: Callable[[Any], str | None] | None = None
    group: str = "app"

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_").lower()


_NONNEG = at_least(0)
# the async rules; asyncfl.strategies.registry.RULES is the same tuple (a test checks): kept
# here as names so that the ClientApp, which reads the config, does not import torch
RULE_NAMES = ("fedasync", "fedbuff", "asgd", "dn", "fadas", "shifted", "saga", "saga-est", "page")
KEYS: tuple[Key, ...] = (
    # --- model ---------------------------------------------------------------------------------
    Key("model", "gpt2", "Hub id or local folder of a GPT-2 checkpoint", group="model"),
    Key("pretrained", True, "load pretrained weights from `model` (false: random init of its config)", group="model"),
    Key("model-preset", "", "\"\" (use `model`) | \"tiny\" (2 layers x 128, CPU tests) | \"small\" (GPT-2 124M shape), built from scratch", one_of("", "tiny", "small"), "model"),
    Key("tokenizer", "", "tokenizer Hub id or folder; \"\" = same as `model`", group="model"),
    Key("lora-rank", 0, "0 = full fine-tuning; > 0 = peft LoRA of this rank, only adapter tensors travel", _NONNEG, "model"),
    Key("lora-alpha", 16, "LoRA scaling alpha", above(0), "model"),
    Key("lora-dropout", 0.0, "LoRA dropout", in_range(0.0, 0.9), "model"),
    Key("device", "auto", "\"auto\" (CUDA when present) | \"cpu\" | \"cuda\"", one_of("auto", "cpu", "cuda"), "model"),
    Key("persistent-worker", "auto", "keep the model warm in a node-local worker process across messages: \"auto\" (on in deployment, where each message is a fresh process) | \"on\" | \"off\"", one_of("auto", "on", "off"), "model"),
    Key("compile", False, "torch.compile the client model (CUDA only; ignored on CPU)", group="model"),
    # --- data ----------------------------------------------------------------------------------
    Key("dataset", "Salesforce/wikitext", "Hub dataset id (used when `data-dir` is \"\")", group="data"),
    Key("dataset-config", "wikitext-2-raw-v1", "Hub dataset config name", group="data"),
    Key("data-dir", "", "\"\" = Hub; else a folder with wiki.train.raw / wiki.valid.raw / wiki.test.raw", group="data"),
    Key("train-split", "train", "split the clients train on (falls back to \"validation\" when a local folder has no train file, and says so)", one_of("train", "validation", "test"), "data"),
    Key("eval-split", "test", "split the server evaluates on", one_of("train", "validation", "test"), "data"),
    Key("block-size", 128, "tokens per training/eval block", in_range(8, 1024), "data"),
    Key("partitioner", "iid", "\"iid\" | \"articles\" (whole articles per client, non-IID) | \"size-skew\" (Dirichlet-imbalanced sizes)", one_of("iid", "articles", "size-skew"), "data"),
    Key("partition-alpha", 0.5, "Dirichlet concentration for \"size-skew\" (smaller = more imbalanced)", above(0), "data"),
    Key("max-train-blocks", 0, "cap on blocks per client (0 = all)", _NONNEG, "data"),
    Key("eval-max-blocks", 64, "cap on eval blocks (0 = all); with `eval-stride` the first eval-max-blocks x block-size tokens (0 = the whole stream)", _NONNEG, "data"),
    Key("eval-stride", 0, "eval protocol: 0 = non-overlapping blocks of `block-size`; S in [1, block-size] = Hugging Face's strided sliding window (windows of `block-size` tokens every S tokens, each scoring only the tokens past the previous window); see README, \"Evaluation\"", _NONNEG, "data"),
    Key("eval-stream", "articles", "eval token stream: \"articles\" (as training: articles tokenized one by one, an eos after each) | \"joined\" (rows joined with blank lines, tokenized as one text: Hugging Face's perplexity guide)", one_of("articles", "joined"), "data"),
    # --- local training ------------------------------------------------------------------------
    Key("local-epochs", 1, "local epochs per task (used when `local-steps` is 0)", at_least(1), "train"),
    Key("local-steps", 0, "local optimizer steps per task (0 = use `local-epochs`)", _NONNEG, "train"),
    Key("batch-size", 8, "local batch size (blocks)", at_least(1), "train"),
    Key("eval-batch-size", 16, "server evaluation batch size", at_least(1), "train"),
    Key("lr", 5e-4, "local AdamW learning rate", above(0), "train"),
    Key("weight-decay", 0.0, "local AdamW weight decay", _NONNEG, "train"),
    Key("seed", 42, "seed for model init, partitioning, sampling and selection", _NONNEG, "train"),
    # --- compression ---------------------------------------------------------------------------
    Key("compressor", "none", "delta encoding: \"none\" | \"pca\" | \"qrcp\" | \"cur\"", one_of("none", "pca", "qrcp", "cur"), "compress"),
    Key("rank", 10, "rank k of the low-rank factors (paper: 10)", at_least(1), "compress"),
    Key("compress-method", "randomized", "\"exact\" (SVD / scipy QRCP) | \"randomized\" (sketching, GPU-friendly)", one_of("exact", "randomized"), "compress"),
    Key("wire-dtype", "fp16", "dtype of the factors on the wire: \"fp16\" | \"fp32\"", one_of("fp16", "fp32"), "compress"),
    Key("download-dtype", "fp32", "dtype of the global weights sent to clients: \"fp32\" (exact) | \"fp16\" (half the downlink; the client trains from the rounded weights and its delta is taken against them, the server keeps fp32; a tensor beyond fp16 range goes as fp32)", one_of("fp32", "fp16"), "compress"),
    Key("downlink", "auto", "how tasks carry the global weights: \"full\" (every task) | \"log\" (the low-rank payloads applied since the node's last task, with their weights, while under half the size of the full weights; rules asgd, fedbuff and sync only) | \"auto\" (log in deployment when it applies)", one_of("auto", "full", "log"), "compress"),
    Key("energy", 0.0, "adaptive rank: smallest k <= `rank` capturing this energy fraction (0 = fixed rank)", in_range(0.0, 1.0), "compress"),
    Key("error-feedback", "none", "what a client does with the part of its delta the compressor dropped: \"none\" (lost) | \"ef\" (classic error feedback: kept on the client and added to its next delta; every rule, both modes) | \"ef21\" (EF21's client recursion g_i += decoded: rule \"shifted\" with shift-alpha 1.0, async only); see README, \"Error feedback\"", one_of("none", "ef", "ef21"), "compress"),
    Key("row-select", "greedy", "CUR row selection: \"greedy\" (most energy per row, on a sketch; best measured) | \"pivoted\" (QRCP pivots) | \"uniform\" (paper) | \"leverage\"", one_of("greedy", "pivoted", "uniform", "leverage"), "compress"),
    # --- server loop ---------------------------------------------------------------------------
    Key("mode", "async", "\"async\" (apply each update on arrival) | \"sync\" (FedAvg barrier per round)", one_of("async", "sync"), "server"),
    Key("rule", "asgd", "async rule: \"fedasync\" | \"fedbuff\" | \"asgd\" | \"dn\" (Delayed Nesterov) | \"fadas\" | \"shifted\" | \"saga\" | \"saga-est\" | \"page\"", one_of(*RULE_NAMES), "server"),
    Key("alpha", 0.6, "fedasync mixing weight a (x <- (1-a s(tau)) x + a s(tau) x_client)", in_range(0.0, 1.0), "server"),
    Key("staleness", "polynomial", "staleness weight s(tau): \"constant\" | \"polynomial\" | \"hinge\"", one_of("constant", "polynomial", "hinge"), "server"),
    Key("staleness-a", 0.5, "exponent (polynomial) or slope (hinge) of s(tau)", _NONNEG, "server"),
    Key("staleness-b", 4, "hinge: staleness tolerated at full weight", _NONNEG, "server"),
    Key("buffer-size", 2, "fedbuff: deltas buffered per server step", at_least(1), "server"),
    Key("server-lr", 0.0, "server step size; 0 = auto: each client delta weighs what it weighs in FedAvg over n nodes: sync 1, fedbuff K/n (min 1), asgd / dn / shifted / saga-est 1/n, saga / page 1 (they step with a table mean), fadas 1e-3 (a per-coordinate step)", _NONNEG, "server"),
    Key("server-momentum", 0.0, "momentum beta of the server step (0 = none): sync (FedAvgM; DiLoCo's outer Nesterov), fedbuff (once per buffer), asgd (every update), dn (the delayed momentum, Liu et al. 2024: 0.9)", in_range(0.0, 0.999), "server"),
    Key("nesterov", True, "server momentum in Nesterov form (step g + beta m) rather than heavy ball (step m)", group="server"),
    Key("fadas-beta1", 0.9, "fadas: first-moment decay of the server AMSGrad step", in_range(0.0, 0.999), "server"),
    Key("fadas-beta2", 0.99, "fadas: second-moment decay", in_range(0.0, 0.9999), "server"),
    Key("fadas-eps", 1e-8, "fadas: epsilon of the AMSGrad denominator", above(0), "server"),
    Key("fadas-tau-c", 0, "fadas: staleness up to which `server-lr` is used as is; above it min(server-lr, 1/tau_max) (0 = number of nodes)", _NONNEG, "server"),
    Key("page-p", 0.5, "page: probability that a task is a fresh estimate (else the client trains twice and sends the difference)", in_range(0.01, 1.0), "server"),
    Key("dylu", False, "dynamic local updates (Liu et al. 2024): each task's local steps scaled by the node's measured speed relative to the fastest node (`local-steps` for the fastest), so every node's task takes about as long", group="server"),
    Key("delay-adaptive", True, "asgd: shrink the step by concurrency/staleness when staleness > concurrency (Mishchenko et al. 2022; the slowest nodes' very stale updates then step less)", group="server"),
    Key("balance", False, "asgd: weight each node's updates by the mean node rate over its own (rate = 1 / measured task time, factor clipped to [1/n, n]), so every node's data counts equally however often it reports (Fraboni et al. 2023); a node counts 1 until a task after its first is timed", group="server"),
    Key("shift-alpha", 0.5, "shifted: h_i <- h_i + shift-alpha * decoded", in_range(0.0, 1.0), "server"),
    Key("max-staleness", 0, "drop (and log) updates staler than this (0 = keep all)", _NONNEG, "server"),
    Key("selection", "same", "who gets the next task: \"same\" | \"uniform\" (idle nodes) | \"loss-biased\" | \"time-aware\" (q favours nodes with short measured task times: the paper's sec. 2.1 objective, expected wall-clock per update, under q_i > 0)", one_of("same", "uniform", "loss-biased", "time-aware"), "server"),
    Key("selection-floor", 0.2, "loss-biased, time-aware: share of probability spread uniformly (keeps every q > 0)", in_range(0.0, 1.0), "server"),
    Key("selection-power", 1.0, "time-aware: q_i ~ (1 / task time)^power above the floor (1 = the share each node gets when all run without a cap)", _NONNEG, "server"),
    Key("concurrency", 0, "max tasks in flight (0 = one per node)", _NONNEG, "server"),
    Key("warmup", True, "before the run clock starts, every node builds its model, loads its data and runs one training step (a `query.warmup` message, at most `node-wait-s`), so start-up costs stay out of the run's times and out of the first tasks: `t`, `time-budget-s` and `wall_clock_s` count training; summary `extra.warmup_s` says how long it took", group="server"),
    Key("min-nodes", 2, "wait for this many nodes before starting", at_least(1), "server"),
    Key("node-wait-s", 120.0, "give up if `min-nodes` are not connected after this long", above(0), "server"),
    Key("poll-interval-s", 0.05, "server poll interval for replies", above(0), "server"),
    Key("prefetch", "auto", "queue each node's next task shortly before its current one ends, so a deployed SuperNode does not sleep through its idle poll between tasks (async mode; the queued task is staler): \"auto\" (in deployment, for nodes that do not report a short poll: Flower's flower-supernode polls every 3 s, asyncfl-supernode's nodes report theirs and get no queued tasks; off in simulation) | \"on\" | \"off\"", one_of("auto", "on", "off"), "server"),
    Key("prefetch-lead-s", 3.0, "prefetch: push the queued task this many seconds (plus the time the last pushes took) before the node's expected finish, estimated from its previous tasks", _NONNEG, "server"),
    Key("pack", "auto", "send the global weights as one Flower Array (safetensors bytes, asyncfl/wire.py) instead of one per tensor (what any Flower ClientApp reads): Flower moves every Array as its own object, and in deployment the per-object round trips, not the bytes, are most of a message's cost; payloads and update logs travel as one Array either way: \"auto\" (on in deployment, off in simulation) | \"on\" | \"off\"", one_of("auto", "on", "off"), "server"),
    Key("task-ttl-s", 3600.0, "TTL of a task message; expired tasks come back as errors and are re-dispatched", above(0), "server"),
    Key("max-node-failures", 3, "retire a node after this many consecutive error replies", at_least(1), "server"),
    # --- stopping ------------------------------------------------------------------------------
    Key("num-rounds", 3, "sync: rounds; async: `max-updates` = num-rounds x nodes when that is 0. Not a stop condition when `time-budget-s` or `target-ppl` is set: those stop the run", at_least(1), "stop"),
    Key("max-updates", 0, "async: stop after this many applied updates (0 = num-rounds x nodes, or no limit when `time-budget-s` or `target-ppl` is set)", _NONNEG, "stop"),
    Key("time-budget-s", 0.0, "stop after this many wall-clock seconds (0 = off)", _NONNEG, "stop"),
    Key("target-ppl", 0.0, "stop when eval perplexity <= this (0 = off)", _NONNEG, "stop"),
    Key("stop-rule", "none", "\"none\" | \"bound\" (paper 3.4 convergence-bound rule)", one_of("none", "bound"), "stop"),
    Key("bound-n", 0, "bound: n in lambda = 1 - n mu (1 + 3 rho_bar/8) (0 = number of clients)", _NONNEG, "stop"),
    Key("bound-lipschitz", 10.0, "bound: L, smoothness constant", above(0), "stop"),
    Key("bound-mu", 0.0, "bound: mu (0 = 1/L, as in the paper)", _NONNEG, "stop"),
    Key("bound-rho-bar", 1.0, "bound: rho_bar, selection skew", _NONNEG, "stop"),
    Key("bound-a1", 0.0, "bound: A1 = F(w0) - F* (0 = initial eval loss, taking F* = 0)", _NONNEG, "stop"),
    Key("bound-c", 0.05, "bound: C = 32 tau^2 G^2 + sigma^2 + 6 rho L Gamma (paper: 0.03-0.1)", _NONNEG, "stop"),
    Key("bound-d", 0.0, "bound: D = 2 Gamma (rho_tilde - rho_bar) (paper: 0-1; 0 for IID)", _NONNEG, "stop"),
    Key("eval-every", 1, "evaluate every N rounds (sync) or N applied updates (async)", at_least(1), "stop"),
    # --- heterogeneity emulation ---------------------------------------------------------------
    Key("client-speeds", "", "comma list by partition id: factor f sleeps (f-1) x compute time (\"\" = all 1)", speed_list, "emulate"),
    Key("uplink-mbps", 0.0, "emulated uplink: sleep bytes x 8 / (rate x 1e6) (0 = off)", _NONNEG, "emulate"),
    # --- outputs and faults --------------------------------------------------------------------
    Key("results-dir", "results", "folder for run outputs", group="output"),
    Key("run-name", "", "subfolder of `results-dir` (\"\" = <mode>-<rule>-<compressor>-<time>)", group="output"),
    Key("save-model", True, "write the final model with save_pretrained to <run>/model", group="output"),
    Key("checkpoint-every", 0, "write a checkpoint every N applied updates (0 = off)", _NONNEG, "output"),
    Key("resume-from", "", "checkpoint file to continue from (version count, rule state kept)", group="output"),
)
KEYS_BY_NAME = {k.name: k for k in KEYS}


def _coerce(key: Key, value: Any) -> Any:
    """Return `value` as the key's type, or raise ConfigError."""
    want = type(key.default)
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
    elif want is str:
        if isinstance(value, str):
            return value
    shown = f'"{value}"' if isinstance(value, str) else repr(value)
    raise ConfigError(f"run config key `{key.name}` must be a {want.__name__}, got {shown}")


def _make_config_class() -> type:
    fields = [(k.attr, type(k.default), dataclasses.field(default=k.default)) for k in KEYS]
    return dataclasses.make_dataclass("_AppConfigBase", fields, frozen=True)


class AppConfig(_make_config_class()):  # type: ignore[misc]
    """Typed, validated run config. Attribute names are the keys in snake_case."""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppConfig:
        unknown = sorted(set(run_config) - set(KEYS_BY_NAME))
        if unknown:
            raise ConfigError(
                f"unknown run config key(s) {', '.join(unknown)}; "
                f"known keys: {', '.join(KEYS_BY_NAME)}"
            )
        values = {}
        for key in KEYS:
            value = _coerce(key, run_config.get(key.name, key.default))
            problem = key.check(value) if key.check else None
            if problem:
                shown = f'"{value}"' if isinstance(value, str) else repr(value)
                raise ConfigError(f"run config key `{key.name}` must be {problem}, got {shown}")
            values[key.attr] = value
        cfg = cls(**values)
        cfg._check_combinations()
        return cfg

    def _check_combinations(self) -> None:
        if self.model_preset == "" and not self.model:
            raise ConfigError(
                "run config key `model` must name a Hub id or folder when `model-preset` is \"\""
            )
        if self.downlink == "log" and self.mode == "async" and self.rule not in ("asgd", "fedbuff"):
            raise ConfigError(
                f"run config key `downlink` = \"log\" needs a rule whose steps are weighted sums of "
                f"client payloads (\"asgd\", \"fedbuff\") or mode \"sync\", got rule \"{self.rule}\"; "
                "use downlink \"auto\" or \"full\""
            )
        if self.downlink == "log" and self.server_momentum:
            raise ConfigError(
                f"run config key `downlink` = \"log\" replays the payloads of each step, but "
                f"`server-momentum` = {self.server_momentum} adds the momentum of older steps; "
                "use downlink \"auto\" or \"full\", or server-momentum 0"
            )
        if self.prefetch == "on" and self.selection != "same" and self.concurrency:
            raise ConfigError(
                f"run config key `prefetch` = \"on\" keeps each working node busy, which defeats "
                f"`selection` = \"{self.selection}\" under a `concurrency` cap of {self.concurrency}: "
                "use selection \"same\", concurrency 0, or prefetch \"off\" / \"auto\""
            )
        if self.balance and (self.mode, self.rule) != ("async", "asgd"):
            raise ConfigError(
                f"run config key `balance` = true weights asgd's steps per node; it needs mode "
                f"\"async\" and rule \"asgd\", got mode \"{self.mode}\" rule \"{self.rule}\""
            )
        if self.eval_stride > self.block_size:
            raise ConfigError(
                f"run config key `eval-stride` must be 0 or in [1, block-size = {self.block_size}] "
                f"(a longer stride would skip tokens), got {self.eval_stride}"
            )
        if self.error_feedback == "ef21" and (self.mode, self.rule, self.shift_alpha) != ("async", "shifted", 1.0):
            raise ConfigError(
                "run config key `error-feedback` = \"ef21\" is EF21's client recursion g_i += decoded, "
                "whose server steps with the running mean of the g_i: that is mode \"async\" with rule "
                f"\"shifted\" and shift-alpha 1.0, got mode \"{self.mode}\", rule \"{self.rule}\", "
                f"shift-alpha {self.shift_alpha}; use error-feedback \"ef\" (any rule, both modes) or set those"
            )
        if self.stop_rule == "bound":
            try:  # lambda must lie in (0, 1) for the bound to mean anything
                self.bound_rule(num_clients=max(self.bound_n, 1))
            except ValueError as exc:
                raise ConfigError(f"stop-rule \"bound\": {exc}") from None

    # ---- derived values -------------------------------------------------------------------
    def speeds(self) -> list[float]:
        """Per-partition slow-down factors (empty list = all 1)."""
        s = self.client_speeds.strip()
        return [float(p) for p in s.split(",")] if s else []

    def speed_of(self, partition_id: int) -> float:
        s = self.speeds()
        return s[partition_id] if partition_id < len(s) else 1.0

    def bound_rule(self, num_clients: int, a1: float | None = None) -> BoundStopRule:
        """The paper's 3.4 stopping rule with this config's constants."""
        mu = self.bound_mu or 1.0 / self.bound_lipschitz
        return BoundStopRule(
            n=self.bound_n or num_clients, mu=mu, rho_bar=self.bound_rho_bar,
            L=self.bound_lipschitz, A1=self.bound_a1 or (a1 if a1 is not None else 1.0),
            C=self.bound_c, D=self.bound_d, eta=self.lr,
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with the public (kebab-case) key names."""
        return {k.name: getattr(self, k.attr) for k in KEYS}


# --------------------------------------------------------------------------------------------
# Documentation helpers: README table and pyproject block are generated from KEYS.
# --------------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def markdown_table() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for k in KEYS:
        rows.append(f"| `{k.name}` | `{_toml_value(k.default)}` | {k.help.replace('|', '&#124;')} |")
    return "\n".join(rows)


def toml_block() -> str:
    return "\n".join(f"{k.name} = {_toml_value(k.default)}" for k in KEYS)


# One item of a `key=value ...` string: runs of non-blank characters and quoted strings (TOML
# basic "..." with backslash escapes, literal '...'), so a quoted value may hold blanks; an
# unclosed quote runs to the end of the string (and the item then fails to parse, by name).
_OVERRIDE_ITEM = re.compile(r"""(?:"(?:[^"\\]|\\.)*(?:"|\\?$)|'[^']*(?:'|$)|[^\s"'])+""")


def parse_overrides(spec: str) -> dict[str, Any]:
    """`key=value key2="text" ...` -> dict, values read as TOML (as `flwr run --run-config`
    takes them: strings in double quotes, numbers, true/false); later items win. Items are
    separated by blanks outside quotes. Raises `ConfigError` naming the first item that is
    not `key=value` with a TOML value. Keys are not checked here (`AppConfig` does that)."""
    import tomllib

    out: dict[str, Any] = {}
    for match in _OVERRIDE_ITEM.finditer(spec):
        item = match.group()
        try:
            out.update(tomllib.loads(item))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"run-config item {item!r} is not key=value with a TOML value "
                              f'(strings in double quotes, e.g. mode="sync"): {exc}') from None
    return out


def merged_toml(base: str, overrides: str) -> str:
    """A run-config TOML: the keys of the TOML file `base`, then the `k=v ...` `overrides`
    (`parse_overrides`), checked against the key table.
    `flwr run` takes either a TOML file or key-value pairs, not both; this makes one file."""
    import tomllib

    try:
        with open(base, "rb") as f:
            values = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read run-config file {base}: {exc}") from None
    values.update(parse_overrides(overrides))
    AppConfig.from_run_config(values)  # unknown keys and bad values fail here, by name
    return "\n".join(f"{k} = {_toml_value(v)}" for k, v in values.items()) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--merge"] and len(args) in (2, 3):
        try:
            print(merged_toml(args[1], args[2] if len(args) == 3 else ""), end="")
        except ConfigError as exc:
            sys.exit(f"error: {exc}")
    else:
        print(toml_block() if "--toml" in args else markdown_table())
