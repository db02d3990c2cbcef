"""The run config: one frozen dataclass per group of keys, typed, validated in one place.

Every key of `[tool.flwr.app.config]` is one field of a group (`ModelConfig`, `DataConfig`,
`TrainConfig`, `CompressConfig`, `ServerConfig`, `StopConfig`, `EmulateConfig`,
`OutputConfig`), declared with `key(...)`: its public (kebab-case) name, default, help text and
range check; its type is the field's annotation (`bool`, `int`, `float`, `str`, or a `Literal`
whose arguments are the accepted names, shared with the registries through `asyncfl.choices`).
The field name is the key in snake_case. `AppConfig` holds one instance per group
(`cfg.server.rule`, `cfg.train.local_steps`); `KEYS` lists the keys in table order.

`AppConfig.from_run_config` builds it from `context.run_config` (server and client call the
same function); every group checks its fields when built, and `AppConfig` the keys that depend
on one another, each raising one `ConfigError` naming the key, the bad value and what is
accepted, before any work starts.

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
from typing import Any, ClassVar, Literal, get_origin, get_type_hints

from asyncfl.choices import (
    CompressMethod,
    CompressorName,
    RowSelect,
    RuleName,
    SelectionName,
    StalenessKind,
    WireDtype,
    choices,
)
from asyncfl.choices import one_of as _one_of_text
from asyncfl.stopping import BoundStopRule


class ConfigError(ValueError):
    """A run-config value is missing, unknown, of the wrong type or out of range."""


# --------------------------------------------------------------------------------------------
# Checks: each returns None when the value is fine, else the text "what is accepted".
# --------------------------------------------------------------------------------------------
def one_of(*names: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in names else _one_of_text(names)


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
        return 'a comma-separated list of numbers >= 1, e.g. "1,1,2,4"'
    ok = all(math.isfinite(f) and f >= 1 for f in factors)
    return None if ok else 'a comma-separated list of numbers >= 1, e.g. "1,1,2,4"'


AutoOnOff = Literal["auto", "on", "off"]
Split = Literal["train", "validation", "test"]


def key(name: str, default: Any, help: str, check: Callable[[Any], str | None] | None = None) -> Any:
    """A config field: run-config key `name` (kebab-case, as written in pyproject.toml and
    `--run-config`), its default, one line of help for the README table, and a range check
    (None or the text "what is accepted"). Choices are not checked here: a `Literal` field's
    type lists them."""
    return dataclasses.field(default=default, metadata={"key": name, "help": help, "check": check})


@dataclass(frozen=True)
class Key:
    """One run-config key as the table shows it, read from its field."""

    name: str  # kebab-case key as written in pyproject.toml / --run-config
    default: Any
    help: str  # one line for the README table
    check: Callable[[Any], str | None] | None  # range or choice check: None, or "what is accepted"
    group: str  # the `AppConfig` attribute holding it
    attr: str  # the field name: the key in snake_case
    type: type  # bool, int, float or str (a Literal's names are str)
    choices: tuple[str, ...] = ()  # a Literal field's names, in the order written


def _shown(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _coerce(key: Key, value: Any) -> Any:
    """Return `value` as the key's type, or raise ConfigError."""
    want = key.type
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
    raise ConfigError(f"run config key `{key.name}` must be a {want.__name__}, got {_shown(value)}")


class _Group:
    """Base of the groups: builds the `Key` of each field and checks every value when built."""

    group: ClassVar[str]

    def __post_init__(self) -> None:
        for k in self.keys():
            value = _coerce(k, getattr(self, k.attr))
            problem = k.check(value) if k.check else None
            if problem:
                raise ConfigError(f"run config key `{k.name}` must be {problem}, got {_shown(value)}")
            object.__setattr__(self, k.attr, value)  # an int given for a float key becomes a float

    @classmethod
    def keys(cls) -> tuple[Key, ...]:
        """The group's keys, in the order its fields are written."""
        if cls not in _KEYS_OF:
            _KEYS_OF[cls] = _group_keys(cls)
        return _KEYS_OF[cls]


_KEYS_OF: dict[type[_Group], tuple[Key, ...]] = {}


