"""The experiment config: defaults, one-line validation errors, λ per client, --set overrides.

Pure pydantic/YAML; nothing here starts Ray or touches data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedrlhf_ray.config import ConfigError, apply_overrides, load_config, parse_override, validate_config
from fedrlhf_ray.schema import ExperimentConfig, LambdaSpread

REPO_ROOT = Path(__file__).resolve().parents[1]
# Experiment files; the sweep files beside them (a search_space) are tests/test_tune.py's.
TUNE_CONFIGS = sorted(
    p for p in (REPO_ROOT / "tune_configs").glob("*.y*ml") if "search_space" not in yaml.safe_load(p.read_text())
)


def config_error(raw) -> str:
    """The message of the ConfigError that ``raw`` must raise; asserts it is one line."""
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    msg = str(info.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


def names_field(msg: str, dotted: str) -> bool:
    """``msg`` names the field either as ``a.b.c`` or as ``a.b: c`` (section, then field)."""
    section, _, leaf = dotted.rpartition(".")
    return dotted in msg or (bool(section) and msg.startswith(f"{section}: {leaf}"))


# ---------------------------------------------------------------------------------------------
# defaults
# ---------------------------------------------------------------------------------------------


def test_defaults_validate_and_match_documented_values():
    cfg = validate_config({})
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.env.name == "synthetic"
    assert cfg.env.slate_size == 10 and cfg.env.positives_per_slate == 3
    assert cfg.clients.num_clients == 5
    assert cfg.federation.rounds == 5 and cfg.federation.strategy == "fedavg"
    assert cfg.shaping.lam == 1.0
    assert cfg.client_lambdas() == [1.0] * 5
    # The dumped defaults validate back to the very same config.
    assert validate_config(cfg.to_dict()) == cfg


def test_empty_sections_are_defaults():
    cfg = validate_config({"env": {}, "ppo": {}, "federation": {}})
    assert cfg == validate_config({})


# ---------------------------------------------------------------------------------------------
# one-line errors naming field, value and what is allowed
# ---------------------------------------------------------------------------------------------


def test_unknown_top_level_key_lists_allowed_sections():
    msg = config_error({"federaton": {"rounds": 3}})
    assert msg.startswith("federaton: unknown field")
    for allowed in ("clients", "env", "federation", "ppo", "shaping", "seed", "tracking"):
        assert allowed in msg.split("allowed:", 1)[1]


@pytest.mark.parametrize(
    "raw, dotted, some_allowed",
    [
        ({"env": {"slatesize": 4}}, "env.slatesize", ("slate_size", "session_length", "synthetic")),
        ({"env": {"synthetic": {"items": 50}}}, "env.synthetic.items", ("n_items", "latent_dim")),
        ({"env": {"name": "movielens", "data": {"folder": "/x"}}}, "env.data.folder", ("path", "cache_dir", "dataset")),
        ({"ppo": {"learning_rate": 0.1}}, "ppo.learning_rate", ("lr", "minibatch_size")),
        ({"federation": {"round": 2}}, "federation.round", ("rounds", "clients_per_round")),
        ({"feedback": {"budget": 9}}, "feedback.budget", ("budget_per_round", "beta")),
        ({"shaping": {"lam_": 1}}, "shaping.lam_", ("lambda",)),
    ],
)
def test_unknown_nested_key_names_path_and_lists_allowed_fields(raw, dotted, some_allowed):
    msg = config_error(raw)
    assert msg.startswith(f"{dotted}: unknown field")
    allowed = msg.split("allowed:", 1)[1]
    for name in some_allowed:
        assert name in allowed


@pytest.mark.parametrize(
    "raw, dotted, bad, allowed",
    [
        # wrong type
        ({"federation": {"rounds": "zero"}}, "federation.rounds", "'zero'", "integer"),
        ({"ppo": {"lr": "fast"}}, "ppo.lr", "'fast'", "number"),
        ({"tracking": {"enabled": "maybe"}}, "tracking.enabled", "'maybe'", "true or false"),
        ({"name": 3}, "name", "3", "string"),
        ({"env": 3}, "env", "3", "a mapping (a section)"),
        ({"federation": {"rounds": 2.5}}, "federation.rounds", "2.5", "integer"),
        # out of range
        ({"federation": {"rounds": 0}}, "federation.rounds", "0", "greater than or equal to 1"),
        ({"seed": -1}, "seed", "-1", "greater than or equal to 0"),
        ({"env": {"slate_size": 101}}, "env.slate_size", "101", "less than or equal to 100"),
        ({"env": {"heldout_fraction": 1.0}}, "env.heldout_fraction", "1.0", "less than 1"),
        ({"env": {"synthetic": {"heterogeneity": 1.5}}}, "env.synthetic.heterogeneity", "1.5",
         "less than or equal to 1"),
        ({"feedback": {"beta": -1}}, "feedback.beta", "-1", "greater than or equal to 0"),
        ({"reward_model": {"lr": 0}}, "reward_model.lr", "0", "greater than 0"),
        ({"ppo": {"train_batch_size": 8}}, "ppo.train_batch_size", "8", "greater than or equal to 16"),
        ({"federation": {"trim_fraction": 0.5}}, "federation.trim_fraction", "0.5", "less than 0.5"),
        ({"federation": {"clients_per_round": 0}}, "federation.clients_per_round", "0", "greater than 0"),
        ({"evaluation": {"ndcg_k": 0}}, "evaluation.ndcg_k", "0", "greater than or equal to 1"),
        ({"ray": {"object_store_mb": 10}}, "ray.object_store_mb", "10", "greater than or equal to 64"),
        ({"clients": {"num_clients": 0}}, "clients.num_clients", "0", "greater than or equal to 1"),
        # bad literal: the allowed values are listed
        ({"env": {"name": "atari"}}, "env.name", "'atari'", "synthetic, movielens, imdb"),
        ({"env": {"name": "movielens", "data": {"dataset": "ml-10m"}}}, "env.data.dataset", "'ml-10m'",
         "'ml-latest-small', 'ml-100k', 'ml-1m' or 'ml-25m'"),
        ({"clients": {"formation": "silo"}}, "clients.formation", "'silo'", "'user' or 'group'"),
        ({"federation": {"strategy": "bulyan"}}, "federation.strategy", "'bulyan'",
         "'fedavg', 'fedprox', 'median', 'trimmed_mean', 'krum', 'multi_krum' or 'norm_bound'"),
        ({"feedback": {"kind": "votes"}}, "feedback.kind", "'votes'", "'pairwise', 'rating' or 'both'"),
    ],
)
def test_bad_value_names_field_value_and_allowed(raw, dotted, bad, allowed):
    msg = config_error(raw)
    assert msg.startswith(f"{dotted}: got {bad} ")
    assert allowed in msg


def test_lambda_list_length_must_match_num_clients():
    msg = config_error({"shaping": {"lambda": [0.1, 0.2]}, "clients": {"num_clients": 3}})
    assert "shaping.lambda" in msg
    assert "2 values" in msg and "clients.num_clients is 3" in msg
    # The same list with a matching K is fine.
    cfg = validate_config({"shaping": {"lambda": [0.1, 0.2]}, "clients": {"num_clients": 2}})
    assert cfg.client_lambdas() == [0.1, 0.2]


def test_negative_scalar_lambda_is_rejected():
    msg = config_error({"shaping": {"lambda": -1.0}})
    assert names_field(msg, "shaping.lambda")
    assert "-1.0" in msg and ">= 0" in msg


def test_positives_per_slate_cannot_exceed_slate_size():
    msg = config_error({"env": {"slate_size": 4, "positives_per_slate": 5}})
    assert names_field(msg, "env.positives_per_slate")
    assert "(5)" in msg and "slate_size (4)" in msg
    assert validate_config({"env": {"slate_size": 4, "positives_per_slate": 4}}).env.slate_size == 4


def test_minibatch_cannot_exceed_train_batch():
    msg = config_error({"ppo": {"train_batch_size": 100, "minibatch_size": 101}})
    assert names_field(msg, "ppo.minibatch_size")
    assert "(101)" in msg and "train_batch_size (100)" in msg
    assert validate_config({"ppo": {"train_batch_size": 100, "minibatch_size": 100}}).ppo.minibatch_size == 100


def test_clients_per_round_count_cannot_exceed_num_clients():
    msg = config_error({"federation": {"clients_per_round": 6}, "clients": {"num_clients": 5}})
    assert "federation.clients_per_round (6)" in msg and "clients.num_clients (5)" in msg
    # A count equal to K, and any fraction, are fine.
    assert validate_config({"federation": {"clients_per_round": 5}}).federation.clients_per_round == 5
    assert validate_config({"federation": {"clients_per_round": 0.4}}).federation.clients_per_round == 0.4


def test_clients_per_round_count_must_be_whole():
    msg = config_error({"federation": {"clients_per_round": 2.5}})
    assert names_field(msg, "federation.clients_per_round")
    assert "2.5" in msg and "fraction" in msg and "whole count" in msg


def test_config_that_is_not_a_mapping():
    msg = config_error([1, 2])
    assert "mapping" in msg and "list" in msg


def test_negative_item_in_lambda_list_is_named():
    msg = config_error({"shaping": {"lambda": [0.1, -0.2, 0.3, 0.4, 0.5]}})
    assert names_field(msg, "shaping.lambda")
    assert "-0.2" in msg and "greater than or equal to 0" in msg


def test_unknown_key_in_lambda_spread_lists_low_and_high():
    msg = config_error({"shaping": {"lambda": {"low": 0.1, "hi": 0.9}}})
    assert "hi" in msg and "unknown field" in msg
    assert "low" in msg and "high" in msg


def test_negative_lambda_spread_bound_is_named():
    msg = config_error({"shaping": {"lambda": {"low": -1.0, "high": 0.9}}})
    assert "low" in msg and "-1.0" in msg and "greater than or equal to 0" in msg


# ---------------------------------------------------------------------------------------------
# λ per client
# ---------------------------------------------------------------------------------------------


def test_client_lambdas_scalar():
    cfg = validate_config({"shaping": {"lambda": 0.25}, "clients": {"num_clients": 4}})
    assert cfg.client_lambdas() == [0.25, 0.25, 0.25, 0.25]


def test_client_lambdas_list():
    cfg = validate_config({"shaping": {"lambda": [0, 0.5, 2]}, "clients": {"num_clients": 3}})
    assert cfg.client_lambdas() == [0.0, 0.5, 2.0]
    assert all(isinstance(x, float) for x in cfg.client_lambdas())


def test_client_lambdas_spread_matches_paper():
    cfg = validate_config(
        {"shaping": {"lambda": {"low": 0.1, "high": 0.9}}, "clients": {"num_clients": 5}}
    )
    assert isinstance(cfg.shaping.lam, LambdaSpread)
    assert cfg.client_lambdas() == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9], abs=1e-12)


def test_client_lambdas_spread_edge_cases():
    one = validate_config({"shaping": {"lambda": {"low": 0.2, "high": 0.8}}, "clients": {"num_clients": 1}})
    assert one.client_lambdas() == [0.2]
    down = validate_config({"shaping": {"lambda": {"low": 1.0, "high": 0.0}}, "clients": {"num_clients": 3}})
    assert down.client_lambdas() == pytest.approx([1.0, 0.5, 0.0])


def test_lambda_spread_round_trips_through_yaml():
    cfg = validate_config({"shaping": {"lambda": {"low": 0.1, "high": 0.9}}})
    dumped = cfg.to_dict()
    assert dumped["shaping"] == {"lambda": {"low": 0.1, "high": 0.9}}
    again = validate_config(yaml.safe_load(yaml.safe_dump(dumped)))
    assert again == cfg and again.client_lambdas() == cfg.client_lambdas()


# ---------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------


def test_apply_overrides_nested_paths_and_yaml_types():
    raw = {"federation": {"rounds": 5}, "env": {"synthetic": {"n_items": 300}}}
    out = apply_overrides(
        raw,
        [
            "federation.rounds=3",
            "env.synthetic.n_items=50",
            "shaping.lambda=[0.1,0.2]",
            "tracking.enabled=false",
            "env.data.download=true",
            "ppo.lr=0.001",
            "name=my run",
        ],
    )
    assert out["federation"]["rounds"] == 3 and type(out["federation"]["rounds"]) is int
    assert out["env"]["synthetic"]["n_items"] == 50
    assert out["shaping"]["lambda"] == [0.1, 0.2]
    assert out["tracking"]["enabled"] is False
    assert out["env"]["data"]["download"] is True
    assert out["ppo"]["lr"] == 0.001 and type(out["ppo"]["lr"]) is float
    assert out["name"] == "my run"
    # The input is not modified.
    assert raw == {"federation": {"rounds": 5}, "env": {"synthetic": {"n_items": 300}}}


def test_override_value_may_contain_equals_sign_and_last_wins():
    out = apply_overrides({}, ["name=a=b", "seed=1", "seed=2"])
    assert out == {"name": "a=b", "seed": 2}


def test_override_results_validate():
    raw = apply_overrides({}, ["clients.num_clients=2", "shaping.lambda=[0.1,0.2]", "ppo.lr=1e-3"])
    cfg = validate_config(raw)
    assert cfg.client_lambdas() == [0.1, 0.2]
    # PyYAML reads "1e-3" as a string (YAML 1.1); validation still turns it into the number.
    assert cfg.ppo.lr == pytest.approx(1e-3)


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError) as info:
        apply_overrides({"federation": {"rounds": 5}}, ["federation.rounds.max=3"])
    msg = str(info.value)
    assert "\n" not in msg
    assert "federation.rounds is a value, not a section" in msg


@pytest.mark.parametrize(
    "text, expected",
    [
        ("federation.rounds", "expected key=value"),
        ("=3", "dotted field path"),
        ("  =3", "dotted field path"),
        ("federation..rounds=3", "dotted field path"),
        ("federation.=3", "dotted field path"),
        ("name=[1", "not valid YAML"),
    ],
)
def test_malformed_overrides_are_errors(text, expected):
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [text])
    msg = str(info.value)
    assert "\n" not in msg and expected in msg and repr(text) in msg


def test_parse_override_empty_value_is_none():
    assert parse_override("tracking.tracking_uri=") == (["tracking", "tracking_uri"], None)


# ---------------------------------------------------------------------------------------------
# load_config
# ---------------------------------------------------------------------------------------------


def test_load_config_applies_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("name: demo\nfederation:\n  rounds: 7\n")
    cfg = load_config(f, ["federation.rounds=3", "seed=11"])
    assert (cfg.name, cfg.federation.rounds, cfg.seed) == ("demo", 3, 11)


def test_load_config_empty_mapping_is_defaults(tmp_path):
    # An all-default experiment says so with {}; an empty or comment-only file is refused
    # (tests/test_config_bad_input.py), as it is far more often the wrong file.
    f = tmp_path / "defaults.yaml"
    f.write_text("# every field at its default\n{}\n")
    assert load_config(f) == validate_config({})


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, "config file not found"),
        ("federation:\n  rounds: [1\n", "invalid YAML"),
        ("- 1\n- 2\n", "top level must be a mapping"),
        ("federation:\n  rounds: 0\n", "federation.rounds: got 0"),
        ("federation:\n  bogus: 1\n", "federation.bogus: unknown field"),
    ],
)
def test_load_config_errors_name_the_file(tmp_path, text, expected):
    f = tmp_path / "exp.yaml"
    if text is not None:
        f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(f)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(f)) and expected in msg


def test_load_config_invalid_yaml_names_the_line(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("name: x\nseed: 1\nenv: {slate_size: 3\n")
    with pytest.raises(ConfigError, match=r"line \d+ invalid YAML"):
        load_config(f)


def test_load_config_override_error_on_valid_file(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("federation:\n  rounds: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, ["federation.rounds=zero"])
    assert str(info.value).startswith(f"{f}: federation.rounds: got 'zero'")


def test_tune_configs_exist():
    assert TUNE_CONFIGS, "tune_configs/ holds no YAML file"


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_every_tune_config_validates(path):
    cfg = load_config(path)
    assert len(cfg.client_lambdas()) == cfg.clients.num_clients
    # Every key written in the file survives into the validated config (nothing silently dropped).
    raw = yaml.safe_load(path.read_text())
    dumped = cfg.to_dict()

    def check(sub_raw, sub_dumped, where):
        for key, value in sub_raw.items():
            assert key in sub_dumped, f"{where}{key} lost"
            if isinstance(value, dict) and isinstance(sub_dumped[key], dict):
                check(value, sub_dumped[key], f"{where}{key}.")
            else:
                assert sub_dumped[key] == value, f"{where}{key}: {sub_dumped[key]!r} != {value!r}"

    check(raw, dumped, "")
