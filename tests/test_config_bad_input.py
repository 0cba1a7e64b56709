"""User mistakes in config files end in one ConfigError line: files that are not YAML text,
repeated keys, non-finite numbers, booleans for numbers, strings that cannot name what they
name, values impossible together, with the data or with the machine.

Pure config/YAML except the data section, which builds clients (synthetic, and MovieLens on
the shared copy when it is present); nothing here starts Ray.
"""

from __future__ import annotations

import codecs
import os
import random
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from envs.data.partition import PartitionError
from envs.rec_env import SlateRecEnv
from envs.synthetic import make_synthetic_clients
from fedrlhf_ray import ray_runtime as machine_checks
from fedrlhf_ray.config import ConfigError, apply_overrides, load_config, read_yaml, validate_config
from fedrlhf_ray.ray_runtime import check_machine
from fedrlhf_ray.schema import ENV_ONLY_SECTIONS, ENV_SECTIONS, ExperimentConfig
from fedrlhf_ray.tasks.rec.clients import build_clients
from fedrlhf_ray.tracking import tracking_uri_problem


def one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert msg.strip() and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def config_error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return one_line(info)


def file_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = one_line(info)
    assert msg.startswith(str(path)), msg
    return msg


def env_of(dotted: str) -> str | None:
    """The env whose config has the field ``dotted`` (None: every env's has it)."""
    first, _, rest = dotted.partition(".")
    if first in ENV_ONLY_SECTIONS:
        return ENV_ONLY_SECTIONS[first][0]
    if first != "env" or rest == "name":
        return None
    return next(name for name, section in ENV_SECTIONS.items() if rest.partition(".")[0] in section.model_fields)


def nested(dotted: str, value) -> dict:
    """``{"a": {"b": value}}`` for ``"a.b"``, in a config of the env that has the field."""
    *sections, leaf = dotted.split(".")
    raw: dict = {leaf: value}
    for section in reversed(sections):
        raw = {section: raw}
    env = env_of(dotted)
    if env is not None:
        raw.setdefault("env", {})["name"] = env
    return raw


def _section(annotation) -> type[BaseModel] | None:
    candidates = (annotation, *typing.get_args(annotation))
    return next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)


def leaf_fields(model: type = ExperimentConfig, prefix: str = ""):
    """(dotted name, annotation) of every leaf field, nested sections and every env's included."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        if model is ExperimentConfig and name == "env":
            seen: set[str] = set()
            for env_section in ENV_SECTIONS.values():
                for env_key, annotation in leaf_fields(env_section, "env."):
                    if env_key not in seen:
                        seen.add(env_key)
                        yield env_key, annotation
            continue
        section = _section(field.annotation)
        if section is not None:
            yield from leaf_fields(section, key + ".")
        else:
            yield key, field.annotation


def _is(annotation, kind: type) -> bool:
    """``annotation`` is ``kind`` or ``kind | None`` (either possibly ``Annotated``)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation is kind:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(args) == 1 and _is(args[0], kind)
    return False


FLOAT_FIELDS = [key for key, ann in leaf_fields() if _is(ann, float)]
INT_FIELDS = [key for key, ann in leaf_fields() if _is(ann, int)]


def test_the_field_lists_cover_the_sections():
    assert {"ppo.lr", "reward_model.lr", "ppo.clip_param", "federation.straggler_timeout_s",
            "env.heldout_fraction", "ray.cpus_per_worker", "env.synthetic.heterogeneity"} <= set(FLOAT_FIELDS)
    assert {"seed", "federation.rounds", "clients.num_clients", "ray.num_workers", "env.data.min_ratings",
            "ppo.minibatch_size"} <= set(INT_FIELDS)


