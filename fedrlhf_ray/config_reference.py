"""The configuration reference (``fedrlhf config reference``, ``docs/configuration.md``), generated
from the schema's field descriptions."""

from __future__ import annotations

from pydantic import BaseModel

from fedrlhf_ray.schema import DEFAULT_ENV, ENV_ONLY_SECTIONS, ENV_SECTIONS, ExperimentConfig


def _section(annotation: object) -> type[BaseModel] | None:
    """The section model a field holds (``X`` or ``X | None``), or None for a leaf."""
    candidates = (annotation, *getattr(annotation, "__args__", ()))
    return next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)


def reference_rows(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted field, default, description) for every leaf field: the reference in docs/configuration.md.

    ``env`` has the fields of the env ``env.name`` picks; each is marked with the envs that have
    it, and a section that belongs to one env (``lm``) says so."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        if model is ExperimentConfig and name == "env":
            rows.extend(_env_rows())
            continue
        section = _section(field.annotation)
        if section is not None:
            sub = reference_rows(section, key + ".")
            if model is ExperimentConfig and name in ENV_ONLY_SECTIONS:
                owner = ENV_ONLY_SECTIONS[name][0]
                sub = [(k, d, f"({owner} only) {m}") for k, d, m in sub]
            rows.extend(sub)
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, "null" if default is None else str(default), field.description or ""))
    return rows


def _env_rows() -> list[tuple[str, str, str]]:
    names = ", ".join(ENV_SECTIONS)
    rows = [("env.name", DEFAULT_ENV, f"Which environment: {names}; each has only its own fields below.")]
    envs_of: dict[str, list[str]] = {}
    found: dict[str, tuple[str, str, str]] = {}
    for env_name, section in ENV_SECTIONS.items():
        for key, default, meaning in reference_rows(section, "env."):
            if key == "env.name":
                continue
            envs_of.setdefault(key, []).append(env_name)
            found.setdefault(key, (key, default, meaning))
    for key, (_, default, meaning) in found.items():
        rows.append((key, default, f"({', '.join(envs_of[key])}) {meaning}"))
    return rows


def reference_markdown() -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {m} |" for k, d, m in reference_rows()]
    return "\n".join(lines)
