"""The run config: defaults agree everywhere, bad values stop with one clear message."""

import tomllib
from pathlib import Path

import pytest

from asyncfl.config import KEYS, AppConfig, ConfigError, markdown_table

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
    assert cfg.model == "gpt2" and cfg.pretrained is True and cfg.lora_rank == 0
    assert AppConfig.from_run_config(cfg.to_dict()) == cfg


def test_int_given_for_float_key_is_accepted():
    assert AppConfig.from_run_config({"lr": 1}).lr == 1.0


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
    with pytest.raises(ConfigError, match="stop-rule \"bound\".*lambda"):
        AppConfig.from_run_config({"stop-rule": "bound", "bound-n": 4, "bound-mu": 1.0})
    ok = AppConfig.from_run_config({"stop-rule": "bound", "bound-n": 2})
    assert 0 < ok.bound_rule(num_clients=2).lam < 1


def test_speeds_by_partition():
    cfg = AppConfig.from_run_config({"client-speeds": "1, 2,4"})
    assert [cfg.speed_of(i) for i in range(4)] == [1.0, 2.0, 4.0, 1.0]


def test_merge_gives_one_run_config_file_with_the_overrides(tmp_path):
    from asyncfl.config import merged_toml

    base = ROOT / "configs" / "offline-tiny.toml"
    out = tomllib.loads(merged_toml(str(base), 'mode="sync" num-rounds=6 client-speeds="1,1,2,4"'))
    with open(base, "rb") as f:
        want = {**tomllib.load(f), "mode": "sync", "num-rounds": 6, "client-speeds": "1,1,2,4"}
    assert out == want
    AppConfig.from_run_config(out)
    for bad, words in [('mode=sync', "double quotes"), ('mode="fast"', "`mode`"), ('colour="red"', "unknown")]:
        with pytest.raises(ConfigError, match=words):
            merged_toml(str(base), bad)
    with pytest.raises(ConfigError, match="cannot read"):
        merged_toml(str(tmp_path / "missing.toml"), "")



@pytest.mark.parametrize(("spec", "want"), [
    ("", {}),
    ('mode="sync"', {"mode": "sync"}),
    ("num-rounds=6 max-updates=0", {"num-rounds": 6, "max-updates": 0}),
    ("lr=5e-4 alpha=0.6 staleness-b=-4", {"lr": 0.0005, "alpha": 0.6, "staleness-b": -4}),
    ("pretrained=false save-model=true", {"pretrained": False, "save-model": True}),
    ('run-name="two words"  data-dir=\'/tmp/a b\' ', {"run-name": "two words", "data-dir": "/tmp/a b"}),
    ('client-speeds="1,1,2,4" tokenizer="x=y #z"', {"client-speeds": "1,1,2,4", "tokenizer": "x=y #z"}),
    ('run-name="say \\"hi there\\""', {"run-name": 'say "hi there"'}),
    ('lr=1 mode="sync" lr=2.5', {"lr": 2.5, "mode": "sync"}),  # later items win
])
def test_parse_overrides_reads_toml_values(spec, want):
    from asyncfl.config import parse_overrides

    got = parse_overrides(spec)
    assert got == want
    assert [type(v) for v in got.values()] == [type(v) for v in want.values()]  # 1 stays int, not 1.0


@pytest.mark.parametrize(("spec", "item"), [
    ("lr=1e-3 mode=sync", "'mode=sync'"),  # a bare word is no TOML value
    ("num-rounds = 6", "'num-rounds'"),  # blanks around '=' split the item
    ('run-name="unclosed quote', "'run-name=\"unclosed quote'"),
    ("lr=", "'lr='"),
    ("lr=0.5 rank=1e", "'rank=1e'"),
])
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
    assert tomllib.loads(merged_toml(str(base), spec)) == {"mode": "sync", "num-rounds": 2, "run-name": "a b",
                                                           "pretrained": False}
    assert parse_run_config(str(base)) == {"mode": "sync", "num-rounds": 9}  # a TOML file is read as such
    for parse in (parse_run_config, lambda s: merged_toml(str(base), s)):
        with pytest.raises(ConfigError, match="'lr=x'"):
            parse("lr=x")

def test_rule_choices_are_the_registry_s_rules():
    from asyncfl.config import KEYS_BY_NAME, RULE_NAMES
    from asyncfl.strategies import RULES

    assert RULE_NAMES == RULES
    check = KEYS_BY_NAME["rule"].check
    assert all(check(r) is None for r in RULES) and check("fedavg") is not None


def test_downlink_log_with_server_momentum_is_an_error():
    with pytest.raises(ConfigError, match="server-momentum"):
        AppConfig.from_run_config({"downlink": "log", "rule": "fedbuff", "server-momentum": 0.9})