# ---------------------------------------------------------------------------------------------
# 1. files that are not YAML text
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, expected",
    [
        ("name: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 9)"),
        ("name: x\n".encode("utf-16"), "is UTF-16 or UTF-32 text — save it as UTF-8"),
        ("name: x\n".encode("utf-16-be"), "holds NUL bytes"),  # no BOM
        ("name: x\n".encode("utf-32"), "is UTF-16 or UTF-32 text"),
        (codecs.BOM_UTF32_BE + "name: x\n".encode("utf-32-be"), "is UTF-16 or UTF-32 text"),
        (bytes(random.Random(0).randrange(128, 256) for _ in range(300)), "is not UTF-8 text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(40), "holds NUL bytes — binary data"),
        (b"", "holds no settings (it is empty or only comments)"),
        (b"\n   \n", "holds no settings"),
        (b"# a comment\n# another\n", "holds no settings"),
        (b"name: a\nseed: 1\nenv: {slate_size: 3\x07}\n", "line 3 invalid YAML (character #x0007 is not allowed"),
        (b"hello world\n", "the top level must be a mapping of sections, got str"),
        (b"userId,movieId,rating\n1,2,4.0\n", "the top level must be a mapping of sections"),
    ],
    ids=["latin-1", "utf-16", "utf-16-no-bom", "utf-32", "utf-32-be", "random-bytes", "png", "empty",
         "blank", "only-comments", "control-char", "plain-text", "csv"],
)
def test_file_that_is_not_a_yaml_mapping(tmp_path, content, expected):
    f = tmp_path / "exp.yaml"
    f.write_bytes(content)
    assert expected in file_error(f)


