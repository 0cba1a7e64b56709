"""The configuration reference (``fedrlhf config reference``, ``docs/configuration.md``), generated
from the schema's field descriptions."""

from __future__ import annotations

from pydantic import BaseModel

from fedrlhf_ray.schema import ExperimentConfig


def reference_rows(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted field, default, description) for every leaf field: the reference in docs/configuration.md."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(reference_rows(annotation, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, "null" if default is None else str(default), field.description or ""))
    return rows


def reference_markdown() -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {m} |" for k, d, m in reference_rows()]
    return "\n".join(lines)