def _group_keys(cls: type[_Group]) -> tuple[Key, ...]:
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # every group is a dataclass
        hint = hints[f.name]
        names: tuple[str, ...] = ()
        if get_origin(hint) is Literal:
            names = choices(hint)
            typ: type = str
            check = one_of(*names)
        else:
            typ, check = hint, f.metadata["check"]
        if typ not in (bool, int, float, str) or not isinstance(f.default, typ):
            raise TypeError(f"config field {cls.__name__}.{f.name}: type {hint} with default {f.default!r}")
        out.append(Key(f.metadata["key"], f.default, f.metadata["help"], check, cls.group, f.name, typ, names))
    return tuple(out)


@dataclass(frozen=True)
class ModelConfig(_Group):
    group: ClassVar[str] = "model"

    model: str = key("model", "gpt2", "Hub id or local folder of a GPT-2 checkpoint")
    pretrained: bool = key(
        "pretrained", True, "load pretrained weights from `model` (false: random init of its config)"
    )
    model_preset: Literal["", "tiny", "small"] = key(
        "model-preset",
        "",
        '"" (use `model`) | "tiny" (2 layers x 128, CPU tests) | "small" (GPT-2 124M shape), built from scratch',
    )
    tokenizer: str = key("tokenizer", "", 'tokenizer Hub id or folder; "" = same as `model`')
    lora_rank: int = key(
        "lora-rank", 0, "0 = full fine-tuning; > 0 = peft LoRA of this rank, only adapter tensors travel", at_least(0)
    )
    lora_alpha: int = key("lora-alpha", 16, "LoRA scaling alpha", above(0))
    lora_dropout: float = key("lora-dropout", 0.0, "LoRA dropout", in_range(0.0, 0.9))
    device: Literal["auto", "cpu", "cuda"] = key("device", "auto", '"auto" (CUDA when present) | "cpu" | "cuda"')
    persistent_worker: AutoOnOff = key(
        "persistent-worker",
        "auto",
        'keep the model warm in a node-local worker process across messages: "auto" (on in deployment, where each message is a fresh process) | "on" | "off"',
    )
    compile: bool = key("compile", False, "torch.compile the client model (CUDA only; ignored on CPU)")


@dataclass(frozen=True)
class DataConfig(_Group):
    group: ClassVar[str] = "data"

    dataset: str = key("dataset", "Salesforce/wikitext", 'Hub dataset id (used when `data-dir` is "")')
    dataset_config: str = key("dataset-config", "wikitext-2-raw-v1", "Hub dataset config name")
    data_dir: str = key("data-dir", "", '"" = Hub; else a folder with wiki.train.raw / wiki.valid.raw / wiki.test.raw')
    train_split: Split = key(
        "train-split",
        "train",
        'split the clients train on (falls back to "validation" when a local folder has no train file, and says so)',
    )
    eval_split: Split = key("eval-split", "test", "split the server evaluates on")
    block_size: int = key("block-size", 128, "tokens per training/eval block", in_range(8, 1024))
    partitioner: Literal["iid", "articles", "size-skew"] = key(
        "partitioner",
        "iid",
        '"iid" | "articles" (whole articles per client, non-IID) | "size-skew" (Dirichlet-imbalanced sizes)',
    )
    partition_alpha: float = key(
        "partition-alpha", 0.5, 'Dirichlet concentration for "size-skew" (smaller = more imbalanced)', above(0)
    )
    max_train_blocks: int = key("max-train-blocks", 0, "cap on blocks per client (0 = all)", at_least(0))
    eval_max_blocks: int = key(
        "eval-max-blocks",
        64,
        "cap on eval blocks (0 = all); with `eval-stride` the first eval-max-blocks x block-size tokens (0 = the whole stream)",
        at_least(0),
    )
    eval_stride: int = key(
        "eval-stride",
        0,
        'eval protocol: 0 = non-overlapping blocks of `block-size`; S in [1, block-size] = Hugging Face\'s strided sliding window (windows of `block-size` tokens every S tokens, each scoring only the tokens past the previous window); see README, "Evaluation"',
        at_least(0),
    )
    eval_stream: Literal["articles", "joined"] = key(
        "eval-stream",
        "articles",
        'eval token stream: "articles" (as training: articles tokenized one by one, an eos after each) | "joined" (rows joined with blank lines, tokenized as one text: Hugging Face\'s perplexity guide)',
    )