def test_an_empty_mapping_is_all_defaults_and_a_utf8_bom_is_fine(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_bytes(codecs.BOM_UTF8 + b"{}\n")
    assert load_config(f) == validate_config({})
    f.write_bytes(codecs.BOM_UTF8 + "name: café\n".encode())
    assert load_config(f).name == "café"


def test_directory_given_as_config(tmp_path):
    assert file_error(tmp_path).endswith(": is a directory, not a config file")


def test_device_given_as_config():
    with pytest.raises(ConfigError) as info:
        read_yaml("/dev/null")
    assert one_line(info) == "/dev/null: is not a regular file"


def test_huge_file_is_not_read(tmp_path):
    f = tmp_path / "ratings.yaml"
    f.write_bytes(b"# x\n" * 300_000)
    assert "is 1,200,000 bytes — not a config file" in file_error(f)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_unreadable_file(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("name: x\n")
    f.chmod(0)
    try:
        assert file_error(f).endswith(": cannot be read (permission denied)")
    finally:
        f.chmod(0o600)


def test_read_error_is_one_line(tmp_path, monkeypatch):
    """The chmod 000 case for root too, and any other OSError."""
    f = tmp_path / "exp.yaml"
    f.write_text("name: x\n")
    for err, expected in [(PermissionError(13, "Permission denied"), "cannot be read (permission denied)"),
                          (OSError(5, "Input/output error"), "cannot be read (Input/output error)")]:
        def fail(self, err=err):
            raise err

        monkeypatch.setattr(Path, "read_bytes", fail)
        assert file_error(f) == f"{f}: {expected}"


def test_sweep_files_are_read_the_same_way(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_bytes("name: s\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="UTF-16"):
        read_yaml(f)


# ---------------------------------------------------------------------------------------------
# 2. repeated keys, tags
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        ("federation:\n  rounds: 2\nseed: 1\nfederation:\n  rounds: 3\n", "federation", 4, 1),
        ("name: a\nfederation:\n  rounds: 2\n  strategy: fedavg\n  rounds: 3\n", "rounds", 5, 3),
        ("env:\n  synthetic:\n    n_items: 50\n    n_items: 60\n", "n_items", 4, 3),
        ("seed: 1\nshaping: {lambda: {low: 0.1, high: 0.5, low: 0.2}}\n", "low", 2, 2),
    ],
    ids=["top-level", "section", "nested-section", "flow-mapping"],
)
def test_repeated_key_names_key_and_lines(tmp_path, text, key, line, first):
    f = tmp_path / "exp.yaml"
    f.write_text(text)
    msg = file_error(f)
    assert f"line {line} invalid YAML (duplicate key {key!r}, first given on line {first})" in msg


def test_anchors_and_merge_keys_of_plain_data_still_work(tmp_path):
    f = tmp_path / "exp.yaml"
    # A key a merge (<<) brings in may be overridden: that is what merging is for.
    f.write_text("tracking: {experiment: &e demo}\nname: *e\nfederation:\n  <<: {rounds: 2, strategy: median}\n"
                 "  rounds: 4\n")
    cfg = load_config(f)
    assert (cfg.name, cfg.federation.rounds, cfg.federation.strategy) == ("demo", 4, "median")


def test_repeated_key_in_an_override():
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, ["shaping.lambda={low: 1, low: 2}"])
    assert "the value is not valid YAML (duplicate key 'low', first given on line 1)" in one_line(info)


@pytest.mark.parametrize(
    "text",
    ["name: !!python/object/apply:os.system ['echo hi']\n", "name: !!python/name:os.system\n",
     "seed: !!python/object:fedrlhf_ray.schema.ExperimentConfig {}\n"],
)
def test_python_tags_build_nothing(tmp_path, text):
    f = tmp_path / "exp.yaml"
    f.write_text(text)
    assert "line 1 invalid YAML (could not determine a constructor for the tag" in file_error(f)
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides({}, [f"name={text.split(': ', 1)[1].strip()}"])


# ---------------------------------------------------------------------------------------------
# 3. non-finite numbers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", "-Infinity"])
@pytest.mark.parametrize("dotted", FLOAT_FIELDS)
def test_every_float_field_refuses_non_finite(dotted, value):
    msg = config_error(nested(dotted, value))
    assert msg.startswith(f"{dotted}: got {value!r} — ") and "finite number" in msg


@pytest.mark.parametrize(
    "lam, where",
    [
        (float("nan"), "shaping.lambda"),
        ("inf", "shaping.lambda"),
        ([0.1, float("nan"), 0.3, 0.4, 0.5], "shaping.lambda.1"),
        ([0.1, 0.2, 0.3, 0.4, float("inf")], "shaping.lambda.4"),
        ({"low": float("-inf"), "high": 0.9}, "shaping.lambda.low"),
        ({"low": 0.1, "high": "nan"}, "shaping.lambda.high"),
    ],
)
def test_lambda_refuses_non_finite_in_every_form(lam, where):
    msg = config_error({"shaping": {"lambda": lam}})
    assert msg.startswith(f"{where}: got ") and "finite number" in msg


@pytest.mark.parametrize(
    "text, override, where",
    [
        ("ppo:\n  lr: .nan\n", None, "ppo.lr: got nan"),
        ("federation:\n  straggler_timeout_s: .inf\n", None, "federation.straggler_timeout_s: got inf"),
        ("shaping:\n  lambda: [0.1, -.inf, 0.2, 0.3, 0.4]\n", None, "shaping.lambda.1: got -inf"),
        ("{}\n", "ppo.lr=.nan", "ppo.lr: got nan"),
        ("{}\n", "reward_model.lr=nan", "reward_model.lr: got 'nan'"),
        ("{}\n", "shaping.lambda={low: 0.1, high: .inf}", "shaping.lambda.high: got inf"),
        ("{}\n", "env.heldout_fraction=.NaN", "env.heldout_fraction: got nan"),
    ],
)
def test_non_finite_from_a_file_or_an_override(tmp_path, text, override, where):
    f = tmp_path / "exp.yaml"
    f.write_text(text)
    msg = file_error(f, [override] if override else None)
    assert f"{f}: {where} — Input should be a finite number" == msg


# ---------------------------------------------------------------------------------------------
# 4. booleans and strings for numbers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("dotted", INT_FIELDS)
def test_every_int_field_refuses_booleans(dotted, value):
    msg = config_error(nested(dotted, value))
    assert msg == f"{dotted}: got {value!r} — must be an integer such as 3 (or 3.0), not true/false or a quoted string"


@pytest.mark.parametrize("dotted", FLOAT_FIELDS)
def test_every_float_field_refuses_booleans(dotted):
    assert config_error(nested(dotted, True)) == f"{dotted}: got True — must be a number such as 0.5, not true/false"


def test_lambda_refuses_booleans():
    assert config_error({"shaping": {"lambda": True}}).startswith("shaping.lambda: got True — must be a number")
    assert config_error({"shaping": {"lambda": [0.1, False]}, "clients": {"num_clients": 2}}).startswith(
        "shaping.lambda.1: got False — must be a number"
    )


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"federation": {"rounds": "3"}}, "federation.rounds: got '3' — must be an integer"),
        ({"seed": "0"}, "seed: got '0' — must be an integer"),
        ({"federation": {"rounds": 2.5}}, "federation.rounds: got 2.5 — Input should be a valid integer"),
        ({"clients": {"num_clients": [5]}}, "clients.num_clients: got [5] — must be an integer"),
    ],
)
def test_int_fields_take_numbers_only(raw, expected):
    assert config_error(raw).startswith(expected)


