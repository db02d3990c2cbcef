"""The run config: defaults agree everywhere, bad values stop with one clear message."""

import dataclasses
import tomllib
import typing
from pathlib import Path

import pytest

from asyncfl import choices
from asyncfl.compressors import COMPRESSORS, get_compressor
from asyncfl.compressors.base import METHODS, ROW_SELECT, WIRE_DTYPES
from asyncfl.config import GROUPS, KEYS, AppConfig, ConfigError, markdown_table
from asyncfl.strategies import RULES, SELECTORS, STALENESS_KINDS, make_rule, make_selector, make_staleness_fn

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_match_the_key_table():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    assert defaults == {k.name: k.default for k in KEYS}


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k.name for k in KEYS if f"| `{k.name}` |" not in readme]
    assert not missing, f"README config table lacks {missing}"
    assert markdown_table() in readme, "README table is stale: paste `python -m asyncfl.config`"


def test_defaults_build_and_round_trip():
    cfg = AppConfig.from_run_config({})
    assert cfg.model.model == "gpt2" and cfg.model.pretrained is True and cfg.model.lora_rank == 0
    assert AppConfig.from_run_config(cfg.to_dict()) == cfg


def test_int_given_for_float_key_is_accepted():
    assert AppConfig.from_run_config({"lr": 1}).train.lr == 1.0


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lr", -0.1, "`lr` must be a number > 0, got -0.1"),
        ("lr", "fast", '`lr` must be a float, got "fast"'),
        ("mode", "semi", "`mode` must be one of 'async', 'sync', got \"semi\""),
        ("compressor", "svd", "one of 'none', 'pca', 'qrcp', 'cur'"),
        ("model-preset", "huge", "`model-preset` must be one of '', 'tiny', 'small'"),
        ("rank", 0, "`rank` must be a number >= 1, got 0"),
        ("batch-size", 2.5, "`batch-size` must be a int, got 2.5"),
        ("pretrained", "yes", "`pretrained` must be a bool"),
        ("client-speeds", "1,x,2", "comma-separated list of numbers >= 1"),
        ("client-speeds", "1,0.5", "comma-separated list of numbers >= 1"),
        ("task-s", -2.0, "`task-s` must be a number >= 0, got -2.0"),
        ("energy", 1.5, "`energy` must be a number in [0.0, 1.0], got 1.5"),
        ("partitioner", "dirichlet", "'iid', 'articles', 'size-skew'"),
    ],
)
def test_bad_values_name_key_value_and_accepted(key, value, expected):
    with pytest.raises(ConfigError) as err:
        AppConfig.from_run_config({key: value})
    assert expected in str(err.value)


def test_unknown_key_is_an_error_listing_known_keys():
    with pytest.raises(ConfigError, match="unknown run config key.*lerning-rate.*known keys: model"):
        AppConfig.from_run_config({"lerning-rate": 0.1})


def test_bound_constants_giving_lambda_outside_unit_interval_are_rejected():
    # lambda = 1 - n mu (1 + 3 rho/8) = 1 - 4 * 1 * 1.375 < 0
    with pytest.raises(ConfigError, match='stop-rule "bound".*lambda'):
        AppConfig.from_run_config({"stop-rule": "bound", "bound-n": 4, "bound-mu": 1.0})
    ok = AppConfig.from_run_config({"stop-rule": "bound", "bound-n": 2})
    assert 0 < ok.bound_rule(num_clients=2).lam < 1


def test_speeds_by_partition():
    cfg = AppConfig.from_run_config({"client-speeds": "1, 2,4"})
    assert [cfg.emulate.speed_of(i) for i in range(4)] == [1.0, 2.0, 4.0, 1.0]


