"""Experiment files: read, override and validate one YAML file into an :class:`ExperimentConfig`.

Validation is the schema's (``schema``) and then every subsystem's cross-checks (``preflight``).
Errors are reported in one line that names the field, the bad value and what is allowed, e.g.::

    federation.rounds: got 0 — must be >= 1

A YAML key may not repeat, and a file is read as plain data only (no tag builds a Python object).
Whether the machine can host a local Ray is ``ray_runtime.check_machine``'s question, asked only
when one is started here.
"""

from __future__ import annotations

import codecs
import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fedrlhf_ray.errors import ConfigError
from fedrlhf_ray.preflight import check_config
from fedrlhf_ray.schema import (
    _LAMBDA_FORMS,
    DEFAULT_ENV,
    ENV_ONLY_SECTIONS,
    ENV_SECTIONS,
    ExperimentConfig,
    LambdaSpread,
)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_at(loc: list[str]) -> type[BaseModel]:
    """The section at ``loc`` (field names and λ's form tags), whose fields an unknown key is listed with."""
    model: type[BaseModel] = ExperimentConfig
    for i, part in enumerate(loc):
        if part == "spread":
            model = LambdaSpread
            continue
        if loc[:i] == ["env"] and part in ENV_SECTIONS:
            model = ENV_SECTIONS[part]
            continue
        for name, field in model.model_fields.items():
            if part in (name, field.alias) and isinstance(field.annotation, type) and issubclass(
                field.annotation, BaseModel
            ):
                model = field.annotation
    return model


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"]]
    # Tags of λ's forms and of the env's kinds appear in the location, not in the field names.
    names = [
        p for i, p in enumerate(parts)
        if not (i and parts[i - 1] == "lambda" and p in _LAMBDA_FORMS) and not (i == 1 and parts[0] == "env")
    ]
    loc = ".".join(names)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "env_name":
        value = first.get("input")
        if not isinstance(value, dict):
            return f"env: got {_short_repr(value)} — must be a mapping (a section) such as {{name: {DEFAULT_ENV}}}"
        return f"env.name: got {_short_repr(value.get('name'))} — must be one of {', '.join(ENV_SECTIONS)}"
    if first["type"] == "extra_forbidden" and len(parts) == 3 and parts[0] == "env":
        allowed = ", ".join(_allowed_fields(_model_at(parts[:-1])))
        return f"{loc}: unknown field of the {parts[1]} env (env.name picks the env) — allowed: {allowed}"
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown field — allowed: {', '.join(_allowed_fields(_model_at(parts[:-1])))}"
    value = first.get("input")
    if isinstance(value, dict) and first["type"] not in ("model_type", "dict_type"):
        return f"{loc}: {msg}" if loc else msg
    if loc and "input" in first:
        return f"{loc}: got {_short_repr(value)} — {msg}"
    return f"{loc}: {msg}" if loc else msg


def _allowed_fields(model: type[BaseModel]) -> list[str]:
    return sorted(f.alias or name for name, f in model.model_fields.items())


def _default_dump(model: type[BaseModel], name: str) -> Any:
    field = model.model_fields[name]
    default = field.get_default(call_default_factory=True)
    return default.model_dump(mode="json", by_alias=True) if isinstance(default, BaseModel) else default


def _only_defaults(given: Any, default: Any) -> bool:
    """Whether ``given`` sets nothing but ``default``'s values (a section may leave keys out)."""
    if isinstance(given, dict) and isinstance(default, dict):
        return all(k in default and _only_defaults(v, default[k]) for k, v in given.items())
    return bool(given == default)


def without_other_envs_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` without the other envs' sections where they hold their defaults.

    Configs written before each env carried only its own fields (every run directory's
    ``config.yaml`` of that time, and files copied from it) hold every env's section at its
    defaults, and a config whose ``env.name`` is switched by ``--set`` keeps its former env's
    section: those still load when the section sets nothing but defaults. A section of another
    env set to anything else stays and is refused by the schema, naming it."""
    env = raw.get("env")
    if not isinstance(env, dict):
        return raw
    name = env.get("name", DEFAULT_ENV)
    own = ENV_SECTIONS.get(name) if isinstance(name, str) else None
    if own is None:
        return raw
    out = dict(raw)
    kept = dict(env)
    for key, value in env.items():
        if key in own.model_fields:
            continue
        others = [m for m in ENV_SECTIONS.values() if key in m.model_fields]
        if others and all(_only_defaults(value, _default_dump(m, key)) for m in others):
            del kept[key]
    out["env"] = kept
    for section, (owner, model) in ENV_ONLY_SECTIONS.items():
        defaults = model().model_dump(mode="json", by_alias=True)
        if name != owner and section in out and _only_defaults(out[section], defaults):
            del out[section]
    return out


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig` or raise a one-line ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(without_other_envs_defaults(raw))
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    return check_config(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. federation.rounds=3")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be a dotted field path, e.g. ppo.lr")
    try:
        parsed = _load_yaml(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({_yaml_problem(err, value)[1]})") from None
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key=value`` override set at its dotted path."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        _set_path(out, path, value, f"--set {text!r}")
    return out


def with_values(raw: dict[str, Any], values: dict[str, Any], label: str = "") -> dict[str, Any]:
    """Return a copy of ``raw`` with ``{"dotted.key": value}`` set (a sweep's sampled values)."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        _set_path(out, key.split("."), value, f"{label}{key}")
    return out


def _set_path(tree: dict[str, Any], path: list[str], value: Any, label: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{label}: {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only: no tag builds a Python object) that refuses a key
    given twice in one mapping; PyYAML itself silently keeps the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}, first given on line {first.line + 1}", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: plain data only


def _yaml_problem(err: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """(1-based line or None, the problem in one line) of a PyYAML error while reading ``text``."""
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow; no mark
        line = text.count("\n", 0, err.position) + 1
        return line, f"character #x{err.character:04x} is not allowed in YAML"
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return (mark.line + 1 if mark is not None else None), " ".join(problem.split())


# An experiment or sweep file is a few KB; anything this big is another file given by mistake.
_MAX_CONFIG_BYTES = 1024 * 1024


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; any other content is a one-line ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, not a config file")
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    if not p.is_file():
        raise ConfigError(f"{p}: is not a regular file")
    try:
        size = p.stat().st_size
        if size > _MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: is {size:,} bytes — not a config file (at most {_MAX_CONFIG_BYTES:,})")
        data = p.read_bytes()
    except PermissionError:
        raise ConfigError(f"{p}: cannot be read (permission denied)") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot be read ({err.strerror or err})") from None
    # (UTF-32-LE's BOM is UTF-16-LE's + 00 00.)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)):
        raise ConfigError(f"{p}: is UTF-16 or UTF-32 text — save it as UTF-8")
    if b"\0" in data:
        raise ConfigError(f"{p}: holds NUL bytes — binary data, not a UTF-8 YAML file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{p}: is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}) — save it as UTF-8"
        ) from None
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as err:
        line, problem = _yaml_problem(err, text)
        where = f" line {line}" if line is not None else ""
        raise ConfigError(f"{p}:{where} invalid YAML ({problem})") from None
    if raw is None:
        raise ConfigError(f"{p}: holds no settings (it is empty or only comments) — write {{}} for all defaults")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate one experiment file."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        return validate_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