def test_integral_floats_are_integers_and_number_strings_are_floats():
    cfg = validate_config({"federation": {"rounds": 3.0}, "seed": 7.0, "ppo": {"lr": "1e-3"}})
    assert (cfg.federation.rounds, cfg.seed) == (3, 7) and type(cfg.federation.rounds) is int
    assert cfg.ppo.lr == pytest.approx(1e-3)


def test_boolean_override(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("{}\n")
    assert file_error(f, ["federation.rounds=true"]).endswith("federation.rounds: got True — must be an integer "
                                                               "such as 3 (or 3.0), not true/false or a quoted string")


# ---------------------------------------------------------------------------------------------
# 5. the machine
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ray_cfg, expected",
    [
        ({"num_cpus": 2, "num_workers": 4},
         "ray.num_workers: got 4 — 4 client actors × ray.cpus_per_worker 1 = 4 CPUs, more than ray.num_cpus (2)"),
        ({"num_cpus": 2, "num_workers": 3, "cpus_per_worker": 1.5},
         "ray.num_workers: got 3 — 3 client actors × ray.cpus_per_worker 1.5 = 4.5 CPUs, more than ray.num_cpus (2)"),
        ({"num_cpus": 2, "cpus_per_worker": 3},
         "ray.cpus_per_worker: got 3 — at most ray.num_cpus (2), or no client actor can start"),
    ],
)
def test_workers_must_fit_num_cpus(ray_cfg, expected):
    assert config_error({"ray": ray_cfg}) == expected


def test_workers_that_fit_num_cpus_are_fine():
    # At most K actors start, so W beyond K costs nothing; 3 × 1/3 CPUs is 3 CPUs despite rounding.
    assert validate_config({"ray": {"num_cpus": 2, "num_workers": 8}, "clients": {"num_clients": 2}})
    assert validate_config({"ray": {"num_cpus": 1, "num_workers": 3, "cpus_per_worker": 1 / 3}})
    # Ray oversubscribes a num_cpus beyond the machine's: that is no mistake.
    assert validate_config({"ray": {"num_cpus": 4 * (os.cpu_count() or 1)}})


@pytest.fixture
def machine(monkeypatch):
    """A fake machine: 4 CPUs, 8 GiB of memory, 1 GiB free in /dev/shm."""
    state = {"cpus": 4, "memory": 8 << 30, "shm": 1 << 30}
    monkeypatch.setattr(machine_checks, "_machine_cpus", lambda: state["cpus"])
    monkeypatch.setattr(machine_checks, "_memory_bytes", lambda: state["memory"])
    monkeypatch.setattr(machine_checks, "_shm_free_bytes", lambda: state["shm"])
    monkeypatch.delenv("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE", raising=False)
    return state


def machine_error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        check_machine(validate_config(raw))
    return one_line(info)


def test_check_machine_accepts_what_fits(machine):
    assert check_machine(validate_config({"ray": {"num_workers": 4, "object_store_mb": 1024}})) == []


def test_check_machine_cpus_when_num_cpus_is_unset(machine):
    assert machine_error({"ray": {"cpus_per_worker": 6}}) == (
        "ray.cpus_per_worker: got 6 — at most this machine's CPUs (4), or no client actor can start"
    )
    assert machine_error({"ray": {"num_workers": 5}}) == (
        "ray.num_workers: got 5 — 5 client actors × ray.cpus_per_worker 1 = 5 CPUs, more than this machine's CPUs (4)"
    )
    # With num_cpus set, Ray's size is num_cpus, not the machine's.
    assert check_machine(validate_config({"ray": {"num_cpus": 8, "num_workers": 5}})) == []