def test_slowness_relative_to_compute_or_up_to_a_fixed_task_length():
    relative = AppConfig.from_run_config({"client-speeds": "1,3"}).emulate
    assert relative.slowness_s(1, 0.5) == 1.0  # (3 - 1) x 0.5
    assert relative.slowness_s(0, 0.5) == 0.0 and relative.slowness_s(7, 0.5) == 0.0  # factor 1
    fixed = AppConfig.from_run_config({"client-speeds": "1,3", "task-s": 2.0}).emulate
    assert fixed.slowness_s(1, 0.5) == 5.5  # 3 x 2 - 0.5: the task lasts 6 s
    assert fixed.slowness_s(1, 0.5, step_share=0.5) == 2.5  # DyLU, half the steps: 3 s
    assert fixed.slowness_s(0, 3.0) == -1.0  # computed 1 s past its 2 s length


def test_merge_gives_one_run_config_file_with_the_overrides(tmp_path):
    from asyncfl.config import merged_toml

    base = ROOT / "configs" / "offline-tiny.toml"
    out = tomllib.loads(merged_toml(str(base), 'mode="sync" num-rounds=6 client-speeds="1,1,2,4"'))
    with open(base, "rb") as f:
        want = {**tomllib.load(f), "mode": "sync", "num-rounds": 6, "client-speeds": "1,1,2,4"}
    assert out == want
    AppConfig.from_run_config(out)
    for bad, words in [("mode=sync", "double quotes"), ('mode="fast"', "`mode`"), ('colour="red"', "unknown")]:
        with pytest.raises(ConfigError, match=words):
            merged_toml(str(base), bad)
    with pytest.raises(ConfigError, match="cannot read"):
        merged_toml(str(tmp_path / "missing.toml"), "")


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("", {}),
        ('mode="sync"', {"mode": "sync"}),
        ("num-rounds=6 max-updates=0", {"num-rounds": 6, "max-updates": 0}),
        ("lr=5e-4 alpha=0.6 staleness-b=-4", {"lr": 0.0005, "alpha": 0.6, "staleness-b": -4}),
        ("pretrained=false save-model=true", {"pretrained": False, "save-model": True}),
        ("run-name=\"two words\"  data-dir='/tmp/a b' ", {"run-name": "two words", "data-dir": "/tmp/a b"}),
        ('client-speeds="1,1,2,4" tokenizer="x=y #z"', {"client-speeds": "1,1,2,4", "tokenizer": "x=y #z"}),
        ('run-name="say \\"hi there\\""', {"run-name": 'say "hi there"'}),
        ('lr=1 mode="sync" lr=2.5', {"lr": 2.5, "mode": "sync"}),  # later items win
    ],
)
def test_parse_overrides_reads_toml_values(spec, want):
    from asyncfl.config import parse_overrides

    got = parse_overrides(spec)
    assert got == want
    assert [type(v) for v in got.values()] == [type(v) for v in want.values()]  # 1 stays int, not 1.0


@pytest.mark.parametrize(
    ("spec", "item"),
    [
        ("lr=1e-3 mode=sync", "'mode=sync'"),  # a bare word is no TOML value
        ("num-rounds = 6", "'num-rounds'"),  # blanks around '=' split the item
        ('run-name="unclosed quote', "'run-name=\"unclosed quote'"),
        ("lr=", "'lr='"),
        ("lr=0.5 rank=1e", "'rank=1e'"),
    ],
)
def test_parse_overrides_names_the_malformed_item(spec, item):
    from asyncfl.config import parse_overrides

    with pytest.raises(ConfigError) as err:
        parse_overrides(spec)
    assert f"run-config item {item} is not key=value with a TOML value" in str(err.value)


def test_emulator_and_merge_share_the_override_parser(tmp_path):
    from asyncfl.config import merged_toml
    from asyncfl.emulate import parse_run_config

    spec = 'run-name="a b" num-rounds=2 pretrained=false'
    assert parse_run_config(spec) == {"run-name": "a b", "num-rounds": 2, "pretrained": False}
    base = tmp_path / "base.toml"
    base.write_text('mode = "sync"\nnum-rounds = 9\n')
    assert tomllib.loads(merged_toml(str(base), spec)) == {
        "mode": "sync",
        "num-rounds": 2,
        "run-name": "a b",
        "pretrained": False,
    }
    assert parse_run_config(str(base)) == {"mode": "sync", "num-rounds": 9}  # a TOML file is read as such
    for parse in (parse_run_config, lambda s: merged_toml(str(base), s)):
        with pytest.raises(ConfigError, match="'lr=x'"):
            parse("lr=x")