@dataclass(frozen=True)
class TrainConfig(_Group):
    group: ClassVar[str] = "train"

    local_epochs: int = key("local-epochs", 1, "local epochs per task (used when `local-steps` is 0)", at_least(1))
    local_steps: int = key("local-steps", 0, "local optimizer steps per task (0 = use `local-epochs`)", at_least(0))
    batch_size: int = key("batch-size", 8, "local batch size (blocks)", at_least(1))
    eval_batch_size: int = key("eval-batch-size", 16, "server evaluation batch size", at_least(1))
    lr: float = key("lr", 5e-4, "local AdamW learning rate", above(0))
    weight_decay: float = key("weight-decay", 0.0, "local AdamW weight decay", at_least(0))
    seed: int = key("seed", 42, "seed for model init, partitioning, sampling and selection", at_least(0))


@dataclass(frozen=True)
class CompressConfig(_Group):
    group: ClassVar[str] = "compress"

    compressor: CompressorName = key("compressor", "none", 'delta encoding: "none" | "pca" | "qrcp" | "cur"')
    rank: int = key("rank", 10, "rank k of the low-rank factors (paper: 10)", at_least(1))
    compress_method: CompressMethod = key(
        "compress-method", "randomized", '"exact" (SVD / scipy QRCP) | "randomized" (sketching, GPU-friendly)'
    )
    wire_dtype: WireDtype = key("wire-dtype", "fp16", 'dtype of the factors on the wire: "fp16" | "fp32"')
    download_dtype: Literal["fp32", "fp16"] = key(
        "download-dtype",
        "fp32",
        'dtype of the global weights sent to clients: "fp32" (exact) | "fp16" (half the downlink; the client trains from the rounded weights and its delta is taken against them, the server keeps fp32; a tensor beyond fp16 range goes as fp32)',
    )
    downlink: Literal["auto", "full", "log"] = key(
        "downlink",
        "auto",
        'how tasks carry the global weights: "full" (every task) | "log" (the low-rank payloads applied since the node\'s last task, with their weights, while under half the size of the full weights; rules asgd, fedbuff and sync only) | "auto" (log in deployment when it applies)',
    )
    energy: float = key(
        "energy",
        0.0,
        "adaptive rank: smallest k <= `rank` capturing this energy fraction (0 = fixed rank)",
        in_range(0.0, 1.0),
    )
    error_feedback: Literal["none", "ef", "ef21"] = key(
        "error-feedback",
        "none",
        'what a client does with the part of its delta the compressor dropped: "none" (lost) | "ef" (classic error feedback: kept on the client and added to its next delta; every rule, both modes) | "ef21" (EF21\'s client recursion g_i += decoded: rule "shifted" with shift-alpha 1.0, async only); see README, "Error feedback"',
    )
    row_select: RowSelect = key(
        "row-select",
        "greedy",
        'CUR row selection: "greedy" (most energy per row, on a sketch; best measured) | "pivoted" (QRCP pivots) | "uniform" (paper) | "leverage"',
    )


