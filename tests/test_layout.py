"""The package's shape: no import cycles, the CLI only dispatches, one owner of file names."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedrlhf_ray", "envs")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Project modules ``path`` imports anywhere (function-level imports included)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    edges = {}
    for name, path in files.items():
        edges[name] = {m for m in imports_of(path, name) if m in files and m != name}
    return edges


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            # A package's __init__ importing its own submodules is how packages re-export.
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_envs_do_not_depend_on_the_platform():
    for name, deps in graph().items():
        if name.startswith("envs"):
            assert not any(d.startswith("fedrlhf_ray") for d in deps), (name, deps)


def test_one_owner_of_run_file_names():
    for path in (REPO / "fedrlhf_ray").rglob("*.py"):
        if path.name == "rundir.py":
            continue
        text = path.read_text()
        for literal in ('"metrics.jsonl"', '"client_metrics.jsonl"', '"status.json"', '"summary.json"', '"config.yaml"'):
            assert literal not in text, f"{path.name} spells {literal}; use fedrlhf_ray.rundir"


def test_the_cli_writes_no_round_loop():
    text = (REPO / "fedrlhf_ray" / "cli.py").read_text()
    for marker in ("run_round", "FederatedDriver", "initial_evaluation", "checkpoint("):
        assert marker not in text, marker