def test_check_machine_object_store_beyond_memory(machine):
    assert machine_error({"ray": {"object_store_mb": 9000}}) == (
        "ray.object_store_mb: got 9000 — more than this machine's memory (8192 MB)"
    )


def test_check_machine_object_store_beyond_shm(machine):
    # Ray moves a store that does not fit /dev/shm to /tmp (slow): a warning, not an error...
    assert check_machine(validate_config({"ray": {"object_store_mb": 2048}})) == [
        "ray.object_store_mb: 2048 MB is more than /dev/shm's free 1024 MB: Ray keeps the object store in /tmp instead, "
        + "which is slower"
    ]
    # ...unless it is over Ray's 10 GB limit for that, where Ray refuses to start.
    machine["memory"] = 64 << 30
    assert machine_error({"ray": {"object_store_mb": 20000}}) == (
        "ray.object_store_mb: got 20000 — more than /dev/shm's free 1024 MB "
        "(enlarge /dev/shm, e.g. docker run --shm-size, or lower it)"
    )


def test_check_machine_on_this_machine():
    assert isinstance(check_machine(validate_config({})), list)


# ---------------------------------------------------------------------------------------------
# 6. the data
# ---------------------------------------------------------------------------------------------


def synthetic_file(tmp_path: Path, **sections) -> Path:
    raw = {"clients": {"num_clients": 2}, **sections}
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"env": {"slate_size": 10, "synthetic": {"n_items": 20, "items_per_user": 11}}},
         ("env.synthetic.items_per_user: got 11 — at most env.synthetic.n_items (20) - env.slate_size (10) = 10: "
          "a slate is filled with items the user never watched")),
        ({"env": {"slate_size": 100, "synthetic": {"n_items": 50, "items_per_user": 4}}},
         "env.synthetic.items_per_user: got 4 — at most env.synthetic.n_items (50) - env.slate_size (100) = -50"),
        ({"env": {"synthetic": {"items_per_user": 4}, "heldout_fraction": 0.7}},
         ("env.heldout_fraction: got 0.7 — holds out 3 of the 4 items per user (env.synthetic.items_per_user), "
          "leaving 1 for training; at least 2 must remain (a pairwise query compares two)")),
        ({"env": {"heldout_fraction": 0.995}, "feedback": {"kind": "rating"}},
         ("env.heldout_fraction: got 0.995 — holds out 60 of the 60 items per user (env.synthetic.items_per_user), "
          "leaving 0 for training; at least 1 must remain (training needs one)")),
    ],
)
def test_synthetic_world_that_cannot_be_built(tmp_path, sections, expected):
    f = synthetic_file(tmp_path, **sections)
    with pytest.raises(ConfigError) as info:
        build_clients(load_config(f))
    assert one_line(info).startswith(f"{f}: {expected}")


def test_synthetic_bounds_are_exact(tmp_path):
    """At the bounds the clients build and both envs start (no raw error anywhere)."""
    cases = [
        {"env": {"slate_size": 10, "synthetic": {"n_items": 20, "items_per_user": 10}}},
        {"env": {"synthetic": {"items_per_user": 4}, "heldout_fraction": 0.5}},  # 2 held out, 2 to train
        {"env": {"heldout_fraction": 0.99}, "feedback": {"kind": "rating"}},  # 59 held out, 1 to train
    ]
    for sections in cases:
        cfg = load_config(synthetic_file(tmp_path, **sections))
        clients = build_clients(cfg)
        assert len(clients) == cfg.clients.num_clients
        for client in clients:
            for mode in ("train", "heldout"):
                env = SlateRecEnv(client, slate_size=cfg.env.slate_size, mode=mode, seed=0)
                obs, _ = env.reset(seed=0)
                assert env.observation_space.contains(obs)
                assert obs["candidate_items"].shape == (cfg.env.slate_size,)