@dataclass(frozen=True)
class ServerConfig(_Group):
    group: ClassVar[str] = "server"

    mode: Literal["async", "sync"] = key(
        "mode", "async", '"async" (apply each update on arrival) | "sync" (FedAvg barrier per round)'
    )
    rule: RuleName = key(
        "rule",
        "asgd",
        'async rule: "fedasync" | "fedbuff" | "asgd" | "dn" (Delayed Nesterov) | "fadas" | "shifted" | "saga" | "saga-est" | "page"',
    )
    alpha: float = key(
        "alpha", 0.6, "fedasync mixing weight a (x <- (1-a s(tau)) x + a s(tau) x_client)", in_range(0.0, 1.0)
    )
    staleness: StalenessKind = key(
        "staleness", "polynomial", 'staleness weight s(tau): "constant" | "polynomial" | "hinge"'
    )
    staleness_a: float = key("staleness-a", 0.5, "exponent (polynomial) or slope (hinge) of s(tau)", at_least(0))
    staleness_b: int = key("staleness-b", 4, "hinge: staleness tolerated at full weight", at_least(0))
    buffer_size: int = key("buffer-size", 2, "fedbuff: deltas buffered per server step", at_least(1))
    server_lr: float = key(
        "server-lr",
        0.0,
        "server step size; 0 = auto: each client delta weighs what it weighs in FedAvg over n nodes: sync 1, fedbuff K/n (min 1), asgd / dn / shifted / saga-est 1/n, saga / page 1 (they step with a table mean), fadas 1e-3 (a per-coordinate step)",
        at_least(0),
    )
    server_momentum: float = key(
        "server-momentum",
        0.0,
        "momentum beta of the server step (0 = none): sync (FedAvgM; DiLoCo's outer Nesterov), fedbuff (once per buffer), asgd (every update), dn (the delayed momentum, Liu et al. 2024: 0.9)",
        in_range(0.0, 0.999),
    )
    nesterov: bool = key(
        "nesterov", True, "server momentum in Nesterov form (step g + beta m) rather than heavy ball (step m)"
    )
    fadas_beta1: float = key(
        "fadas-beta1", 0.9, "fadas: first-moment decay of the server AMSGrad step", in_range(0.0, 0.999)
    )
    fadas_beta2: float = key("fadas-beta2", 0.99, "fadas: second-moment decay", in_range(0.0, 0.9999))
    fadas_eps: float = key("fadas-eps", 1e-8, "fadas: epsilon of the AMSGrad denominator", above(0))
    fadas_tau_c: int = key(
        "fadas-tau-c",
        0,
        "fadas: staleness up to which `server-lr` is used as is; above it min(server-lr, 1/tau_max) (0 = number of nodes)",
        at_least(0),
    )
    page_p: float = key(
        "page-p",
        0.5,
        "page: probability that a task is a fresh estimate (else the client trains twice and sends the difference)",
        in_range(0.01, 1.0),
    )
    dylu: bool = key(
        "dylu",
        False,
        "dynamic local updates (Liu et al. 2024): each task's local steps scaled by the node's measured speed relative to the fastest node (`local-steps` for the fastest), so every node's task takes about as long",
    )
    delay_adaptive: bool = key(
        "delay-adaptive",
        True,
        "asgd: shrink the step by concurrency/staleness when staleness > concurrency (Mishchenko et al. 2022; the slowest nodes' very stale updates then step less)",
    )
    balance: bool = key(
        "balance",
        False,
        "asgd: weight each node's updates by the mean node rate over its own (rate = 1 / measured task time, factor clipped to [1/n, n]), so every node's data counts equally however often it reports (Fraboni et al. 2023); a node counts 1 until a task after its first is timed",
    )
    shift_alpha: float = key("shift-alpha", 0.5, "shifted: h_i <- h_i + shift-alpha * decoded", in_range(0.0, 1.0))
    max_staleness: int = key("max-staleness", 0, "drop (and log) updates staler than this (0 = keep all)", at_least(0))
    selection: SelectionName = key(
        "selection",
        "same",
        'who gets the next task: "same" | "uniform" (idle nodes) | "loss-biased" | "time-aware" (q favours nodes with short measured task times: the paper\'s sec. 2.1 objective, expected wall-clock per update, under q_i > 0)',
    )
    selection_floor: float = key(
        "selection-floor",
        0.2,
        "loss-biased, time-aware: share of probability spread uniformly (keeps every q > 0)",
        in_range(0.0, 1.0),
    )
    selection_power: float = key(
        "selection-power",
        1.0,
        "time-aware: q_i ~ (1 / task time)^power above the floor (1 = the share each node gets when all run without a cap)",
        at_least(0),
    )
    concurrency: int = key("concurrency", 0, "max tasks in flight (0 = one per node)", at_least(0))
    warmup: bool = key(
        "warmup",
        True,
        "before the run clock starts, every node builds its model, loads its data and runs one training step (a `query.warmup` message, at most `node-wait-s`), so start-up costs stay out of the run's times and out of the first tasks: `t`, `time-budget-s` and `wall_clock_s` count training; summary `extra.warmup_s` says how long it took",
    )
    min_nodes: int = key("min-nodes", 2, "wait for this many nodes before starting", at_least(1))
    node_wait_s: float = key("node-wait-s", 120.0, "give up if `min-nodes` are not connected after this long", above(0))
    poll_interval_s: float = key("poll-interval-s", 0.05, "server poll interval for replies", above(0))
    prefetch: AutoOnOff = key(
        "prefetch",
        "auto",
        'queue each node\'s next task shortly before its current one ends, so a deployed SuperNode does not sleep through its idle poll between tasks (async mode; the queued task is staler): "auto" (in deployment, for nodes that do not report a short poll: Flower\'s flower-supernode polls every 3 s, asyncfl-supernode\'s nodes report theirs and get no queued tasks; off in simulation) | "on" | "off"',
    )
    prefetch_lead_s: float = key(
        "prefetch-lead-s",
        3.0,
        "prefetch: push the queued task this many seconds (plus the time the last pushes took) before the node's expected finish, estimated from its previous tasks",
        at_least(0),
    )
    pack: AutoOnOff = key(
        "pack",
        "auto",
        'send the global weights as one Flower Array (safetensors bytes, asyncfl/wire.py) instead of one per tensor (what any Flower ClientApp reads): Flower moves every Array as its own object, and in deployment the per-object round trips, not the bytes, are most of a message\'s cost; payloads and update logs travel as one Array either way: "auto" (on in deployment, off in simulation) | "on" | "off"',
    )
    task_ttl_s: float = key(
        "task-ttl-s", 3600.0, "TTL of a task message; expired tasks come back as errors and are re-dispatched", above(0)
    )
    max_node_failures: int = key(
        "max-node-failures", 3, "retire a node after this many consecutive error replies", at_least(1)
    )


