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


# What the CLI may take from the platform: it parses, dispatches to one lifecycle per command
# (an experiment's, a sweep's) and prints. Anything else it imported would be lifecycle work
# (starting Ray, making run directories, resolving tracking, driving rounds) done twice.
CLI_MAY_IMPORT = {
    "fedrlhf_ray.config": {"load_config", "apply_overrides", "validate_config"},
    "fedrlhf_ray.config_reference": {"reference_markdown"},
    "fedrlhf_ray.errors": {"UserError"},
    "fedrlhf_ray.schema": {"ExperimentConfig"},
    "fedrlhf_ray.tasks": {"ResultTable", "Task", "all_tasks", "task_for", "task_for_dataset"},
    "fedrlhf_ray.experiment": {"run_experiment", "resume_config", "was_terminated"},
    "fedrlhf_ray.rundir": {"RunDir"},
    "fedrlhf_ray.sweeps.lifecycle": {"tune_sweep"},
    "fedrlhf_ray.sweeps.schema": {"BEST_CONFIG"},
    "fedrlhf_ray.leakage_audit": {"audit_driver"},
    "fedrlhf_ray.privacy": {"DEVIATIONS"},  # `fedrlhf audit --deviate`'s choices
    "fedrlhf_ray.report": {"regenerate", "report_runs"},
    "fedrlhf_ray.tracking": {"DEFAULT_DB", "check_sqlite_path", "local_artifact_root"},  # `fedrlhf ui`
}


def test_the_cli_only_parses_dispatches_and_prints():
    tree = ast.parse((REPO / "fedrlhf_ray" / "cli.py").read_text())
    taken = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedrlhf_ray"):
            taken.setdefault(node.module, set()).update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("fedrlhf_ray") for a in node.names), "import modules by name"
    extra = {m: names - CLI_MAY_IMPORT.get(m, set()) for m, names in taken.items()}
    assert {m: n for m, n in extra.items() if n} == {}
    text = (REPO / "fedrlhf_ray" / "cli.py").read_text()
    for marker in ("run_round", "FederatedDriver", "initial_evaluation", "checkpoint(", "ray.init", "Tuner("):
        assert marker not in text, marker


# -- layering -------------------------------------------------------------------------------------
def _engine_modules() -> dict[str, set[str]]:
    """The engine: every platform module outside the task plug-ins (and their registry)."""
    return {
        name: deps for name, deps in graph().items()
        if name.startswith("fedrlhf_ray") and not name.startswith("fedrlhf_ray.tasks")
    }


def test_the_engine_imports_no_task_package():
    """The engine reaches tasks only through the registry (``fedrlhf_ray.tasks``)."""
    for name, deps in _engine_modules().items():
        assert not [d for d in deps if d.startswith("fedrlhf_ray.tasks.")], (name, deps)


def test_tasks_do_not_import_one_another():
    for name, deps in graph().items():
        parts = name.split(".")
        if len(parts) > 2 and parts[:2] == ["fedrlhf_ray", "tasks"]:
            own = ".".join(parts[:3])
            others = [d for d in deps if d.startswith("fedrlhf_ray.tasks.") and not d.startswith(own)]
            assert not others, (name, others)


def test_privacy_does_not_import_the_driver_or_the_client_actor():
    for name, deps in graph().items():
        if name.startswith("fedrlhf_ray.privacy"):
            assert not deps & {"fedrlhf_ray.driver", "fedrlhf_ray.client", "fedrlhf_ray.experiment"}, (name, deps)