def test_movielens_sections_do_not_trip_synthetic_checks():
    cfg = validate_config({"env": {"name": "movielens", "slate_size": 100}})
    assert cfg.slate_env().slate_size == 100


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"env": {"name": "movielens", "synthetic": {"n_items": 50}}},
         "env.synthetic: unknown field of the movielens env (env.name picks the env) — allowed: data, heldout_fraction"),
        ({"env": {"data": {"path": "x"}}}, "env.data: unknown field of the synthetic env"),
        ({"env": {"name": "imdb", "slate_size": 4}}, "env.slate_size: unknown field of the imdb env"),
        ({"env": {"name": "movielens"}, "lm": {"n_layer": 3}},
         "lm: only env.name imdb has this section (env.name is movielens); remove it"),
    ],
)
def test_another_envs_fields_are_refused(raw, expected):
    assert config_error(raw).startswith(expected)


def test_configs_that_carry_every_envs_defaults_still_load():
    """A config.yaml written when every env's section was always there (older run directories)."""
    old = ExperimentConfig.model_validate({"env": {"name": "imdb"}}).to_dict()
    for name, section in ENV_SECTIONS.items():
        old["env"].update({k: v for k, v in section().model_dump(mode="json").items() if k != "name"})
    old["env"]["name"] = "movielens"
    cfg = validate_config(old)
    assert cfg.env.name == "movielens" and cfg.lm is None and "lm" not in cfg.to_dict()
    assert set(cfg.to_dict()["env"]) == set(ENV_SECTIONS["movielens"].model_fields)
    old["env"]["imdb"]["reviews_per_client"] = 50  # set, not a default: a mistake to report
    assert config_error(old).startswith("env.imdb: unknown field of the movielens env")


def test_make_synthetic_clients_refuses_an_empty_training_split():
    with pytest.raises(ValueError, match=r"heldout_fraction \(0.9\) holds out all 4 items per user"):
        make_synthetic_clients(num_clients=1, items_per_user=4, heldout_fraction=0.9)


@pytest.fixture(scope="module")
def movielens(shared_data, tmp_path_factory):
    """Raw config sections of the shared ml-100k copy (943 users, each with >= 20 ratings, at most 737)."""
    return {"name": "movielens",
            "data": {"dataset": "ml-100k", "path": str(shared_data / "ml-100k"),
                     "cache_dir": str(tmp_path_factory.mktemp("ml-cache"))}}


def movielens_error(movielens, clients: dict, min_ratings: int = 20) -> str:
    env = {**movielens, "data": {**movielens["data"], "min_ratings": min_ratings}}
    cfg = validate_config({"env": env, "clients": clients})
    # clients_data.build_clients is to turn a PartitionError into a ConfigError; either is one line.
    with pytest.raises((ConfigError, PartitionError)) as info:
        build_clients(cfg)
    return one_line(info)


def test_movielens_more_clients_than_users(movielens):
    assert movielens_error(movielens, {"num_clients": 944}).endswith(
        "num_clients: got 944 — 944 clients x 1 users need 944 users with at least 20 ratings (min_ratings); "
        "the data has 943"
    )


def test_movielens_groups_need_more_users(movielens):
    msg = movielens_error(movielens, {"num_clients": 100, "formation": "group", "users_per_client": 10})
    assert msg.endswith("num_clients: got 100 — 100 clients x 10 users need 1000 users with at least 20 ratings "
                        "(min_ratings); the data has 943")
    msg = movielens_error(movielens, {"num_clients": 5, "formation": "group", "users_per_client": 20}, 400)
    assert "need 100 users with at least 400 ratings (min_ratings); the data has" in msg


def test_movielens_min_ratings_no_user_meets(movielens):
    assert movielens_error(movielens, {"num_clients": 2}, 5000).endswith(
        "min_ratings: got 5000 — no user has 5000 ratings (the most any user has is 737)"
    )