@dataclass(frozen=True)
class StopConfig(_Group):
    group: ClassVar[str] = "stop"

    num_rounds: int = key(
        "num-rounds",
        3,
        "sync: rounds; async: `max-updates` = num-rounds x nodes when that is 0. Not a stop condition when `time-budget-s` or `target-ppl` is set: those stop the run",
        at_least(1),
    )
    max_updates: int = key(
        "max-updates",
        0,
        "async: stop after this many applied updates (0 = num-rounds x nodes, or no limit when `time-budget-s` or `target-ppl` is set)",
        at_least(0),
    )
    time_budget_s: float = key(
        "time-budget-s",
        0.0,
        "stop after this many wall-clock seconds (0 = off); sync drops the round in flight at the budget, so the model is the last completed round's",
        at_least(0),
    )
    target_ppl: float = key("target-ppl", 0.0, "stop when eval perplexity <= this (0 = off)", at_least(0))
    stop_rule: Literal["none", "bound"] = key(
        "stop-rule", "none", '"none" | "bound" (paper 3.4 convergence-bound rule)'
    )
    bound_n: int = key(
        "bound-n", 0, "bound: n in lambda = 1 - n mu (1 + 3 rho_bar/8) (0 = number of clients)", at_least(0)
    )
    bound_lipschitz: float = key("bound-lipschitz", 10.0, "bound: L, smoothness constant", above(0))
    bound_mu: float = key("bound-mu", 0.0, "bound: mu (0 = 1/L, as in the paper)", at_least(0))
    bound_rho_bar: float = key("bound-rho-bar", 1.0, "bound: rho_bar, selection skew", at_least(0))
    bound_a1: float = key("bound-a1", 0.0, "bound: A1 = F(w0) - F* (0 = initial eval loss, taking F* = 0)", at_least(0))
    bound_c: float = key(
        "bound-c", 0.05, "bound: C = 32 tau^2 G^2 + sigma^2 + 6 rho L Gamma (paper: 0.03-0.1)", at_least(0)
    )
    bound_d: float = key(
        "bound-d", 0.0, "bound: D = 2 Gamma (rho_tilde - rho_bar) (paper: 0-1; 0 for IID)", at_least(0)
    )
    eval_every: int = key(
        "eval-every",
        0,
        "evaluate every N rounds (sync) or N applied updates (async); 0 = auto: every round (sync), every C updates (async, C = the task slots, `concurrency` or the live nodes), so both modes evaluate once per C updates",
        at_least(0),
    )