def _string_constants(path: Path) -> list[str]:
    """String literals of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_engine_module_names_a_task_or_a_task_metric():
    """Task names, env names and the tasks' metric names appear only under ``fedrlhf_ray/tasks/``
    (and in the schema, whose env sections say which env they serve)."""
    from fedrlhf_ray.tasks import all_tasks

    tasks = all_tasks()
    names = {t.name for t in tasks} | {e for t in tasks for e in t.env_names}
    metrics = {t.headline_metric.split("/")[1] for t in tasks}
    metrics |= {p.key.split("/")[1] for t in tasks for p in t.curve_panels if p.key.startswith("eval/")}
    assert {"liked_hit_rate", "sentiment_independent", "ndcg"} <= metrics
    for module in sorted(_engine_modules()):
        if module in ("fedrlhf_ray.schema",):
            continue
        path = REPO / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = REPO / module.replace(".", "/") / "__init__.py"
        for text in _string_constants(path):
            assert text not in names, f"{module} names the task or env {text!r}"
            assert not any(m in text for m in metrics), f"{module} names a task metric in {text!r}"


def test_every_task_is_registered_and_complete():
    """A task package defines TASK with everything the engine asks of it (the Task protocol)."""
    import inspect

    from fedrlhf_ray.tasks import REGISTRY, Task, all_tasks

    folders = {p.name for p in (REPO / "fedrlhf_ray" / "tasks").iterdir() if (p / "__init__.py").exists()}
    assert folders == set(REGISTRY), "every folder under fedrlhf_ray/tasks/ is registered, and only those"
    wanted = {n for n in dir(Task) if not n.startswith("_")} | set(inspect.get_annotations(Task))
    env_names = []
    for task in all_tasks():
        missing = sorted(n for n in wanted if not hasattr(task, n))
        assert missing == [], (task.name, missing)
        assert len(task.curve_panels) == 4
        env_names += list(task.env_names)
    assert len(env_names) == len(set(env_names)), "an env is run by one task"


def test_the_schema_offers_exactly_the_registered_envs():
    from typing import get_args

    from fedrlhf_ray.schema import ENV_SECTIONS
    from fedrlhf_ray.tasks import all_tasks

    for name, section in ENV_SECTIONS.items():
        assert get_args(section.model_fields["name"].annotation) == (name,)
    assert set(ENV_SECTIONS) == {e for t in all_tasks() for e in t.env_names}


def test_task_registry_imports_nothing_heavy():
    """Asking the registry (as the CLI's parser does) imports neither torch, Ray nor RLlib."""
    import subprocess
    import sys

    code = (
        "import sys; from fedrlhf_ray.tasks import all_tasks; all_tasks(); "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_the_platform_changes_no_process_state():
    """No import-time side effects: importing every module registers no env, sets no torch threads
    and no logger level, and writes no environment variable (the client actor's install_process and
    the CLI's entry point do those)."""
    import subprocess
    import sys

    code = """
import importlib, logging, os, pkgutil, sys
import torch, gymnasium, mlflow, ray, ray.rllib.algorithms.ppo, ray.tune, transformers  # their own settings first
from ray.tune.registry import ENV_CREATOR, _global_registry
threads, env = torch.get_num_threads(), dict(os.environ)
import fedrlhf_ray, envs
for pkg in (fedrlhf_ray, envs):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
registered = [n for n in ("fedrlhf-shaped-slate", "fedrlhf-text") if _global_registry.contains(ENV_CREATOR, n)]
print(registered, torch.get_num_threads() == threads, dict(os.environ) == env,
      logging.getLogger("ray.rllib.algorithms.algorithm_config").level, logging.getLogger("absl").filters)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[] True True 0 []"


def test_the_schema_is_a_leaf_and_config_reading_stands_above_the_subsystems():
    edges = graph()
    assert edges["fedrlhf_ray.schema"] <= {"fedrlhf_ray.errors"}, edges["fedrlhf_ray.schema"]
    # The subsystems whose cross-checks the preflight runs type their config with the schema and
    # never import the reader (which runs them).
    for name in ("fedrlhf_ray.strategies", "fedrlhf_ray.privacy", "fedrlhf_ray.attacks", "fedrlhf_ray.ray_runtime",
                 "fedrlhf_ray.tracking", "fedrlhf_ray.tasks", "fedrlhf_ray.tasks.rec", "fedrlhf_ray.tasks.text"):
        assert "fedrlhf_ray.config" not in edges[name], name


def test_strategy_names_are_the_schemas_and_the_registrys():
    from fedrlhf_ray.schema import STRATEGY_NAMES
    from fedrlhf_ray.strategies import STRATEGIES

    assert tuple(STRATEGIES) == STRATEGY_NAMES