def test_form_clients_errors_are_partition_errors():
    import pandas as pd

    from envs.data.partition import form_clients, temporal_split

    ratings = pd.DataFrame({"user": [1, 1, 2, 2], "item": [1, 2, 1, 2], "rating": [4.0, 3.0, 2.0, 5.0],
                            "timestamp": [1, 2, 3, 4]})
    movies = pd.DataFrame({"item": [1, 2], "title": ["a", "b"], "year": [2000.0, 2001.0], "genre:X": [1, 0]})
    for kwargs, expected in [
        ({"num_clients": 0}, "num_clients: got 0 — must be >= 1"),
        ({"num_clients": 1, "formation": "silo"}, "formation: got 'silo' — allowed: user, group"),
        ({"num_clients": 1, "grouping": "age"}, "grouping: got 'age' — allowed: random, taste"),
        ({"num_clients": 1}, "min_ratings: got 20 — no user has 20 ratings (the most any user has is 2)"),
        ({"num_clients": 3, "min_ratings": 2}, "3 clients x 1 users need 3 users with at least 2 ratings"),
    ]:
        with pytest.raises(PartitionError) as info:
            form_clients(ratings, movies, ("X",), **kwargs)
        assert expected in one_line(info)
    with pytest.raises(PartitionError, match=r"^heldout_fraction: got 1.0 — must lie in \(0, 1\)$"):
        temporal_split(ratings, heldout_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# 7. strings that must name something usable
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "   ", ".", "..", "runs/a", "../up", "a\\b", "two\nlines", "nul\x00"])
def test_name_must_be_a_directory_name(name):
    assert config_error({"name": name}) == (
        f"name: got {name!r} — must be usable as a directory name: not empty, '.' or '..', "
        "no '/', '\\' or control character"
    )


def test_usable_names():
    for name in ("my run", "λ-sweep_0.5", "a" * 200, "exp.v2"):
        assert validate_config({"name": name}).name == name
    assert config_error({"name": "a" * 201}).endswith("String should have at most 200 characters")


@pytest.mark.parametrize("experiment", ["", "  "])
def test_tracking_experiment_must_be_named(experiment):
    assert config_error({"tracking": {"experiment": experiment}}) == (
        f"tracking.experiment: got {experiment!r} — must name an MLflow experiment, e.g. fedrlhf"
    )


ALLOWED_STORES = ("a path, file://, sqlite:///, http(s)://, postgresql://, mysql://, mssql:// or databricks://")


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("ftp://host/x", f"ftp:// is not an MLflow tracking store; use {ALLOWED_STORES}"),
        ("s3://bucket/mlruns", f"s3:// is not an MLflow tracking store; use {ALLOWED_STORES}"),
        ("htp://localhost:5000", f"htp:// is not an MLflow tracking store; use {ALLOWED_STORES}"),
        ("http://", "http:// needs a host, e.g. http://127.0.0.1:5000"),
        ("https:///path", "https:// needs a host, e.g. http://127.0.0.1:5000"),
        ("sqlite://", "a SQLite store is sqlite:///<file>, e.g. sqlite:///mlflow.db"),
        ("sqlite:mlflow.db", "a SQLite store is sqlite:///<file>, e.g. sqlite:///mlflow.db"),
        ("", f"must be {ALLOWED_STORES} (leave it unset for the default)"),
    ],
)
def test_tracking_uri_scheme(uri, expected):
    assert config_error({"tracking": {"tracking_uri": uri}}) == f"tracking.tracking_uri: got {uri!r} — {expected}"


@pytest.mark.parametrize(
    "uri",
    ["sqlite:///mlflow.db", "sqlite:////abs/mlflow.db", "http://127.0.0.1:5000", "https://mlflow.example.org",
     "file:///tmp/mlruns", "mlruns", "./runs/mlruns", "/abs/mlruns", "C:\\mlruns",
     "postgresql://user@host/db", "postgresql+psycopg2://user@host/db", "mysql+pymysql://u@h/db",
     "mssql+pyodbc://u@h/db", "databricks", "databricks://profile", "databricks-uc"],
)
def test_tracking_uris_mlflow_accepts(uri):
    assert tracking_uri_problem(uri) is None
    assert validate_config({"tracking": {"tracking_uri": uri}}).tracking.tracking_uri == uri


