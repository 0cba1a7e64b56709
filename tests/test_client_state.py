"""Client state stays with the client; nothing a user can point the CLI at is unpickled.

* Every object the driver receives from client actors over a whole run (start, rounds,
  evaluation, checkpoints, a resume) is shared weights, counts or scalar metrics.
* No file the driver writes holds any array of a client's record.
* A malicious pickle planted wherever a checkpoint or a client's state lives is never executed.
* A damaged latest checkpoint falls back to the previous one with one warning; with none
  valid, one error line and the run directory untouched.
* A resume with another number of client actors ends as the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedrlhf_ray.client_store import ClientStore
from fedrlhf_ray.config import validate_config
from fedrlhf_ray.driver import FederatedDriver
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.experiment import run_experiment
from fedrlhf_ray.local_trainer import ClientUpdate
from fedrlhf_ray.rundir import RunDir
from fedrlhf_ray.torch_trainer import mlp_trainer_factory

# The RLHF trainer, small: the records it keeps (feedback, reward model, optimizer states) are
# what must not cross. personal_head makes the head a client's own parameters too.
TINY = {
    "seed": 4,
    "env": {"name": "synthetic", "synthetic": {"n_items": 80, "items_per_user": 24}},
    "clients": {"num_clients": 3, "formation": "group", "users_per_client": 2},
    "feedback": {"budget_per_round": 30},
    "ppo": {"train_batch_size": 200, "minibatch_size": 100, "num_epochs": 1, "local_iterations": 1, "num_envs": 2},
    "federation": {"rounds": 2, "personalization": "personal_head"},
    "evaluation": {"episodes_per_user": 1},
    "ray": {"num_workers": 2},
    "tracking": {"enabled": False},
}
PERSONAL = "scorer.score_head."


def _arrays(tree, out=None):
    """Every NumPy array (and tensor, as an array) in a nested record."""
    out = [] if out is None else out
    if isinstance(tree, dict):
        for v in tree.values():
            _arrays(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _arrays(v, out)
    elif isinstance(tree, np.ndarray):
        out.append(tree)
    elif hasattr(tree, "detach"):
        out.append(tree.detach().numpy())
    return out


def _distinctive(arrays, min_bytes=64):
    """Arrays whose bytes could not turn up by chance (not tiny, not constant)."""
    return [a for a in arrays if a.nbytes >= min_bytes and np.unique(a).size > 2]


@pytest.fixture(scope="module")
def recorded_run(ray_session, tmp_path_factory):
    """A 2-round run, then a resume to 3 rounds, recording what the driver receives."""
    received: list = []
    original = FederatedDriver._received

    def record(self, obj):
        received.append(obj)
        return original(self, obj)

    FederatedDriver._received = record
    try:
        run_dir = tmp_path_factory.mktemp("privacy") / "run"
        cfg = validate_config(TINY)
        # The driver runs in this process here, where the recording patch applies.
        run_experiment(cfg, run_dir=run_dir, in_process_driver=True)
        more = validate_config({**TINY, "federation": {**TINY["federation"], "rounds": 3}})
        run_experiment(more, run_dir=run_dir, resume=True, in_process_driver=True)
    finally:
        FederatedDriver._received = original
    return RunDir(run_dir), received


def _check_shared_weights(weights, names):
    assert isinstance(weights, dict) and weights
    for name, value in weights.items():
        assert isinstance(name, str) and name in names
        assert isinstance(value, np.ndarray) and value.dtype.kind == "f"


def test_driver_receives_only_shared_weights_counts_and_scalars(recorded_run):
    rd, received = recorded_run
    names = set(rd.load_checkpoint(3)["global_weights"])
    kinds = set()
    for obj in received:
        if isinstance(obj, dict):  # the initial weights of the built policy
            _check_shared_weights(obj, names)
            kinds.add("initial weights")
        elif isinstance(obj, bool):
            kinds.add("ready")
        elif isinstance(obj, str):
            kinds.add("node id")
        elif isinstance(obj, list) and obj and isinstance(obj[0], ClientUpdate):
            for u in obj:
                assert type(u.client_id) is int and type(u.num_samples) is int
                _check_shared_weights(u.weights, names)
                assert not any(k.startswith(PERSONAL) for k in u.weights), "a personal layer crossed"
                assert all(isinstance(k, str) and type(v) is float for k, v in u.metrics.items())
            kinds.add("updates")
        elif isinstance(obj, list) and obj and isinstance(obj[0], dict):
            for m in obj:  # per-client evaluation
                assert all(isinstance(k, str) and type(v) is float for k, v in m.items())
            kinds.add("evaluation")
        elif isinstance(obj, list) and all(type(c) is int for c in obj):
            kinds.add("damaged record ids")  # the restore's answer: ids only
        else:
            pytest.fail(f"the driver received a {type(obj).__name__}: {obj!r:.200}")
    assert kinds == {"initial weights", "ready", "node id", "updates", "evaluation", "damaged record ids"}

    # And none of a client's private arrays is among the bytes that crossed.
    crossed = pickle.dumps(received)
    store = ClientStore(rd / "clients")
    private = []
    for c in range(3):
        record = store.load(c, upto=3)
        assert record is not None and record["trainer"]["feedback"]["pair_a"].size > 0
        private += _distinctive(_arrays(record))
    assert len(private) > 20
    for array in private:
        assert array.tobytes() not in crossed


def test_driver_files_hold_no_client_array(recorded_run):
    rd, _ = recorded_run
    store = ClientStore(rd / "clients")
    private = [a for c in range(3) for a in _distinctive(_arrays(store.load(c, upto=3)))]
    driver_files = [p for p in rd.path.rglob("*") if p.is_file() and "clients" not in p.relative_to(rd.path).parts]
    names = {p.name for p in driver_files}
    assert {"checkpoint-000002.npz", "checkpoint-000003.npz", "metrics.jsonl", "config.yaml", "summary.json"} <= names
    blobs = [p.read_bytes() for p in driver_files]
    for array in private:
        raw = array.tobytes()
        assert not any(raw in blob for blob in blobs)
    # The checkpoint itself: round, global weights and strategy state, nothing else.
    state = rd.load_checkpoint(3)
    assert set(state) == {"round", "global_weights", "strategy"}


# -- pickles and damaged files ---------------------------------------------------------------------
K = 4


def mlp_cfg(rounds: int, workers: int = 2):
    return validate_config({
        "seed": 2, "clients": {"num_clients": K},
        "federation": {"rounds": rounds}, "ray": {"num_workers": workers}, "tracking": {"enabled": False},
    })


def mlp_run(run_dir: Path, rounds: int, *, resume: bool = False, workers: int = 2):
    factory = mlp_trainer_factory(K, seed=2, lr_decay=0.6)
    return run_experiment(mlp_cfg(rounds, workers), run_dir=run_dir, resume=resume, trainer_factory=factory)


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_npz(marker: Path) -> bytes:
    """An .npz whose member is a pickle (np.load would run it with allow_pickle=True)."""
    buffer = io.BytesIO()
    np.savez(buffer, __tree__=np.array([Exploit(marker)], dtype=object), x=np.zeros(3))
    return buffer.getvalue()


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_weights(ray_session, tmp_path_factory):
    rd = mlp_run(tmp_path_factory.mktemp("ref") / "run", 3).run_dir
    return rd.load_checkpoint(3)["global_weights"]


def _assert_same(weights, reference):
    for k in reference:
        np.testing.assert_array_equal(weights[k], reference[k], err_msg=k)


@pytest.mark.parametrize("planted", ["pickle", "object-npz", "truncated", "empty"])
def test_damaged_latest_checkpoint_falls_back_with_one_warning(reference_weights, tmp_path, capfd, planted):
    marker = tmp_path / "pwned"
    rd = mlp_run(tmp_path / "run", 2).run_dir
    latest = rd.checkpoint_path(2)
    data = latest.read_bytes()
    latest.write_bytes({"pickle": pickle.dumps(Exploit(marker)), "object-npz": malicious_npz(marker),
                        "truncated": data[: len(data) // 2], "empty": b""}[planted])
    capfd.readouterr()
    result = mlp_run(rd.path, 3, resume=True)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "checkpoint of round 2 is damaged" in line]
    assert len(warnings) == 1 and warnings[0].startswith("fedrlhf: warning: ")
    assert not marker.exists()
    assert result.status == "completed"
    _assert_same(result.run_dir.load_checkpoint(3)["global_weights"], reference_weights)


def test_planted_pickles_in_client_store_are_never_executed(reference_weights, tmp_path, capfd):
    marker = tmp_path / "pwned"
    rd = mlp_run(tmp_path / "run", 2).run_dir
    (rd / "clients" / "client-000001" / "round-000002.npz").write_bytes(pickle.dumps(Exploit(marker)))
    result = mlp_run(rd.path, 3, resume=True)
    assert "client records of round 2 are damaged (clients [1])" in capfd.readouterr().err
    assert not marker.exists()
    _assert_same(result.run_dir.load_checkpoint(3)["global_weights"], reference_weights)


def test_no_valid_checkpoint_is_one_error_and_leaves_the_run_untouched(ray_session, tmp_path):
    marker = tmp_path / "pwned"
    rd = mlp_run(tmp_path / "run", 2).run_dir
    for r in rd.checkpoint_rounds():
        rd.checkpoint_path(r).write_bytes(malicious_npz(marker) if r == 2 else pickle.dumps(Exploit(marker)))
    before = digest(rd.path)
    with pytest.raises(UserError, match="2 checkpoint\\(s\\), none usable") as err:
        mlp_run(rd.path, 3, resume=True)
    assert "\n" not in str(err.value)
    assert digest(rd.path) == before
    assert not marker.exists()


def test_resume_with_another_number_of_client_actors(reference_weights, tmp_path):
    rd = mlp_run(tmp_path / "run", 1, workers=2).run_dir
    assert rd.checkpoint_rounds() == [1]
    result = mlp_run(rd.path, 3, resume=True, workers=1)
    assert {p["host"] for p in result.run_dir.read_json("status.json")["placement"]} == {0}
    _assert_same(result.run_dir.load_checkpoint(3)["global_weights"], reference_weights)


def test_client_store_keeps_what_a_fallback_needs(ray_session, tmp_path):
    rd = mlp_run(tmp_path / "run", 4).run_dir
    assert rd.checkpoint_rounds() == [4, 3]
    store = ClientStore(rd / "clients")
    # Round 4's checkpoint could fall back to 3; round 3's records, and round 2's for a
    # fallback decided while round 4 ran, are kept; older ones are gone.
    assert all(store.versions(c) == [4, 3, 2] for c in range(K))


@pytest.mark.slow
def test_cli_resume_of_planted_checkpoints_is_one_line_exit_2(tmp_path):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "crafted"
    run_dir.mkdir()
    cfg = {"name": "crafted", "env": {"name": "synthetic"}, "federation": {"rounds": 3},
           "ray": {"num_workers": 1, "num_cpus": 1, "object_store_mb": 128}, "tracking": {"enabled": False}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "checkpoint-000001.npz").write_bytes(pickle.dumps(Exploit(marker)))
    (run_dir / "checkpoint-000002.npz").write_bytes(malicious_npz(marker))
    before = digest(run_dir)
    out = subprocess.run([sys.executable, "-m", "fedrlhf_ray.cli", "run", "--resume", str(run_dir)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("fedrlhf: error:")]
    assert len(errors) == 1 and "none usable" in errors[0]
    assert "Traceback" not in out.stderr
    assert not marker.exists()
    after = digest(run_dir)
    assert {k: v for k, v in after.items() if k != "ray_processes.json"} == before