def test_downlink_log_with_server_momentum_is_an_error():
    with pytest.raises(ConfigError, match="server-momentum"):
        AppConfig.from_run_config({"downlink": "log", "rule": "fedbuff", "server-momentum": 0.9})


# the keys whose values are names, as the README table lists them (one Literal type each)
CHOICE_KEYS = (
    "model-preset",
    "device",
    "persistent-worker",
    "train-split",
    "eval-split",
    "partitioner",
    "eval-stream",
    "compressor",
    "compress-method",
    "wire-dtype",
    "download-dtype",
    "downlink",
    "error-feedback",
    "row-select",
    "mode",
    "rule",
    "staleness",
    "selection",
    "prefetch",
    "pack",
    "stop-rule",
)


def _field_types() -> dict[str, object]:
    """Public key name -> the field's annotation, read from the dataclasses themselves."""
    out = {}
    for group in GROUPS:
        hints = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            out[f.metadata["key"]] = hints[f.name]
    return out


def _other_value(key):
    """A valid value of `key` other than its default."""
    special = {"model": "distilgpt2", "client-speeds": "1,2.5", "eval-stride": 16}
    if key.name in special:
        return special[key.name]
    hint = _field_types()[key.name]
    if typing.get_origin(hint) is typing.Literal:
        return next(c for c in typing.get_args(hint) if c != key.default)
    if key.type is bool:
        return not key.default
    if key.type is str:
        return "some/where"
    if key.type is int:
        return key.default + 1
    return next(v for v in (key.default * 2, 0.5, 0.05, 3.0) if v != key.default and not key.check(v))