def test_personal_layers():
    assert config_error({"federation": {"personalization": "personal_head", "personal_layers": []}}) == (
        "federation.personal_layers: got [] — personalization 'personal_head' needs at least one parameter-name "
        "prefix to keep on the clients, e.g. scorer.score_head."
    )
    # An empty prefix would match every parameter: nothing would be shared.
    assert config_error({"federation": {"personal_layers": ["scorer.", ""]}}) == (
        "federation.personal_layers.1: got '' — String should have at least 1 character"
    )
    assert validate_config({"federation": {"personal_layers": []}}).federation.personal_layers == []


@pytest.mark.parametrize("dotted", ["env.data.path", "env.data.cache_dir", "federation.client_state_dir"])
def test_blank_paths(dotted):
    assert config_error(nested(dotted, "")) == f"{dotted}: got '' — String should have at least 1 character"


# ---------------------------------------------------------------------------------------------
# 8. values impossible together
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "federation, clients, expected",
    [
        ({"min_results": 6}, 5,
         ("federation.min_results: got 6 — at most the 5 clients sampled per round "
          "(federation.clients_per_round 1 of clients.num_clients 5)")),
        ({"min_results": 3, "clients_per_round": 0.4}, 5,
         ("federation.min_results: got 3 — at most the 2 clients sampled per round "
          "(federation.clients_per_round 0.4 of clients.num_clients 5)")),
        ({"min_results": 4, "clients_per_round": 3}, 10,
         ("federation.min_results: got 4 — at most the 3 clients sampled per round "
          "(federation.clients_per_round 3 of clients.num_clients 10)")),
    ],
)
def test_min_results_cannot_exceed_the_sampled_clients(federation, clients, expected):
    assert config_error({"federation": federation, "clients": {"num_clients": clients}}) == expected


def test_min_results_is_moot_for_the_centralized_baseline():
    cfg = validate_config({"federation": {"min_results": 3, "baseline": "centralized"}})
    assert cfg.federation.min_results == 3
    assert validate_config({"federation": {"min_results": 2, "clients_per_round": 0.4}})


def test_the_centralized_baseline_keeps_no_personal_layers_it_never_trains():
    federation = {"baseline": "centralized", "personalization": "personal_head", "personal_layers": ["value_head"]}
    assert config_error({"federation": federation}) == (
        "federation.personalization: got 'personal_head' — the centralized baseline trains one pooled model, so no "
        "client's personal layers would ever be trained; set federation.personalization: none (or finetune)"
    )
    assert validate_config({"federation": {**federation, "personalization": "finetune"}})


def test_finetune_needs_iterations():
    assert config_error({"federation": {"personalization": "finetune", "finetune_iterations": 0}}) == (
        "federation.finetune_iterations: got 0 — must be >= 1 under personalization 'finetune' "
        "(or set federation.personalization: none)"
    )
    assert validate_config({"federation": {"finetune_iterations": 0}}).federation.finetune_iterations == 0


def test_like_threshold_within_the_rating_scales():
    assert config_error({"env": {"like_threshold": 40}}) == (
        "env.like_threshold: got 40 — Input should be less than or equal to 5"
    )
    assert config_error({"env": {"like_threshold": 0}}).startswith("env.like_threshold: got 0 — Input should be greater")


def test_non_string_keys():
    assert config_error({1: 2}) == "1: got 1 — Keys should be strings"
    assert config_error({"federation": {None: 2}}) == "federation.None: got None — Keys should be strings"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"tracking": {"enabled": "yes"}}, "tracking.enabled: got 'yes' — must be true or false (unquoted)"),
        ({"privacy": {"dp": {"enabled": 1}}}, "privacy.dp.enabled: got 1 — must be true or false (unquoted)"),
        ({"federation": {"sparse_rows": "off"}}, "federation.sparse_rows: got 'off' — must be true or false"),
        ({"privacy": {"dp": {"enabled": True, "noise_multiplier": 1e300}}},
         "privacy.dp.noise_multiplier: got 1e+300 — Input should be less than or equal to 1000"),
        ({"attack": {"kind": "scale", "fraction": 0.05}},
         "attack.fraction: got 0.05 — round(0.05 × 5 clients) makes no client malicious"),
    ],
)
def test_quoted_booleans_huge_sigmas_and_attacks_without_attackers(raw, expected):
    assert config_error(raw).startswith(expected)