@dataclass(frozen=True)
class EmulateConfig(_Group):
    group: ClassVar[str] = "emulate"

    client_speeds: str = key(
        "client-speeds",
        "",
        'comma list by partition id: factor f sleeps (f-1) x compute time, or up to f x `task-s` ("" = all 1)',
        speed_list,
    )
    task_s: float = key(
        "task-s",
        0.0,
        "fixed emulated task length (s) at factor 1: a task on a node of factor f lasts f x task-s x its share of `local-steps` (DyLU), compute included; 0 = sleep (f-1) x the measured compute",
        at_least(0),
    )
    uplink_mbps: float = key(
        "uplink-mbps", 0.0, "emulated uplink: sleep bytes x 8 / (rate x 1e6) (0 = off)", at_least(0)
    )

    def speeds(self) -> list[float]:
        """Per-partition slow-down factors (empty list = all 1)."""
        s = self.client_speeds.strip()
        return [float(p) for p in s.split(",")] if s else []

    def speed_of(self, partition_id: int) -> float:
        s = self.speeds()
        return s[partition_id] if partition_id < len(s) else 1.0

    def slowness_s(self, partition_id: int, compute_s: float, step_share: float = 1.0) -> float:
        """Seconds a task that computed `compute_s` still waits to take its emulated length:
        (f - 1) x compute_s, or with `task-s` set f x task-s x `step_share` - compute_s, which
        is negative when the compute overran the fixed length (the caller sleeps max(0, .)).
        `step_share` is the task's local steps over `local-steps` (below 1 under DyLU)."""
        f = self.speed_of(partition_id)
        if self.task_s:
            return f * self.task_s * step_share - compute_s
        return (f - 1.0) * compute_s


@dataclass(frozen=True)
class OutputConfig(_Group):
    group: ClassVar[str] = "output"

    results_dir: str = key("results-dir", "results", "folder for run outputs")
    run_name: str = key("run-name", "", 'subfolder of `results-dir` ("" = <mode>-<rule>-<compressor>-<time>)')
    save_model: bool = key("save-model", True, "write the final model with save_pretrained to <run>/model")
    checkpoint_every: int = key(
        "checkpoint-every", 0, "write a checkpoint every N applied updates (0 = off)", at_least(0)
    )
    resume_from: str = key("resume-from", "", "checkpoint file to continue from (version count, rule state kept)")


GROUPS: tuple[type[_Group], ...] = (
    ModelConfig,
    DataConfig,
    TrainConfig,
    CompressConfig,
    ServerConfig,
    StopConfig,
    EmulateConfig,
    OutputConfig,
)