def test_groups_hold_the_keys_in_table_order_with_snake_case_fields():
    cfg = AppConfig()
    names = [k.name for k in KEYS]
    assert names == list(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert [f.name for f in dataclasses.fields(AppConfig)] == [
        "model",
        "data",
        "train",
        "compress",
        "server",
        "stop",
        "emulate",
        "output",
    ]
    for k in KEYS:
        assert k.attr == k.name.replace("-", "_")
        assert getattr(getattr(cfg, k.group), k.attr) == k.default
    assert cfg.server.rule == "asgd" and cfg.compress.error_feedback == "none" and cfg.train.local_steps == 0


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_every_key_round_trips(key):
    value = _other_value(key)
    cfg = AppConfig.from_run_config({key.name: value})
    assert getattr(getattr(cfg, key.group), key.attr) == value
    assert cfg.value(key.name) == value
    out = cfg.to_dict()
    assert list(out) == [k.name for k in KEYS]
    assert out[key.name] == value and type(out[key.name]) is type(value)
    assert {k: v for k, v in out.items() if k != key.name} == {k.name: k.default for k in KEYS if k is not key}
    assert AppConfig.from_run_config(out) == cfg


def test_choice_keys_are_literal_fields():
    types = _field_types()
    literal = [name for name, t in types.items() if typing.get_origin(t) is typing.Literal]
    assert literal == list(CHOICE_KEYS)
    assert all(types[n] in (bool, int, float, str) for n in types if n not in CHOICE_KEYS)
    assert types["rule"] is choices.RuleName and types["compressor"] is choices.CompressorName
    assert types["staleness"] is choices.StalenessKind and types["selection"] is choices.SelectionName


@pytest.mark.parametrize("name", CHOICE_KEYS)
def test_literal_field_rejects_a_name_outside_its_type(name):
    accepted = typing.get_args(_field_types()[name])
    listed = ", ".join(f"'{c}'" for c in accepted)
    with pytest.raises(ConfigError) as err:
        AppConfig.from_run_config({name: "bogus"})
    assert str(err.value) == f'run config key `{name}` must be one of {listed}, got "bogus"'
    for c in accepted:  # and takes every one of them (combinations aside)
        base = {"rule": "shifted", "shift-alpha": 1.0} if (name, c) == ("error-feedback", "ef21") else {}
        base |= {"rule": "asgd"} if (name, c) == ("downlink", "log") else {}
        assert AppConfig.from_run_config({**base, name: c}).value(name) == c


def test_registries_are_the_literals():
    assert RULES == ("fedasync", "fedbuff", "asgd", "dn", "fadas", "shifted", "saga", "saga-est", "page")
    assert RULES == typing.get_args(choices.RuleName)
    assert COMPRESSORS == typing.get_args(choices.CompressorName) == ("none", "pca", "qrcp", "cur")
    assert STALENESS_KINDS == typing.get_args(choices.StalenessKind)
    assert SELECTORS == typing.get_args(choices.SelectionName)
    assert METHODS == typing.get_args(choices.CompressMethod)
    assert ROW_SELECT == typing.get_args(choices.RowSelect)
    assert tuple(WIRE_DTYPES) == typing.get_args(choices.WireDtype)
    assert [make_rule(r, server_lr=0.1).name for r in ("saga", "page")] == ["saga", "page"]
    assert [make_selector(s).name for s in SELECTORS] == list(SELECTORS)
    assert [make_staleness_fn(k, 0.5, 1).kind for k in STALENESS_KINDS] == list(STALENESS_KINDS)
    assert [get_compressor(c).name for c in COMPRESSORS] == list(COMPRESSORS)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: make_rule("fedavgm"),
            "`rule` must be one of 'fedasync', 'fedbuff', 'asgd', 'dn', 'fadas', 'shifted', 'saga', 'saga-est', "
            "'page', 'fedavg', got 'fedavgm'",
        ),
        (
            lambda: make_selector("random"),
            "`selection` must be one of 'same', 'uniform', 'loss-biased', 'time-aware', got 'random'",
        ),
        (
            lambda: make_staleness_fn("linear", 0.5, 4),
            "`staleness` must be one of 'constant', 'polynomial', 'hinge', got 'linear'",
        ),
        (lambda: get_compressor("svd"), "`compressor` must be one of 'none', 'pca', 'qrcp', 'cur', got 'svd'"),
    ],
)
def test_library_builders_say_what_the_config_says(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value) == message


def test_defaults_are_the_pyproject_block():
    block = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert AppConfig().to_dict() == block
    assert AppConfig.from_run_config(block) == AppConfig() == AppConfig.from_run_config({})


def test_groups_check_their_fields_when_built_directly():
    from asyncfl.config import ServerConfig, TrainConfig

    with pytest.raises(ConfigError, match="`lr` must be a number > 0, got -1.0"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match="`rule` must be one of 'fedasync'"):
        ServerConfig(rule="fedavg")  # type: ignore[arg-type]
    cfg = AppConfig()
    with pytest.raises(ConfigError, match="`batch-size` must be a number >= 1, got 0"):
        dataclasses.replace(cfg.train, batch_size=0)
    with pytest.raises(ConfigError, match="`balance` = true"):
        dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, rule="fedbuff", balance=True))
    assert TrainConfig(lr=1).lr == 1.0 and type(TrainConfig(lr=1).lr) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.rule = "dn"  # type: ignore[misc]


def test_updated_changes_keys_by_public_name_and_checks_them():
    cfg = AppConfig.from_run_config({"rule": "fedbuff"})
    new = cfg.updated({"local-steps": 3, "num-rounds": 7})
    assert (new.train.local_steps, new.stop.num_rounds, new.server.rule) == (3, 7, "fedbuff")
    assert cfg.train.local_steps == 0  # a copy
    with pytest.raises(ConfigError, match="unknown run config key.*local_steps"):
        cfg.updated({"local_steps": 3})
    with pytest.raises(ConfigError, match="`balance`"):
        cfg.updated({"balance": True})
