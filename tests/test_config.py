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


def test_rule_choices_are_the_registry_s_rules():
    from asyncfl.config import KEYS_BY_NAME, RULE_NAMES
    from asyncfl.strategies import RULES

    assert RULE_NAMES == RULES
    check = KEYS_BY_NAME["rule"].check
    assert all(check(r) is None for r in RULES) and check("fedavg") is not None


def test_downlink_log_with_server_momentum_is_an_error():
    with pytest.raises(ConfigError, match="server-momentum"):
        AppConfig.from_run_config({"downlink": "log", "rule": "fedbuff", "server-momentum": 0.9})