@dataclass(frozen=True)
class AppConfig:
    """Typed, validated run config: one frozen group per table section (`cfg.server.rule`,
    `cfg.compress.error_feedback`). Built with defaults for what is not given; the keys that
    depend on one another are checked when it is built."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    compress: CompressConfig = dataclasses.field(default_factory=CompressConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    stop: StopConfig = dataclasses.field(default_factory=StopConfig)
    emulate: EmulateConfig = dataclasses.field(default_factory=EmulateConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        self._check_combinations()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppConfig:
        unknown = sorted(set(run_config) - set(KEYS_BY_NAME))
        if unknown:
            raise ConfigError(f"unknown run config key(s) {', '.join(unknown)}; known keys: {', '.join(KEYS_BY_NAME)}")

        def given(group: type[_Group]) -> dict[str, Any]:
            return {k.attr: run_config[k.name] for k in group.keys() if k.name in run_config}

        return cls(
            model=ModelConfig(**given(ModelConfig)),
            data=DataConfig(**given(DataConfig)),
            train=TrainConfig(**given(TrainConfig)),
            compress=CompressConfig(**given(CompressConfig)),
            server=ServerConfig(**given(ServerConfig)),
            stop=StopConfig(**given(StopConfig)),
            emulate=EmulateConfig(**given(EmulateConfig)),
            output=OutputConfig(**given(OutputConfig)),
        )

    def updated(self, changes: Mapping[str, Any]) -> AppConfig:
        """A copy with the keys in `changes` (public names: `{"local-steps": 1}`) set,
        validated as `from_run_config` validates."""
        return AppConfig.from_run_config({**self.to_dict(), **changes})

    def value(self, name: str) -> Any:
        """The value of key `name` (kebab-case); `KeyError` for an unknown name."""
        k = KEYS_BY_NAME[name]
        return getattr(getattr(self, k.group), k.attr)

    def _check_combinations(self) -> None:
        m, d, c, s, st = self.model, self.data, self.compress, self.server, self.stop
        if m.model_preset == "" and not m.model:
            raise ConfigError('run config key `model` must name a Hub id or folder when `model-preset` is ""')
        if c.downlink == "log" and s.mode == "async" and s.rule not in ("asgd", "fedbuff"):
            raise ConfigError(
                f'run config key `downlink` = "log" needs a rule whose steps are weighted sums of '
                f'client payloads ("asgd", "fedbuff") or mode "sync", got rule "{s.rule}"; '
                'use downlink "auto" or "full"'
            )
        if c.downlink == "log" and s.server_momentum:
            raise ConfigError(
                f'run config key `downlink` = "log" replays the payloads of each step, but '
                f"`server-momentum` = {s.server_momentum} adds the momentum of older steps; "
                'use downlink "auto" or "full", or server-momentum 0'
            )
        if s.prefetch == "on" and s.selection != "same" and s.concurrency:
            raise ConfigError(
                f'run config key `prefetch` = "on" keeps each working node busy, which defeats '
                f'`selection` = "{s.selection}" under a `concurrency` cap of {s.concurrency}: '
                'use selection "same", concurrency 0, or prefetch "off" / "auto"'
            )
        if s.balance and (s.mode, s.rule) != ("async", "asgd"):
            raise ConfigError(
                f"run config key `balance` = true weights asgd's steps per node; it needs mode "
                f'"async" and rule "asgd", got mode "{s.mode}" rule "{s.rule}"'
            )
        if d.eval_stride > d.block_size:
            raise ConfigError(
                f"run config key `eval-stride` must be 0 or in [1, block-size = {d.block_size}] "
                f"(a longer stride would skip tokens), got {d.eval_stride}"
            )
        if c.error_feedback == "ef21" and (s.mode, s.rule, s.shift_alpha) != ("async", "shifted", 1.0):
            raise ConfigError(
                'run config key `error-feedback` = "ef21" is EF21\'s client recursion g_i += decoded, '
                'whose server steps with the running mean of the g_i: that is mode "async" with rule '
                f'"shifted" and shift-alpha 1.0, got mode "{s.mode}", rule "{s.rule}", '
                f'shift-alpha {s.shift_alpha}; use error-feedback "ef" (any rule, both modes) or set those'
            )
        if st.stop_rule == "bound":
            try:  # lambda must lie in (0, 1) for the bound to mean anything
                self.bound_rule(num_clients=max(st.bound_n, 1))
            except ValueError as exc:
                raise ConfigError(f'stop-rule "bound": {exc}') from None

    # ---- derived values -------------------------------------------------------------------
    def bound_rule(self, num_clients: int, a1: float | None = None) -> BoundStopRule:
        """The paper's 3.4 stopping rule with this config's constants."""
        st = self.stop
        mu = st.bound_mu or 1.0 / st.bound_lipschitz
        return BoundStopRule(
            n=st.bound_n or num_clients,
            mu=mu,
            rho_bar=st.bound_rho_bar,
            L=st.bound_lipschitz,
            A1=st.bound_a1 or (a1 if a1 is not None else 1.0),
            C=st.bound_c,
            D=st.bound_d,
            eta=self.train.lr,
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with the public (kebab-case) key names, in table order."""
        return {k.name: getattr(getattr(self, k.group), k.attr) for k in KEYS}


KEYS: tuple[Key, ...] = tuple(k for g in GROUPS for k in g.keys())
KEYS_BY_NAME = {k.name: k for k in KEYS}
assert tuple(f.name for f in dataclasses.fields(AppConfig)) == tuple(g.group for g in GROUPS)


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
            raise ConfigError(
                f"run-config item {item!r} is not key=value with a TOML value "
                f'(strings in double quotes, e.g. mode="sync"): {exc}'
            ) from None
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
